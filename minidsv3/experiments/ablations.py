"""The ablation sweep: ``python -m minidsv3.experiments ablations [--seeds 3] [--steps N]``.

Every variant is the default recipe (the toy MoE with MTP and auxiliary-loss-free
balancing, the model of ``make train``) with one thing changed, trained once per seed in
its own run directory ``OUT_DIR/VARIANT/seedS`` by ``python -m minidsv3.train --seed S``.
The seed draws the weights and the order of the batches, so within a seed every variant
reads the same batches in the same order (one that takes more steps reads further).

Two variants are *equal wall-clock* twins (``same_time_as``): they train with a
``--time-budget`` equal to the training seconds of their reference run of the same seed,
so a cheaper step buys more steps. A run's training seconds are its steps times its median
step time (the median of the logged intervals leaves out those an evaluation or a
checkpoint fell in), which is what ``--time-budget`` counts.

The sweep is resumable. A run with a ``result.json`` is done and skipped; a run with a
checkpoint but no result was interrupted and continues with ``--resume``, with exactly
the losses it would have had; a run killed before its first checkpoint starts again.

``result.json`` holds what the results page needs (report.py), measured as the
auxiliary-loss-free paper (Wang et al. 2024, arXiv 2408.15664) defines it:
MaxVio = (max_i load_i - mean load) / mean load, where *MaxVio_global* takes the loads
over the whole validation split and *MaxVio_batch* those of each training batch (one
optimizer step), averaged over the logged steps. Both are means over the main model's
MoE layers, so that runs with and without an MTP module compare alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, train
from ..bench.train import dense_twin, without_mtp
from ..bench.wallclock import overrides_between
from ..config import ModelConfig
from ..moe import max_violation
from ..plots import read_metrics
from ..train_cli import build_parser, parse_command_line, parse_overrides

RESULT = "result.json"
# Coefficients of the loss-controlled baseline: the paper's point is that none of them
# gets both the loss and the balance of the auxiliary-loss-free method.
AUX_ALPHAS = (0.001, 0.01, 0.1)
SCOPE_ALPHA = 0.001  # sequence-wise vs batch-wise balance loss (V3 sec. 4.5.3), same alpha
GAMMAS = (0.0001, 0.01)  # the bias update speed, beside the default 0.001


@dataclass(frozen=True)
class Variant:
    """One recipe of the sweep: training options on top of the default recipe."""

    name: str  # its run directory, OUT_DIR/NAME/seedS
    label: str  # in tables and legends
    options: tuple[str, ...] = ()  # options of the training command line
    model: Callable[[ModelConfig], ModelConfig] | None = None  # None: the default model
    same_time_as: str | None = None  # train for as many seconds as this variant's run


VARIANTS = (
    Variant("aux-free", "aux-loss-free (V3: gamma 1e-3, seq. alpha 1e-4)"),
    *(Variant(f"aux-loss-{a:g}", f"aux loss, alpha {a:g}",
              ("--balance", "aux-loss", "--aux-alpha", f"{a:g}")) for a in AUX_ALPHAS),
    Variant(f"seq-aux-{SCOPE_ALPHA:g}", f"sequence-wise aux loss, alpha {SCOPE_ALPHA:g}",
            ("--balance", "none", "--seq-alpha", f"{SCOPE_ALPHA:g}")),
    Variant("none", "no balancing", ("--balance", "none")),
    *(Variant(f"gamma-{g:g}", f"aux-loss-free, gamma {g:g}", ("--bias-gamma", f"{g:g}"))
      for g in GAMMAS),
    Variant("no-mtp", "no MTP (D = 0)", model=without_mtp),
    Variant("dense", "dense twin (no MTP)", model=dense_twin),
    Variant("no-mtp-same-time", "no MTP, aux-free's seconds", model=without_mtp,
            same_time_as="aux-free"),
    Variant("dense-same-time", "dense twin, no-mtp's seconds", model=dense_twin,
            same_time_as="no-mtp"),
)
BY_NAME = {v.name: v for v in VARIANTS}
QUICK_VARIANTS = ("aux-free", f"aux-loss-{SCOPE_ALPHA:g}")
# What the sweep gives every run: evaluations often enough to draw curves (on a few
# batches; the final one reads the whole split), short samples. Options after these win.
COMMON = ("--eval-every", "50", "--ckpt-every", "100", "--sample-chars", "100")
QUICK = ("--warmup", "4", "--eval-every", "8", "--eval-batches", "2", "--ckpt-every", "8")
QUICK_STEPS = 16
SET_BY_SWEEP = ("out", "resume", "seed", "steps", "time_budget", "stop_after")


def run_dir(out_dir: Path, variant: str, seed: int) -> Path:
    return out_dir / variant / f"seed{seed}"


def read_result(path: Path) -> dict[str, Any]:
    return json.loads((path / RESULT).read_text(encoding="utf-8"))


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Atomically: a result.json that exists is whole, and marks the run as done."""
    tmp = path / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path / RESULT)


