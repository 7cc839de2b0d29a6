"""The results page of the ablation sweep: ``docs/results.md`` and its figures.

Everything on the page is computed from the runs' ``result.json`` files and metrics
(ablations.py); nothing is typed in by hand except the papers' own numbers, which stand
beside ours in ``FINDINGS``.

A finding compares a *treatment* with a *baseline* seed by seed: both read the same
batches in the same order, so the paired difference d_s = treatment_s - baseline_s
removes what the seed does to both. Its mean is the effect and the standard deviation of
d over seeds is its spread. The verdict says whether the effect has the sign the paper
reports and is larger than twice that spread; otherwise the seeds cannot tell.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from ..doctor import cpu_model
from ..plots import read_metrics
from .ablations import AUX_ALPHAS, BY_NAME, GAMMAS, SCOPE_ALPHA, VARIANTS, run_dir

METRICS = {"val_loss": "validation loss", "maxvio_global": "MaxVio_global",
           "maxvio_batch": "MaxVio_batch", "tokens_per_s": "tokens/s"}
RESULTS_JSON = "ablations_results.json"  # beside results.md
BASE_ALPHA = f"aux-loss-{SCOPE_ALPHA:g}"  # the loss-controlled baseline of the papers' tables


@dataclass(frozen=True)
class Finding:
    """A claim of a paper, as a comparison of two variants on one metric (lower = better)."""

    claim: str
    baseline: str
    treatment: str
    metric: str
    paper: str  # the paper's own numbers, baseline -> treatment


FINDINGS = (
    Finding("aux-loss-free balancing beats the loss-controlled baseline on quality",
            BASE_ALPHA, "aux-free", "val_loss",
            "Wang et al. 2024 Table 2, 1B: perplexity 9.56 -> 9.50; V3 Table 5: Pile BPB "
            "0.727 -> 0.724 (small MoE), 0.656 -> 0.652 (large MoE)"),
    Finding("... and on balance", BASE_ALPHA, "aux-free", "maxvio_global",
            "Wang et al. 2024 Table 2, 1B: MaxVio_global 0.72 -> 0.04"),
    Finding("... and on the balance of each training batch", BASE_ALPHA, "aux-free",
            "maxvio_batch", "Wang et al. 2024 Fig. 3: MaxVio_batch lower throughout training"),
    Finding("some balancing is needed: without any, routing is uneven", "none", "aux-free",
            "maxvio_global", "no number: the motivation of every balancing method"),
    Finding("MTP (D = 1, lambda = 0.3) improves the main model at equal steps", "no-mtp",
            "aux-free", "val_loss",
            "V3 Table 4: Pile BPB 0.729 -> 0.729 (small MoE), 0.658 -> 0.657 (large MoE)"),
    Finding("... and at equal wall-clock (D = 0 gets the seconds of D = 1)",
            "no-mtp-same-time", "aux-free", "val_loss",
            "no number: the report compares at equal tokens, not equal time"),
    Finding("a batch-wise balance loss beats a sequence-wise one at the same alpha",
            f"seq-aux-{SCOPE_ALPHA:g}", BASE_ALPHA, "val_loss",
            "V3 sec. 4.5.3, 1B MoE: validation loss 2.258 (sequence-wise) -> 2.253 "
            "(batch-wise); aux-loss-free 2.253"),
    Finding("aux-loss-free beats the sequence-wise balance loss", f"seq-aux-{SCOPE_ALPHA:g}",
            "aux-free", "val_loss", "V3 sec. 4.5.3, 1B MoE: 2.258 -> 2.253"),
    Finding("the MoE beats its dense twin of equal activated parameters at equal steps",
            "dense", "no-mtp", "val_loss",
            "no V3 number; the premise of DeepSeekMoE (arXiv 2401.06066)"),
    Finding("... and at equal wall-clock (the dense twin gets the MoE's seconds)",
            "dense-same-time", "no-mtp", "val_loss",
            "no number: papers compare at equal FLOPs, which a CPU does not turn into "
            "equal time"),
    *(Finding(f"gamma = 1e-3 balances better than gamma = {g:g}", f"gamma-{g:g}", "aux-free",
              "maxvio_global",
              "Wang et al. 2024 sec. 4 (update rate u): 1e-3 is the best of 1e-4, 1e-3, 1e-2; "
              "1e-4 converges too slowly, 1e-2 fluctuates") for g in GAMMAS),
    *(Finding(f"gamma = 1e-3 gives a loss no worse than gamma = {g:g}", f"gamma-{g:g}",
              "aux-free", "val_loss", "as above") for g in GAMMAS),
)


# ---------------------------------------------------------------- numbers

def by_variant(results: Iterable[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> result."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        table.setdefault(r["variant"], {})[r["seed"]] = r
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def fmt(values: list[float], digits: int) -> str:
    """'m ± s' over seeds, or just 'm' for one seed; '—' when there is nothing to show."""
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:,.{digits}f}" if math.isnan(s) else f"{m:,.{digits}f} ± {s:,.{digits}f}"


DIGITS = {"val_loss": 4, "maxvio_global": 3, "maxvio_batch": 3, "tokens_per_s": 0}


def variant_table(results: Iterable[dict[str, Any]]) -> str:
    """The markdown table of every variant: mean ± std over its seeds."""
    table = by_variant(results)
    lines = ["| variant | seeds | steps | " + " | ".join(METRICS.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(METRICS)]
    for v in VARIANTS:
        if v.name not in table:
            continue
        runs = list(table[v.name].values())
        low, high = min(r["steps"] for r in runs), max(r["steps"] for r in runs)
        steps = str(low) if low == high else f"{low}–{high}"  # the wall-clock twins vary
        cells = [fmt([r[m] for r in runs if r[m] is not None], DIGITS[m]) for m in METRICS]
        lines.append(f"| {v.label} (`{v.name}`) | {len(runs)} | {steps} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    """treatment - baseline on one metric, paired by seed."""

    seeds: tuple[int, ...]  # the seeds with both runs
    baseline: float  # mean over those seeds
    treatment: float
    effect: float  # mean of the paired differences
    spread: float  # their standard deviation over seeds (NaN for one seed)
    wins: int  # seeds where the treatment is lower (better)
    seed_std: float  # mean over the two variants of one run's seed-to-seed std

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def outcome(self) -> str:
        """'better' or 'worse' (the treatment, beyond twice the spread), 'tie' or 'one seed'."""
        if self.n < 2:
            return "one seed"
        if abs(self.effect) <= 2 * self.spread:
            return "tie"
        return "better" if self.effect < 0 else "worse"

    @property
    def verdict(self) -> str:
        seeds = f"better in {self.wins} of {self.n} seeds"
        return {"one seed": "one seed: no spread to judge against",
                "tie": f"not resolved ({seeds}): the effect is within twice its spread",
                "better": f"reproduces ({seeds})",
                "worse": f"does not reproduce: worse beyond the spread ({seeds})"}[self.outcome]


def compare(results: Iterable[dict[str, Any]], baseline: str, treatment: str, metric: str
            ) -> Comparison | None:
    """The paired comparison, or None when no seed has both runs with the metric."""
    table = by_variant(results)
    base, treat = table.get(baseline, {}), table.get(treatment, {})
    seeds = sorted(s for s in base.keys() & treat.keys()
                   if base[s][metric] is not None and treat[s][metric] is not None)
    if not seeds:
        return None
    diffs = [treat[s][metric] - base[s][metric] for s in seeds]
    effect, spread = mean_std(diffs)
    means, stds = zip(*(mean_std([runs[s][metric] for s in seeds]) for runs in (base, treat)))
    return Comparison(seeds=tuple(seeds), baseline=means[0], treatment=means[1], effect=effect,
                      spread=spread, wins=sum(d < 0 for d in diffs),
                      seed_std=statistics.fmean(stds))


def comparisons(results: list[dict[str, Any]]) -> list[tuple[Finding, Comparison]]:
    """Every finding whose two variants were both run, with its comparison."""
    found = [(f, compare(results, f.baseline, f.treatment, f.metric)) for f in FINDINGS]
    return [(f, c) for f, c in found if c is not None]


def findings_table(results: list[dict[str, Any]]) -> str:
    lines = ["| claim | metric | papers' numbers (baseline -> treatment) | ours: baseline "
             "-> treatment (means) | effect ± spread (paired) | one run's seed std | verdict |",
             "|---|---|---|---|---|---|---|"]
    for f, c in comparisons(results):
        digits = DIGITS[f.metric]
        ours = f"{c.baseline:.{digits}f} -> {c.treatment:.{digits}f}"
        spread = "" if math.isnan(c.spread) else f" ± {c.spread:.{digits}f}"
        seed_std = "—" if math.isnan(c.seed_std) else f"{c.seed_std:.{digits}f}"
        lines.append(f"| {f.claim} (`{f.baseline}` -> `{f.treatment}`) | {METRICS[f.metric]} "
                     f"| {f.paper} | {ours} | {c.effect:+.{digits}f}{spread} | {seed_std} "
                     f"| {c.verdict} |")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    """How many findings reproduce, are unresolved, or do not reproduce."""
    verdicts = [c.verdict.split(" ")[0] for _, c in comparisons(results)]
    counts = {word: verdicts.count(word) for word in ("reproduces", "not", "does", "one")}
    return (f"Of {len(verdicts)} findings, **{counts['reproduces']} reproduce**, "
            f"{counts['not']} are not resolved by the seeds, {counts['does']} do not reproduce"
            + (f" and {counts['one']} have a single seed" if counts["one"] else "") + ".")


def alpha_table(results: list[dict[str, Any]]) -> str | None:
    """The loss-controlled baseline for every alpha against aux-loss-free, on both axes:
    the claim holds for an alpha when aux-loss-free is better on one axis beyond the
    spread and not worse on the other."""
    rows = []
    for alpha in AUX_ALPHAS:
        axes = {metric: compare(results, f"aux-loss-{alpha:g}", "aux-free", metric)
                for metric in ("val_loss", "maxvio_global")}
        if None in axes.values():
            continue
        cells = []
        for metric, c in axes.items():  # printed as aux loss - aux-free: the baseline's view
            spread = "" if math.isnan(c.spread) else f" ± {c.spread:.{DIGITS[metric]}f}"
            cells.append(f"{-c.effect:+.{DIGITS[metric]}f}{spread}")
        outcomes = {METRICS[metric]: c.outcome for metric, c in axes.items()}
        better = [axis for axis, o in outcomes.items() if o == "better"]
        worse = [axis for axis, o in outcomes.items() if o == "worse"]
        if "one seed" in outcomes.values():
            claim = "one seed: no spread to judge against"
        elif worse:
            claim = f"fails: this alpha is better on {' and '.join(worse)}"
        elif better:
            claim = (f"holds: aux-loss-free is better on {' and '.join(better)}"
                     + ("" if len(better) == 2 else ", a tie within the spread on the other"))
        else:
            claim = "not resolved: both differences are within twice their spread"
        rows.append(f"| {alpha:g} | {cells[0]} | {cells[1]} | {claim} |")
    if not rows:
        return None
    return "\n".join(["| alpha | val loss: aux loss - aux-free | MaxVio_global: aux loss - "
                      "aux-free | aux-loss-free better on one axis, no worse on the other? |",
                      "|---:|---:|---:|---|", *rows])


# ---------------------------------------------------------------- figures

def _mean_curve(out_dir: Path, name: str, seeds: Iterable[int],
                value: Callable[[dict[str, Any]], float | None]) -> tuple[list[int], list[float]]:
    """(steps, mean over seeds) of ``value(record)`` where it is not None, at the steps
    where every seed has it."""
    per_seed = []
    for seed in seeds:
        records = read_metrics(run_dir(out_dir, name, seed) / "metrics.jsonl")
        per_seed.append({r["step"]: value(r) for r in records if value(r) is not None})
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    return steps, [statistics.fmean(c[s] for c in per_seed) for s in steps]


def maxvio_figure(results: list[dict[str, Any]], out_dir: Path) -> Figure:
    """MaxVio_batch over training (main MoE layers, mean over seeds), per balancing method."""
    table = by_variant(results)
    groups = [("balancing method", ["aux-free", *[f"aux-loss-{a:g}" for a in AUX_ALPHAS],
                                    f"seq-aux-{SCOPE_ALPHA:g}", "none"]),
              ("bias update speed gamma", ["aux-free", *[f"gamma-{g:g}" for g in GAMMAS]])]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, (title, names) in zip(fig.subplots(1, 2, sharey=True), groups):
        for name in (n for n in names if n in table):
            n_main = next(iter(table[name].values()))["n_main_moe_layers"]

            def main_layers(record: dict[str, Any], n_main: int = n_main) -> float | None:
                layers = record.get("maxvio_train_per_layer")
                return None if layers is None else statistics.fmean(layers[:n_main])

            ax.plot(*_mean_curve(out_dir, name, table[name], main_layers),
                    label=BY_NAME[name].label, lw=1.4)
        ax.set(yscale="log", xlabel="training step", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.axes[0].set_ylabel("MaxVio_batch (mean over main MoE layers and seeds)")
    return fig


def val_loss_figure(results: list[dict[str, Any]], out_dir: Path) -> Figure:
    """Left: every run's final validation loss (dots) with mean ± std per variant.
    Right: validation loss over seconds of training for the MTP and sparsity runs."""
    table = by_variant(results)
    names = [v.name for v in VARIANTS if v.name in table]
    fig = Figure(figsize=(12, 0.45 * len(names) + 2.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.2, 1))
    for i, name in enumerate(names):
        values = [r["val_loss"] for r in table[name].values()]
        m, s = mean_std(values)
        left.plot(values, [i] * len(values), "o", color="0.6", ms=4)
        left.errorbar(m, i, xerr=0 if math.isnan(s) else s, fmt="D", color="C0", capsize=4)
    left.set_yticks(range(len(names)), [BY_NAME[n].label for n in names], fontsize=8)
    left.invert_yaxis()
    left.set(xlabel="final validation loss, whole split (nats/char)",
             title="every run (grey) and mean ± std over seeds")
    left.grid(alpha=0.3, axis="x")
    for name in [n for n in ("aux-free", "no-mtp", "dense", "no-mtp-same-time",
                             "dense-same-time") if n in table]:
        steps, curve = _mean_curve(out_dir, name, table[name], lambda r: r.get("val_loss"))
        seconds = statistics.fmean(r["train_seconds"] / r["steps"] for r in table[name].values())
        dashed = "--" if name.endswith("same-time") else "-"
        right.plot([s * seconds for s in steps], curve, dashed, marker="o", ms=3,
                   label=BY_NAME[name].label)
    right.set(xlabel="seconds of training steps", ylabel="validation loss (mean over seeds)",
              title="MTP and sparsity against the clock")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- the page

def machine() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_page(results: list[dict[str, Any]], out_dir: Path, docs: Path, command: str) -> Path:
    """Write ``docs/results.md`` and its figures from the results; returns the page's path."""
    docs.mkdir(parents=True, exist_ok=True)
    figures = {"ablations_maxvio.png": maxvio_figure, "ablations_val_loss.png": val_loss_figure}
    for name, draw in figures.items():
        draw(results, out_dir).savefig(docs / name, dpi=110)
    table = by_variant(results)
    seeds = sorted({r["seed"] for r in results})
    steps = sorted({r["steps"] for r in results if not BY_NAME[r["variant"]].same_time_as})
    hours = sum(r["wall_seconds"] for r in results) / 3600
    alphas = alpha_table(results)
    parts = [
        "# Ablations at toy scale, beside the papers' numbers",
        "",
        f"Written by `{command}` from the runs in `{out_dir}`; do not edit by hand. "
        f"{len(results)} training runs: {len(table)} variants x {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}), {'/'.join(map(str, steps))} steps each "
        f"(the equal-wall-clock twins: as many as their seconds allow), "
        f"{hours * 60:.0f} minutes in all on {machine()}.",
        "",
        "Each run is `python -m minidsv3.train` on Shakespeare with the default recipe "
        "(the toy preset: MLA, 1 shared + 8 routed experts, top-2 of 4 groups, MTP D = 1) "
        "and one change; within a seed, every variant reads the same batches in the same "
        "order. `minidsv3/experiments/ablations.py` lists the variants; "
        f"`{RESULTS_JSON}` holds every run's numbers.",
        "",
        "- **validation loss**: cross-entropy of the main head on the whole validation split "
        "after the last step, nats per character;",
        "- **MaxVio** = (max load - mean load) / mean load, as the auxiliary-loss-free paper "
        "defines it: *MaxVio_global* on the loads summed over the whole validation split, "
        "*MaxVio_batch* on the loads of each training step, averaged over the logged steps "
        "(every 10th); both averaged over the main model's MoE layers;",
        "- **tokens/s**: training tokens per second of training step (median over logged "
        "intervals), the runs taken one after another on this machine.",
        "",
        "## Findings",
        "",
        "Effect = mean over seeds of (treatment - baseline), paired by seed; spread = its "
        "standard deviation; lower is better for every metric. A finding *reproduces* when "
        "the effect has the paper's sign and exceeds twice its spread.",
        "",
        summary(results),
        "",
        findings_table(results),
        "",
    ]
    if alphas:
        parts += ["## The loss-controlled baseline for every alpha", "",
                  "The auxiliary-loss-free paper's point: a balance loss trades quality for "
                  "balance, and no alpha gets both. Differences to aux-loss-free, mean ± "
                  "spread over seeds, paired (negative = the balance loss is better):", "",
                  alphas, ""]
    parts += ["## Every variant", "", variant_table(results), "",
              "## Figures", "",
              "![MaxVio_batch over training](ablations_maxvio.png)", "",
              "![validation loss per variant](ablations_val_loss.png)", "",
              "In the right-hand panel the points before the last are evaluations on 10 "
              "validation batches; the last is the whole split.", ""]
    page = docs / "results.md"
    page.write_text("\n".join(parts), encoding="utf-8")
    # Every run's numbers, for anyone who wants to test the page's arithmetic themselves.
    (docs / RESULTS_JSON).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return page
