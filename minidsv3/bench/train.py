"""Training throughput on this machine: ``python -m minidsv3.bench train``.

Prints, from one run:

1. the fp32 matmul peak of this machine: the best FLOP/s of large square matmuls;
2. tokens/s of three models: the default recipe (MoE + MTP), the same model without
   MTP, and its *dense twin* -- no MoE and no MTP: ``first_k_dense_replace =
   num_hidden_layers``, so every block uses a dense SwiGLU of ``intermediate_size``. The
   toy preset sets ``intermediate_size = moe_intermediate_size x (n_shared_experts +
   num_experts_per_tok)``, as the released model does (18432 = 9 x 2048), so the MoE and
   its twin do the same matmul work per token; the step-time ratios MoE / dense twin
   (the price of routing) and MoE + MTP / MoE (the price of MTP) are printed apart;
3. achieved FLOP/s = tokens/s x (6 N_active + attention) per token
   (``scale.flops_per_token``), as a share of the measured peak;
4. seconds per step split into forward, backward, optimizer (clip + AdamW) and the
   routing-bias update.

Inputs are random token ids (routing stays near balanced); the medians of the timed
steps are reported, so one slow step on a shared machine does not skew them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..config import PRESETS, ModelConfig
from ..model import DeepSeekV3, set_seed
from ..scale import flops_per_token, parameter_counts
from ..train_setup import param_groups
from . import int_at_least

PHASES = ("forward", "backward", "optimizer", "bias update")
# The models are trained for real on the CPU: past ~1e8 parameters one step takes minutes
# (the toy has 1.3M), and the released configuration would not even fit in memory.
MAX_PARAMETERS = 10**8


def matmul_peak(seconds: float = 2.0, windows: int = 5) -> tuple[float, int]:
    """Best fp32 FLOP/s over a few square sizes, and the size that reached it.

    Each size is timed in several short windows and the best one counts: a peak is
    what the machine *can* do, and on a shared machine a long average would mix in
    the other work's share.
    """
    best, best_n = 0.0, 0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: allocation and thread start
        for _ in range(windows):
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / (3 * windows):
                a @ b
                runs += 1
            flops = 2 * n**3 * runs / (time.perf_counter() - start)
            if flops > best:
                best, best_n = flops, n
    return best, best_n


class TrainingStep:
    """One model's training step on a fixed batch of random tokens, timed phase by phase."""

    def __init__(self, cfg: ModelConfig, batch: int, seq_len: int):
        set_seed(0)
        self.model = DeepSeekV3(cfg)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.1), lr=1e-3,
                                           betas=(0.9, 0.95))
        self.x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
        self.y = torch.randint(0, cfg.vocab_size, (batch, seq_len))

    def __call__(self) -> tuple[float, ...]:
        """Seconds of each of PHASES."""
        model, optimizer = self.model, self.optimizer
        t0 = time.perf_counter()
        out = model(self.x, self.y)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        t3 = time.perf_counter()
        for moe in model.moe_layers():
            moe.update_bias(0.001)
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def interleaved_medians(runs: dict[str, Callable[[], Sequence[float]]], steps: int, warmup: int
                        ) -> dict[str, list[float]]:
    """Median of each timed part of every run, the runs taking turns step by step.

    Taking turns (a, b, c, a, b, c, ...) rather than timing a, then b, then c makes
    the ratios between them robust: a slow spell of a shared machine hits every run
    alike instead of whichever happened to be measured then.
    """
    samples: dict[str, list[Sequence[float]]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():
            seconds = run()
            if i >= warmup:
                samples[name].append(seconds)
    return {name: [statistics.median(part) for part in zip(*s)] for name, s in samples.items()}


def without_mtp(cfg: ModelConfig) -> ModelConfig:
    """The same model with no multi-token-prediction module (D = 0)."""
    return cfg.replace(num_nextn_predict_layers=0)


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """No MoE and no MTP: every block a dense SwiGLU of the activated expert width.

    Refuses configs whose dense FFN is not the activated width, whose twin would do
    different work per token.
    """
    active = cfg.moe_intermediate_size * (cfg.n_shared_experts + cfg.num_experts_per_tok)
    if cfg.intermediate_size != active:
        raise ValueError(f"intermediate_size={cfg.intermediate_size} differs from the activated "
                         f"expert width {active} = moe_intermediate_size x (n_shared_experts + "
                         "num_experts_per_tok), so a dense twin would not do equal work")
    return without_mtp(cfg).replace(first_k_dense_replace=cfg.num_hidden_layers)


def benchmark_configs(args: argparse.Namespace, parser: argparse.ArgumentParser
                      ) -> list[tuple[str, ModelConfig]]:
    """The MoE config and its dense twin, or a usage error that says why not."""
    moe = ModelConfig.preset(args.preset, vocab_size=args.vocab_size)
    n_params = parameter_counts(moe).total
    if n_params > MAX_PARAMETERS:
        parser.error(f"--preset {args.preset} has {n_params:,} parameters; this benchmark trains "
                     f"on the CPU and takes at most {MAX_PARAMETERS:,} (use --preset toy)")
    try:
        dense = dense_twin(moe)
    except ValueError as e:
        parser.error(f"--preset {args.preset} has no dense twin: {e}")
    if not moe.num_nextn_predict_layers < args.seq_len <= moe.max_position_embeddings:
        parser.error(f"--seq-len {args.seq_len} must be in ({moe.num_nextn_predict_layers}, "
                     f"max_position_embeddings={moe.max_position_embeddings}]")
    return [("MoE + MTP", moe), ("MoE", without_mtp(moe)), ("dense twin", dense)]


def add_step_options(parser: argparse.ArgumentParser) -> None:
    """The options of every training-step benchmark: model, batch, steps, threads."""
    parser.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int_at_least(1), default=84,
                        help="the Shakespeare character vocabulary")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--seq-len", type=int_at_least(1), default=128)
    parser.add_argument("--steps", type=int_at_least(1), default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch threads (default: torch's choice)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidsv3.bench train",
        description="Tokens/s of the toy MoE vs its dense twin, FLOP/s vs this machine's "
                    "fp32 matmul peak, and the time of each phase of a step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_options(parser)
    args = parser.parse_args(argv)
    rows = benchmark_configs(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)

    peak, n = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"matmul peak: {peak / 1e9:,.1f} GFLOP/s ({n}x{n} @ {n}x{n})")
    print(f"batch {args.batch_size} x {args.seq_len} tokens; medians of {args.steps} steps "
          f"after {args.warmup} warm-up steps; random token ids\n")

    header = (f"{'model':<12}{'params':>10}{'active':>10}{'tok/s':>9}{'GFLOP/s':>9}{'% peak':>8}"
              + "".join(f"{p + ' ms':>15}" for p in PHASES) + f"{'step ms':>9}")
    print(header)
    runs = {name: TrainingStep(cfg, args.batch_size, args.seq_len) for name, cfg in rows}
    medians = interleaved_medians(runs, args.steps, args.warmup)
    steps, share = {}, {}
    for name, cfg in rows:
        steps[name] = sum(medians[name])
        tokens_per_s = args.batch_size * args.seq_len / steps[name]
        flops = tokens_per_s * flops_per_token(cfg, args.seq_len).training
        share[name] = flops / peak
        n_params = sum(p.numel() for p in runs[name].model.parameters())
        active = flops_per_token(cfg, args.seq_len).matmul / 2  # matmul weights per token
        print(f"{name:<12}{n_params:>10,}{active:>10,.0f}{tokens_per_s:>9,.0f}"
              f"{flops / 1e9:>9.1f}{100 * share[name]:>7.1f}%"
              + "".join(f"{1e3 * s:>15.1f}" for s in medians[name])
              + f"{1e3 * steps[name]:>9.1f}")
    print(f"\nMoE step / dense twin step (the price of routing): "
          f"{steps['MoE'] / steps['dense twin']:.2f}x (aim: <= 1.15x)")
    print(f"MoE + MTP step / MoE step (the price of MTP):      "
          f"{steps['MoE + MTP'] / steps['MoE']:.2f}x (aim: <= 1.20x)")
    print(f"the default recipe's step reaches {100 * share['MoE + MTP']:.0f}% of the matmul peak "
          "(aim: >= 40%)")
    print("FLOPs per token: 6 x activated matmul weights (MTP block and second head pass "
          "included) + 3 x causal attention (scale.flops_per_token)")
    return 0