def maxvio_global(val_load: torch.Tensor, n_main: int) -> float:
    """MaxVio of the validation loads (L, E) summed over the whole split, mean over the
    first ``n_main`` (main-model) MoE layers."""
    return max_violation(val_load[:n_main]).mean().item()


def maxvio_batch(per_step: torch.Tensor, n_main: int) -> float:
    """Mean over logged training steps and main MoE layers of each step's MaxVio;
    ``per_step`` is (steps, L), every MoE layer's MaxVio at each logged step."""
    return per_step[:, :n_main].mean().item()


def summarise(path: Path, variant: str, seed: int, tokens_per_step: int, wall_seconds: float
              ) -> dict[str, Any]:
    """The numbers of a finished run, from its metrics.jsonl and config.json;
    ``wall_seconds``: how long the training command took, evaluations and all."""
    records = read_metrics(path / "metrics.jsonl")
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    final = records[-1]  # the last step's evaluation, on the whole validation split
    step_seconds = statistics.median(tokens_per_step / r["tokens_per_s"]
                                     for r in records if "tokens_per_s" in r)
    result = {"variant": variant, "seed": seed, "steps": final["step"],
              "val_loss": final["val_loss"], "tokens_per_s": tokens_per_step / step_seconds,
              "train_seconds": final.get("train_seconds", final["step"] * step_seconds),
              "wall_seconds": wall_seconds, "maxvio_global": None, "maxvio_batch": None}
    n_main = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    result["n_main_moe_layers"] = n_main
    if "val_load" in final:  # a model with MoE layers
        per_step = torch.tensor([r["maxvio_train_per_layer"] for r in records
                                 if "maxvio_train_per_layer" in r])
        result.update(maxvio_global=maxvio_global(torch.tensor(final["val_load"]), n_main),
                      maxvio_batch=maxvio_batch(per_step, n_main))
    return result


def plan(variants: list[Variant], seeds: list[int], options: list[str], length: list[str],
         base: ModelConfig) -> list[tuple[Variant, int, list[str]]]:
    """(variant, seed, training argv without --out) for every run, seed by seed, each
    wall-clock twin after its reference. ``options`` go to every run, ``length``
    (``--steps N`` or ``--time-budget S``) to all but the wall-clock twins."""
    names = {v.name for v in variants}
    runs = []
    for seed in seeds:
        for v in variants:
            if v.same_time_as and v.same_time_as not in names:
                raise ValueError(f"{v.name} trains for the seconds of {v.same_time_as}, "
                                 "which this sweep does not run")
            overrides = overrides_between(base, v.model(base)) if v.model else []
            argv = [*options, *v.options, *overrides, "--seed", str(seed)]
            runs.append((v, seed, argv + ([] if v.same_time_as else length)))
    return runs


