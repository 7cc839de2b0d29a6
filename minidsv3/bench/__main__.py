"""``python -m minidsv3.bench {train,decode,wallclock,hf} [options]``: run one benchmark."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidsv3.bench",
        description="Print benchmark figures; each subcommand has its own --help.")
    parser.add_argument("benchmark", choices=("train", "decode", "wallclock", "hf"),
                        help="train: training throughput and FLOP/s; decode: generation speed; "
                             "wallclock: validation loss of three recipes for equal training "
                             "time; hf: a training step vs HF transformers' DeepseekV3ForCausalLM")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="options of the benchmark (see `python -m minidsv3.bench NAME -h`)")
    args = parser.parse_args(argv)
    # Import only the benchmark asked for: each pulls in different parts of the package.
    if args.benchmark == "train":
        from .train import main as run
    elif args.benchmark == "decode":
        from .decode import main as run
    elif args.benchmark == "wallclock":
        from .wallclock import main as run
    else:
        from .hf import main as run
    return run(args.options) or 0


if __name__ == "__main__":
    sys.exit(main())
