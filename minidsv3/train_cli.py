"""The command line of ``python -m minidsv3.train``: its options and their checks, the
``ModelConfig`` they make, and what ``--resume`` lets differ from the saved run.

``--resume`` continues a run unchanged, so every option written on the command line
must agree with the saved one; ``parse_command_line`` knows which were written even
when their value is the default (``--steps 1500`` is a request, not an absence).
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from typing import Any

from .budget import CALIBRATION_SKIP, CALIBRATION_STEPS
from .config import PRESETS, ModelConfig
from .fp8 import FP8Recipe
from .tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, Tokenizer, check_vocab_size

# Coefficient of the classic expert-level balance loss for ``--balance aux-loss``: the
# loss-controlled baseline of Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing",
# arXiv 2408.15664), whose experiments show larger values trading perplexity for balance.
AUX_LOSS_ALPHA = 0.001
# Loss coefficients have their own flags, which know about --balance.
LOSS_FLAGS = {"aux_loss_alpha": "--seq-alpha", "expert_aux_loss_alpha": "--aux-alpha",
              "mtp_loss_lambda": "--mtp-lambda"}
# Options that may differ when resuming: they change where or how fast, never what.
RESUME_FREE = ("resume", "out", "device", "compile", "threads", "stop_after", "ep")
MIN_WARMUP = CALIBRATION_SKIP + CALIBRATION_STEPS  # of a --time-budget: steps it can time
FLOAT_OPTIONS = ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "bias_gamma", "aux_alpha",
                 "seq_alpha", "mtp_lambda", "time_budget")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except empty ones (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minidsv3.train",
        description="Train a toy DeepSeek-V3 (MLA, DeepSeekMoE with aux-loss-free balancing, "
                    "MTP) on Shakespeare. `make train` is these defaults with --time-budget 540. "
                    "Extra KEY=VALUE arguments override ModelConfig fields.",
        epilog="Data parallel: torchrun --nproc_per_node N -m minidsv3.train [options]",
        formatter_class=_HelpFormatter)
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. hidden_size=96 n_routed_experts=16")
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="model size")
    p.add_argument("--out", default="runs/toy", help="run directory for everything written")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=int, default=1500,
                   help="optimizer steps (with --time-budget: planned, so leave it out)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="train for this many seconds of training steps (evaluations and "
                        "checkpoints not counted; the final evaluation, samples and plots run "
                        f"after it): the warm-up's steps after the first {CALIBRATION_SKIP} are "
                        "timed, and at its end --steps is planned so that the cosine schedule "
                        f"ends with the budget (budget.py); needs --warmup >= {MIN_WARMUP}; "
                        "--resume continues the plan with the budget left")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per optimizer step, over all micro-batches and ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per sequence: characters with --tokenizer char, with bpe "
                        "several characters each")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine decays to this fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--balance", choices=("aux-free", "aux-loss", "none"), default="aux-free",
                   help="aux-free: bias update (V3); aux-loss: expert-level balance loss with "
                        "--aux-alpha, no bias; none: raw scores, no balancing")
    p.add_argument("--bias-gamma", type=float, default=0.001, help="bias update speed gamma")
    p.add_argument("--aux-alpha", type=float, default=AUX_LOSS_ALPHA,
                   help="expert-level balance-loss coefficient for --balance aux-loss")
    p.add_argument("--seq-alpha", type=float, default=None,
                   help="sequence-wise balance-loss alpha (default: the preset's 0.0001 with "
                        "aux-free, 0 otherwise)")
    p.add_argument("--mtp-lambda", type=float, default=None,
                   help="MTP loss weight lambda (default: the preset's, 0.3)")
    p.add_argument("--seed", type=int, default=1337, help="seeds the weights and the batches")
    p.add_argument("--eval-every", type=int, default=300, help="steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=10,
                   help="validation batches per evaluation (the last one uses the whole split)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics records")
    p.add_argument("--ckpt-every", type=int, default=300, help="steps between checkpoints")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop with a checkpoint after this step of the --steps schedule, e.g. "
                        "to continue with --resume on another machine or number of processes")
    p.add_argument("--text", metavar="FILE",
                   help="train on this UTF-8 text instead of Shakespeare (no network needed)")
    p.add_argument("--data-dir", default="data", help="where prepared corpora live")
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char",
                   help="char: one token per distinct character of the corpus; bpe: a "
                        "byte-level BPE of --vocab-size tokens (the kind DeepSeek-V3 uses), "
                        "trained on the training split and saved as tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help=f"with --tokenizer bpe: tokens in its vocabulary, {MIN_VOCAB_SIZE}.."
                        f"{MAX_VOCAB_SIZE} (256 bytes plus merges), e.g. 1024")
    p.add_argument("--sample-chars", type=int, default=300,
                   help="characters per sample (of as many tokens, cut to this length)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--fp8", action="store_true",
                   help="run the three GEMMs of every attention, FFN and expert projection in "
                        "simulated FP8 (fp8.py, V3 report sec. 3.3); embedding, head, router "
                        "and norms stay FP32, and checkpoints hold the FP32 master weights")
    p.add_argument("--fp8-scaling", choices=("tile", "tensor"), default="tile",
                   help="with --fp8: tile = 1x128 activation tiles and 128x128 weight blocks "
                        "(V3); tensor = one scale per tensor, the baseline it replaces")
    p.add_argument("--fp8-promote-every", type=int, default=FP8Recipe.promote_every,
                   metavar="N_C",
                   help="with --fp8: add the Tensor Cores' 14-bit running sum into FP32 every "
                        "N_C elements of K (a multiple of 32); 0 = never, the whole K in 14 bits")
    p.add_argument("--ep", type=int, default=1, metavar="E",
                   help="expert parallelism under torchrun: groups of E processes share out "
                        "the routed experts of every MoE layer (1 = each holds all)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: one per core); on a machine busy with "
                        "other work, 1 is often much faster")
    return p


def _flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser, world: int) -> None:
    """Refuse values that would fail later or silently do something else."""
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches",
                 "log_every", "ckpt_every", "sample_chars", "threads", "stop_after", "ep"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in FLOAT_OPTIONS:  # NaN would pass every comparison below
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            parser.error(f"{_flag(name)} must be a finite number, got {getattr(args, name)}")
    for name in ("lr", "grad_clip", "time_budget"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"{_flag(name)} must be > 0, got {getattr(args, name)}")
    for name in ("weight_decay", "bias_gamma", "aux_alpha", "seq_alpha", "mtp_lambda"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if not args.fp8 and (args.fp8_scaling, args.fp8_promote_every) != (
            "tile", FP8Recipe.promote_every):
        parser.error("--fp8-scaling and --fp8-promote-every choose how --fp8 computes; add --fp8")
    if args.fp8_promote_every < 0 or args.fp8_promote_every % FP8Recipe.chunk:
        parser.error(f"--fp8-promote-every must be 0 (never) or a positive multiple of "
                     f"{FP8Recipe.chunk} (the products summed per Tensor-Core step), got "
                     f"{args.fp8_promote_every}")
    if args.tokenizer == "bpe":
        if args.vocab_size is None:
            parser.error(f"--tokenizer bpe needs --vocab-size N ({MIN_VOCAB_SIZE}.."
                         f"{MAX_VOCAB_SIZE}), e.g. --vocab-size 1024")
        try:
            check_vocab_size(args.vocab_size)
        except ValueError as err:
            parser.error(f"--vocab-size: {err}")
    elif args.vocab_size is not None:
        parser.error("--vocab-size sets the size of a BPE vocabulary; add --tokenizer bpe (the "
                     "character tokenizer's vocabulary is the corpus's distinct characters)")
    if args.warmup < 0 or not 0 <= args.min_lr_ratio <= 1:
        parser.error("need --warmup >= 0 and 0 <= --min-lr-ratio <= 1")
    if args.ep > 1 and world == 1:
        parser.error(f"--ep {args.ep} splits the experts over {args.ep} processes, but this is "
                     f"one process: launch with torchrun --nproc_per_node {args.ep} (or a "
                     f"multiple of {args.ep}) -m minidsv3.train ...")
    if world % args.ep:
        parser.error(f"--ep {args.ep} must divide the number of processes ({world}): the "
                     "processes split into equal expert-parallel groups")
    if args.batch_size % (args.grad_accum * world):
        parser.error(f"--batch-size {args.batch_size} must be divisible by --grad-accum "
                     f"{args.grad_accum} x {world} process(es)")


def fp8_recipe(args: argparse.Namespace) -> FP8Recipe | None:
    """The FP8Recipe that --fp8 and its options ask for; None without --fp8."""
    if not args.fp8:
        return None
    return FP8Recipe(scaling=args.fp8_scaling, promote_every=args.fp8_promote_every or None)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["hidden_size=96", ...]`` -> ``{"hidden_size": 96}``, typed like the ModelConfig field."""
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r} is not an option or a KEY=VALUE config override")
        if key not in hints:
            raise ValueError(f"unknown config field {key!r} in {pair!r}; valid fields: "
                             f"{', '.join(sorted(hints))}")
        overrides[key] = _parse_value(key, raw, hints[key])
    return overrides