def sweep(runs: list[tuple[Variant, int, list[str]]], out_dir: Path,
          train_fn: Callable[[list[str]], Any] = train.train) -> list[dict[str, Any]]:
    """Train every run not done yet (see the module docstring); returns all results."""
    results = []
    for i, (v, seed, argv) in enumerate(runs, 1):
        path = run_dir(out_dir, v.name, seed)
        head = f"[{i}/{len(runs)}] {v.name}, seed {seed}"
        if (path / RESULT).exists():
            print(f"{head}: done before, skipped")
            results.append(read_result(path))
            continue
        argv = [*argv, "--out", str(path)]
        if v.same_time_as:
            seconds = read_result(run_dir(out_dir, v.same_time_as, seed))["train_seconds"]
            argv += ["--time-budget", f"{seconds:.2f}"]
        if checkpoint.has_checkpoint(path):
            print(f"{head}: interrupted before, continuing from its checkpoint")
            argv.append("--resume")
        else:
            if path.exists():  # killed before its first checkpoint: nothing in it to keep
                shutil.rmtree(path)
            print(f"{head}: {' '.join(argv)}")
        started = time.perf_counter()
        train_fn(argv)
        options, _ = parse_command_line(build_parser(), argv)
        result = summarise(path, v.name, seed, options.batch_size * options.seq_len,
                           time.perf_counter() - started)
        write_result(path, result)
        results.append(result)
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minidsv3.experiments ablations",
        description="Train the ablations of the DeepSeek-V3 report and of the auxiliary-loss-"
                    "free balancing paper on the toy model, several seeds each, and write the "
                    "results page with the papers' numbers beside ours.",
        epilog="Other options and KEY=VALUE overrides go to every `python -m minidsv3.train` "
               "run, e.g. --threads 1 or --data-dir DIR. Variants: "
               + ", ".join(v.name for v in VARIANTS),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N for every variant")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=400, help="optimizer steps of every run")
    length.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="instead of --steps: seconds of training steps of every run")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="run directories go to OUT_DIR/VARIANT/seedS (default runs/ablations, "
                        "runs/ablations-quick with --quick)")
    p.add_argument("--docs", type=Path, default=None,
                   help="where results.md and its figures go (default docs, OUT_DIR with "
                        "--quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"the test suite's check: one seed of {' and '.join(QUICK_VARIANTS)}, "
                        "{QUICK_STEPS} steps each")
    p.add_argument("--only", nargs="+", metavar="VARIANT", choices=list(BY_NAME),
                   help="run only these variants (the page covers what was run)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .report import write_page  # matplotlib only when a page is written

    parser = build_arg_parser()
    args, train_argv = parser.parse_known_args(argv)
    trained, given = parse_command_line(build_parser(), train_argv)  # what every run gets
    for name in SET_BY_SWEEP:
        if name in given:
            parser.error(f"--{name.replace('_', '-')} is set by the sweep for each run; leave "
                         "it out (use the sweep's --steps or --time-budget)")
    if args.seeds < 1 or args.steps < 1 or (args.time_budget is not None
                                            and not args.time_budget > 0):
        parser.error("need --seeds >= 1, --steps >= 1 and --time-budget > 0")
    if args.quick:
        names, seeds = list(QUICK_VARIANTS), [1]
        options, length = [*COMMON, *QUICK, *train_argv], ["--steps", str(QUICK_STEPS)]
    else:
        names, seeds = args.only or [v.name for v in VARIANTS], list(range(1, args.seeds + 1))
        options = [*COMMON, *train_argv]
        length = (["--time-budget", str(args.time_budget)] if args.time_budget
                  else ["--steps", str(args.steps)])
    out_dir = args.out_dir or Path("runs/ablations-quick" if args.quick else "runs/ablations")
    docs = args.docs or (out_dir if args.quick else Path("docs"))
    try:
        base = ModelConfig.preset(trained.preset, **parse_overrides(trained.overrides))
        runs = plan([BY_NAME[n] for n in names], seeds, options, length, base)
    except ValueError as err:
        parser.error(str(err))
    try:
        results = sweep(runs, out_dir)
    except train.Diverged as err:
        print(f"error: {err}")
        return 1
    page = write_page(results, out_dir, docs, command=" ".join(["python -m minidsv3.experiments",
                                                                "ablations", *(argv or [])]))
    print(f"results page: {page}")
    return 0
