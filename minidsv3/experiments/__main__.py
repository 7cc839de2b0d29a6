"""``python -m minidsv3.experiments ablations [options]``: run an experiment."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidsv3.experiments",
        description="Run an experiment; each has its own --help.")
    parser.add_argument("experiment", choices=("ablations",),
                        help="ablations: the papers' ablations on the toy model, with seeds, "
                             "written up in docs/results.md")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="options of the experiment (see `python -m minidsv3.experiments "
                             "NAME -h`)")
    args = parser.parse_args(argv)
    from .ablations import main as run

    return run(args.options) or 0


if __name__ == "__main__":
    sys.exit(main())
