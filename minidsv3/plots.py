"""Pictures of a training run, drawn from its ``metrics.jsonl``.

* ``loss.png``        -- training loss (CE + MTP + balance) and validation CE over steps;
* ``maxvio.png``      -- MaxVio (max load / mean load - 1) over steps: per training step,
                         and at evaluations per validation batch and over the whole split;
* ``expert_load.png`` -- heatmap of each MoE layer's expert loads on the validation
                         set at the last evaluation, as a multiple of the mean load;
* ``bias.png``        -- every routing bias b_i over steps, one panel per MoE layer;
* ``fanout.png``      -- with expert parallelism: ranks each token is sent to (mean and
                         largest) and all-to-all bytes per step, per MoE layer;
* ``wallclock.png``   -- ``bench wallclock``: several runs' validation CE against seconds
                         of training steps, so recipes of different step speed line up.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so saving them works
without a display and does not touch a notebook's backend; notebooks can show the
returned figures directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
    """(steps, values) of the records that have ``key``."""
    rows = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in rows], [v for _, v in rows]


def loss_figure(records: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(*_series(records, "loss"), label="train loss (CE + MTP + balance)", alpha=0.7)
    ax.plot(*_series(records, "ce"), label="train CE", alpha=0.7)
    steps, val = _series(records, "val_loss")
    ax.plot(steps, val, "o-", label="validation CE")
    if val:
        ax.annotate(f"{val[-1]:.3f}", (steps[-1], val[-1]), textcoords="offset points",
                    xytext=(0, 8), ha="center")
    ax.set(xlabel="step", ylabel="nats per token", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def maxvio_figure(records: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(*_series(records, "maxvio_train"), label="training step (all MoE layers)", alpha=0.5)
    ax.plot(*_series(records, "maxvio_batch"), "o-", label="validation, per batch")
    ax.plot(*_series(records, "maxvio_global"), "s-", label="validation, whole split")
    ax.set(xlabel="step", ylabel="MaxVio (mean over layers)", title="load imbalance (0 = even)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def load_heatmap_figure(records: list[dict[str, Any]], layer_names: list[str] | None = None
                        ) -> Figure:
    """Loads of the last evaluation, divided by the mean load of their layer."""
    steps, loads = _series(records, "val_load")
    if not loads:
        raise ValueError("no evaluation with expert loads in these records (a dense model?)")
    rows = [[v * len(layer) / sum(layer) for v in layer] for layer in loads[-1]]
    names = (layer_names or [f"MoE layer {i}" for i in range(len(rows))])[: len(rows)]
    fig = Figure(figsize=(2.0 + 0.75 * len(rows[0]), 1.4 + 0.6 * len(rows)), layout="constrained")
    ax = fig.subplots()
    # The colours span the data around 1 (the fair share), so that a balanced run's 0.93 and
    # 1.10 are told apart instead of both looking white on a fixed 0..2 scale.
    span = max(0.05, max(abs(v - 1) for row in rows for v in row))
    image = ax.imshow(rows, cmap="coolwarm", vmin=1 - span, vmax=1 + span, aspect="auto")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
    ax.set(xlabel="routed expert", yticks=range(len(rows)), yticklabels=names,
           title=f"expert load / mean load (validation, step {steps[-1]})")
    fig.colorbar(image, ax=ax)
    return fig


def bias_figure(records: list[dict[str, Any]], layer_names: list[str] | None = None) -> Figure:
    steps, biases = _series(records, "bias")  # biases[t][layer][expert]
    if not biases:
        raise ValueError("no routing biases in these records (a dense model?)")
    n_layers = len(biases[0])
    names = layer_names or [f"MoE layer {i}" for i in range(n_layers)]
    fig = Figure(figsize=(7, 2.2 * n_layers), layout="constrained")
    axes = fig.subplots(n_layers, 1, sharex=True, squeeze=False)[:, 0]
    n_experts = len(biases[0][0])
    for layer, ax in enumerate(axes):
        for expert in range(n_experts):  # expert i has the same colour in every panel
            ax.plot(steps, [b[layer][expert] for b in biases], lw=1, color=f"C{expert % 10}",
                    label=f"expert {expert}")
        ax.set(ylabel="bias b_i", title=names[layer])
        ax.grid(alpha=0.3)
    if n_experts <= 10:  # one legend for all panels, above them, while colours are distinct
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center",
                   ncol=n_experts, fontsize=7)
    axes[-1].set_xlabel("step")
    return fig


def fanout_figure(records: list[dict[str, Any]], layer_names: list[str] | None = None,
                  topk_group: int | None = None) -> Figure:
    """Node-limited routing made visible: fan-out and traffic of the all-to-alls."""
    steps, mean = _series(records, "fanout_mean")  # mean[t][layer]
    if not steps:
        raise ValueError("no fan-out in these records (trained without --ep?)")
    _, largest = _series(records, "fanout_max")
    _, sent = _series(records, "alltoall_bytes")
    names = layer_names or [f"MoE layer {i}" for i in range(len(mean[0]))]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    reach, traffic = fig.subplots(1, 2)
    for layer, name in enumerate(names):
        line, = reach.plot(steps, [m[layer] for m in mean], label=f"{name} mean")
        reach.plot(steps, [m[layer] for m in largest], ls=":", color=line.get_color(),
                   label=f"{name} largest")
        traffic.plot(steps, [b[layer] / 2**20 for b in sent], label=name)
    if topk_group:
        reach.axhline(topk_group, color="k", lw=0.8, label=f"topk_group = {topk_group}")
    reach.set(xlabel="step", ylabel="ranks per token", title="fan-out of the dispatch")
    traffic.set(xlabel="step", ylabel="MiB per step (all ranks)",
                title="all-to-all bytes (dispatch + combine)")
    for ax in (reach, traffic):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def wallclock_figure(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """Validation CE over seconds of training steps, one line per run (label -> records)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for label, records in runs.items():
        rows = [(r["train_seconds"], r["val_loss"]) for r in records if "val_loss" in r]
        seconds, val = [s for s, _ in rows], [v for _, v in rows]
        # The final loss goes in the legend: the runs end close together, where labels collide.
        ax.plot(seconds, val, "o-", label=f"{label}: {val[-1]:.3f} at the end")
    ax.set(xlabel="seconds of training steps", ylabel="validation CE (nats per character)",
           title="the same training time: which recipe learns most?")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def moe_layer_names(run_dir: str | Path) -> list[str] | None:
    """'layer i' for each MoE block (main, then MTP) from the run's config.json, if present."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    main = [f"layer {i}" for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])]
    return main + [f"MTP {k + 1}" for k in range(cfg["num_nextn_predict_layers"])]


def save_plots(run_dir: str | Path) -> list[Path]:
    """Draw every plot the run's records allow into ``run_dir``; returns the PNG paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    names = moe_layer_names(run_dir)
    figures = {"loss.png": loss_figure(records)}
    if any("bias" in r for r in records):  # a model with MoE layers
        figures["maxvio.png"] = maxvio_figure(records)
        figures["bias.png"] = bias_figure(records, names)
    if any("val_load" in r for r in records):
        figures["expert_load.png"] = load_heatmap_figure(records, names)
    if any("fanout_mean" in r for r in records):
        figures["fanout.png"] = fanout_figure(records, names)
    paths = []
    for name, fig in figures.items():
        fig.savefig(run_dir / name, dpi=110)
        paths.append(run_dir / name)
    return paths
