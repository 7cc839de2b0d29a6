"""Validation loss for the same training time: ``python -m minidsv3.bench wallclock``.

Trains three recipes one after another on this machine, each for the same number of
seconds of training steps (``python -m minidsv3.train --time-budget``, which plans the
steps each model's speed allows; evaluations and checkpoints are not counted), on the
same corpus, split and seed, with the same flags:

1. the default recipe (``make train``): the toy MoE with MTP;
2. the same model without MTP (``num_nextn_predict_layers=0``);
3. its dense twin, no MoE and no MTP (``dense_twin`` of bench/train.py, passed to the
   training command line as the KEY=VALUE overrides it amounts to).

It prints each run's steps, tokens/s over its training steps and final validation loss
(on the whole validation split), and the differences to the default recipe: a cheaper
step buys more steps, and the table says whether they buy a lower loss. The plot
``OUT_DIR/wallclock.png`` draws each run's validation loss over its training seconds.

Each run writes its own directory ``OUT_DIR/NAME``. The comparison is fair only for runs
trained back to back on one machine, so the bench never reuses old runs: it refuses an
``--out-dir`` that already holds any of the three (remove them or choose another).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .. import train
from ..config import ModelConfig
from ..plots import read_metrics, wallclock_figure
from ..train_cli import build_parser, parse_command_line, parse_overrides
from .train import dense_twin, without_mtp

# (row label, run directory name, the model from the default recipe's)
RECIPES = (("MoE + MTP", "moe-mtp", lambda cfg: cfg), ("MoE", "moe", without_mtp),
           ("dense twin", "dense", dense_twin))
# Options of the training command line that the bench sets for every run itself.
SET_BY_BENCH = ("out", "resume", "steps", "time_budget", "stop_after")


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def overrides_between(base: ModelConfig, recipe: ModelConfig) -> list[str]:
    """The KEY=VALUE overrides of the training command line that turn ``base`` into
    ``recipe``: every field they differ in."""
    return [f"{field.name}={getattr(recipe, field.name)}" for field in dataclasses.fields(base)
            if getattr(recipe, field.name) != getattr(base, field.name)]


def final_record(run_dir: Path) -> dict[str, Any]:
    """The last record of a finished run: its whole-split evaluation and budget summary."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidsv3.bench wallclock",
        description="Train the default recipe (MoE + MTP), the same model without MTP and its "
                    "dense twin for the same seconds of training steps each, one after "
                    "another, and compare their validation losses.",
        epilog="Every other option and KEY=VALUE override goes to each `python -m "
               "minidsv3.train` run unchanged, e.g. --threads 1, --data-dir DIR, --seed N, "
               "--preset, --text FILE, --batch-size; the bench sets --out and --time-budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False)  # so that no option of the training command line is taken for ours
    parser.add_argument("--seconds", type=positive_seconds, default=300.0,
                        help="seconds of training steps for each run (its --time-budget)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/wallclock"),
                        help="the runs go to OUT_DIR/moe-mtp, OUT_DIR/moe and OUT_DIR/dense")
    args, train_argv = parser.parse_known_args(argv)
    options, given = parse_command_line(build_parser(), train_argv)
    for name in SET_BY_BENCH:
        if name in given:
            parser.error(f"--{name.replace('_', '-')} is set by the bench (each run trains "
                         "in OUT_DIR/NAME for --seconds); leave it out")
    try:
        base = ModelConfig.preset(options.preset, **parse_overrides(options.overrides))
    except ValueError as err:
        parser.error(str(err))
    try:
        runs = [(label, args.out_dir / name, overrides_between(base, recipe(base)))
                for label, name, recipe in RECIPES]
    except ValueError as err:
        model = " ".join(["--preset", options.preset, *options.overrides])
        parser.error(f"{model} has no dense twin: {err}")
    taken = [path.name for _, path, _ in runs if path.exists()]
    if taken:
        parser.error(f"--out-dir {args.out_dir} already holds {', '.join(taken)}; the runs are "
                     "compared only when trained back to back on this machine, so old ones "
                     "are not reused: remove them or choose another --out-dir")

    for label, out, overrides in runs:
        print(f"\n== {label} ({' '.join(overrides) or 'the default recipe'}): "
              f"{args.seconds:g} s of training steps, in {out}")
        try:
            train.train([*train_argv, *overrides, "--out", str(out),
                         "--time-budget", str(args.seconds)])
        except train.Diverged as err:
            print(f"error: {label}: {err}")
            return 1

    finals = {label: final_record(out) for label, out, _ in runs}
    reference = finals[RECIPES[0][0]]
    print(f"\n{args.seconds:g} s of training steps per run (evaluations and checkpoints not "
          "counted). val loss: the final evaluation, on the whole validation split, in "
          f"nats/char; loss - ref and speed: against {RECIPES[0][0]}")
    print(f"{'recipe':<10}  {'steps':>6}  {'planned':>7}  {'train s':>8}  {'tokens/s':>9}  "
          f"{'val loss':>8}  {'loss - ref':>10}  {'speed':>6}")
    for label, final in finals.items():
        print(f"{label:<10}  {final['step']:>6}  {final['planned_steps']:>7}  "
              f"{final['train_seconds']:>8.1f}  {final['train_tokens_per_s']:>9,.0f}  "
              f"{final['val_loss']:>8.4f}  {final['val_loss'] - reference['val_loss']:>+10.4f}  "
              f"{final['train_tokens_per_s'] / reference['train_tokens_per_s']:>5.2f}x")
    figure = args.out_dir / "wallclock.png"
    wallclock_figure({label: read_metrics(out / "metrics.jsonl") for label, out, _ in runs}
                     ).savefig(figure, dpi=110)
    print(f"plot: {figure}")
    return 0