def _parse_value(key: str, raw: str, kind: Any) -> Any:
    word = raw.strip().lower()
    if kind in (bool, bool | None):  # norm_topk_prob may be None ("as the release")
        if word in ("true", "1", "yes", "false", "0", "no"):
            return word in ("true", "1", "yes")
        raise ValueError(f"{key}={raw!r}: expected true or false")
    if kind in (int, float, str):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected {kind.__name__}") from None
    # rope_scaling (RopeScaling | None): 'none', or a JSON object of YaRN fields
    if word in ("none", "null"):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{key}={raw!r}: expected none or a JSON object such as "
                         '\'{"factor": 4, "original_max_position_embeddings": 128}\'')
    return value


def make_config(args: argparse.Namespace, tokenizer: Tokenizer) -> ModelConfig:
    """Preset + KEY=VALUE overrides + the flags for the loss coefficients."""
    overrides = parse_overrides(args.overrides)
    if overrides.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise ValueError(f"vocab_size comes from the tokenizer ({tokenizer!r}); do not "
                         "override it (with --tokenizer bpe, choose it with --vocab-size)")
    overrides["vocab_size"] = tokenizer.vocab_size
    for field, flag in LOSS_FLAGS.items():
        if field in overrides:
            raise ValueError(f"set {field} with {flag}, not as a KEY=VALUE override")
    default_seq_alpha = ModelConfig.preset(args.preset).aux_loss_alpha
    overrides["aux_loss_alpha"] = (args.seq_alpha if args.seq_alpha is not None
                                   else default_seq_alpha if args.balance == "aux-free" else 0.0)
    overrides["expert_aux_loss_alpha"] = args.aux_alpha if args.balance == "aux-loss" else 0.0
    if args.mtp_lambda is not None:
        overrides["mtp_loss_lambda"] = args.mtp_lambda
    cfg = ModelConfig.preset(args.preset, **overrides)
    if not cfg.num_nextn_predict_layers < args.seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} must be in ({cfg.num_nextn_predict_layers}, "
                         f"max_position_embeddings={cfg.max_position_embeddings}]")
    return cfg


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None
                       ) -> tuple[argparse.Namespace, set[str]]:
    """The options, and the names of those written on the command line, even where the
    value equals the default: ``--resume --steps 1500`` asks for 1500 steps.

    KEY=VALUE overrides may come anywhere, between options too (``parse_intermixed_args``).
    """
    args = parser.parse_intermixed_args(argv)
    unset = object()  # argparse leaves an attribute it finds already set alone
    probe = parser.parse_intermixed_args(argv,
                                         argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    # argparse always fills in the KEY=VALUE list, as [] when there is none.
    given = {key for key, value in vars(probe).items() if value is not unset and value != []}
    if {"steps", "time_budget"} <= given:
        parser.error("--time-budget plans the number of steps itself; give --time-budget or "
                     "--steps, not both")
    return args, given


def adopt_saved_args(args, saved: dict[str, Any], given: set[str], parser) -> argparse.Namespace:
    """--resume continues the saved run: the options ``given`` now must agree with it."""
    for key, value in saved.items():
        if key in RESUME_FREE or not hasattr(args, key):
            continue
        if key in given and getattr(args, key) != value:
            name = "the KEY=VALUE overrides" if key == "overrides" else _flag(key)
            parser.error(f"{name}={getattr(args, key)} differs from the resumed run's {value}; "
                         f"--resume continues a run unchanged, so leave out {name} (or give "
                         f"{value}), or use a new --out to change settings")
        setattr(args, key, value)
    return args
