"""A training run's set-up: device, corpus, tokenizer, config, model, sharding, optimizer,
resume.

``set_up`` turns the parsed command line into a ``Run`` -- everything the training loop
(train.py) needs, restored from the run directory's checkpoint with ``--resume`` -- and
``save_run`` writes that state back as a checkpoint. The optimizer follows the report's
recipe (sec. 4.2): AdamW with beta = (0.9, 0.95), weight decay on matrices only, linear
warm-up, then cosine decay.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint, rundir, sharding
from .budget import TimeBudget
from .data import CorpusDownloadError, load_corpus, prepare_corpus, split_train_val
from .fp8 import convert_to_fp8
from .model import DeepSeekV3, set_seed
from .tokenizer import BPETokenizer, Tokenizer
from .train_cli import adopt_saved_args, check_args, fp8_recipe, make_config


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; an explicit choice must be available."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        name = next(kind for kind, ok in available.items() if ok)
    elif not available[name]:
        raise ValueError(f"--device {name} is not available on this machine; use --device auto")
    if name == "cuda":  # one GPU per process under torchrun
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices (and the embedding); never norm weights or other vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def resume_errors(parser: argparse.ArgumentParser, out: Path) -> Iterator[None]:
    """Turn a damaged checkpoint, or one of another model, into a clean --resume error."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:  # checkpoint.py names the file
        parser.error(f"--resume: {err}")
    except (RuntimeError, KeyError, TypeError) as err:  # optimizer or RNG state that won't fit
        parser.error(f"--resume: {out / 'state.pt'} does not fit this run ({err!r}); it was "
                     "not written by this run's training")


@dataclass
class Run:
    """What the training loop works on; ``step`` is the last step taken."""

    args: argparse.Namespace
    out: Path
    tokenizer: Tokenizer
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    model: DeepSeekV3
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_rng: torch.Generator  # the data position
    step: int
    meshes: sharding.Meshes | None  # None in one process
    budget: TimeBudget | None  # None without --time-budget


def set_up(args, given: set[str], parser, rank: int, world: int, device: torch.device) -> Run:
    """Everything a run needs, new or resumed; a new run saves its step-0 checkpoint."""
    out = Path(args.out)
    if args.resume:
        with resume_errors(parser, out):
            state = checkpoint.load_state(out)
            args = adopt_saved_args(args, state["args"], given, parser)
    check_args(args, parser, world)
    if args.fp8 and device.type == "mps":
        parser.error("--fp8 simulates the FP8 GEMMs in float64, which MPS does not have; "
                     "use --device cpu (or cuda)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.barrier()  # every rank has checked --out before rank 0 writes to it

    # Rank 0 prepares the corpus (maybe downloading it) before the others read it.
    try:
        if rank == 0:
            corpus = prepare_corpus(args.text, args.data_dir)
        if world > 1:
            dist.barrier()
        if rank != 0:
            corpus = prepare_corpus(args.text, args.data_dir, verbose=False)
        text, tokenizer = load_corpus(corpus)
        # The cut is made in the text, by characters, so that every tokenizer validates on
        # the same text, and a BPE learns its merges without ever seeing that text.
        train_text, val_text = split_train_val(text)
    except (CorpusDownloadError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.tokenizer == "bpe":  # deterministic: every rank, and a resume, trains the same
        tokenizer = BPETokenizer.train(train_text, args.vocab_size)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    window = args.seq_len + 1  # the validation split, too, must hold one whole window
    if len(val_ids) < window:
        parser.error(f"{corpus} has {len(text):,} characters, too few for --seq-len "
                     f"{args.seq_len}: its last tenth (the validation split) is "
                     f"{len(val_ids):,} tokens, but one window needs seq_len + 1 = {window}; "
                     "use a longer --text or a shorter --seq-len")

    if args.resume:
        with resume_errors(parser, out):
            cfg, saved_tokenizer = checkpoint.load_config(out), checkpoint.load_tokenizer(out)
        if saved_tokenizer != tokenizer:
            parser.error(f"the tokenizer of the corpus {corpus} with --tokenizer "
                         f"{args.tokenizer} ({tokenizer!r}) differs from the one of the run in "
                         f"{out} ({saved_tokenizer!r}): another text gives other characters or "
                         "merges. Resume with the corpus and --tokenizer the run was trained "
                         "with")
    else:
        try:
            cfg = make_config(args, tokenizer)
        except ValueError as err:
            parser.error(str(err))

    set_seed(args.seed)  # same initial weights on every rank
    model = DeepSeekV3(cfg).to(device)
    if args.resume:  # into the whole model, every key and shape checked, before sharding
        with resume_errors(parser, out):
            checkpoint.load_weights(model, out)
    if args.fp8:  # same Parameters under the same names: optimizer and checkpoints unchanged
        convert_to_fp8(model, fp8_recipe(args))
    meshes = None
    if world > 1:
        try:
            meshes = sharding.make_meshes(world, args.ep, device)
            sharding.shard_model(model, meshes)
        except ValueError as err:  # a layout that does not divide the experts or the ranks
            parser.error(str(err))
    # Zero (not None) gradients for every parameter, kept between steps: an expert that
    # received no token still gets an AdamW update from zero gradients, whatever the
    # number of ranks, so 1 and N processes (and a resumed run) do the same arithmetic.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.min_lr_ratio))
    data_rng = torch.Generator().manual_seed(args.seed)  # the data position
    step = 0
    if args.resume:
        with resume_errors(parser, out):
            sharding.load_full_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            data_rng.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            step = state["step"]
        if rank == 0:
            rundir.truncate_records(out / "metrics.jsonl", step)
    budget = None
    if args.time_budget is not None:  # a resumed run continues its budget and plan
        saved = (state.get("budget") or {}) if args.resume else {}
        # BudgetTooShort (a warm-up too short to time): train() makes it a usage error.
        budget = TimeBudget(args.time_budget, step, args.warmup, world, device, **saved)

    r = Run(args, out, tokenizer, train_ids, val_ids, model, optimizer, scheduler, data_rng,
            step, meshes, budget)
    if not args.resume:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        save_run(r, rank, world)  # step 0: from now on --resume always has something to start from
    return r


def save_run(r: Run, rank: int, world: int) -> None:
    """Checkpoint ``r`` at ``r.step``. Every rank takes part in gathering the full state and
    rank 0 writes it, or refuses to (NonFiniteTensor) if a tensor is NaN or infinite --
    then every rank raises, so that all stop together."""
    weights, optimizer_state = sharding.full_state(r.model, r.optimizer)
    now = {"step": r.step, "optimizer": optimizer_state,
           "scheduler": r.scheduler.state_dict(), "data_rng": r.data_rng.get_state(),
           "torch_rng": torch.get_rng_state(), "args": vars(r.args),
           "budget": r.budget.state() if r.budget else None}
    refused = None
    if rank == 0:
        try:
            checkpoint.save_checkpoint(r.out, r.model, r.tokenizer, now, weights)
        except checkpoint.NonFiniteTensor as err:
            refused = err
    if world > 1:  # rank 0 tells the others
        flag = torch.tensor([float(refused is not None)])
        dist.broadcast(flag, src=0)
        if flag.item() and refused is None:
            refused = checkpoint.NonFiniteTensor("rank 0 refused to save a non-finite tensor")
    if refused is not None:
        raise refused
