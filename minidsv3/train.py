"""Train a DeepSeek-V3-architecture model from the command line: ``python -m minidsv3.train``.

The recipe is the V3 report's (sec. 4.2), scaled down to a laptop:

* loss = CE + L_MTP + L_Bal (model.py): next-token cross-entropy, lambda-weighted
  multi-token prediction, and the tiny sequence-wise balance loss;
* AdamW with beta = (0.9, 0.95) and weight decay 0.1 on weight matrices only (norm
  weights are not decayed; the routing bias is a buffer, so the optimizer never sees
  it); gradients clipped to norm 1.0; linear warm-up, then cosine decay to 10 %;
* auxiliary-loss-free balancing: after every optimizer step each MoE layer's bias
  moves by gamma * sign(mean load - load_i), from the loads of the whole step (all
  micro-batches of the gradient accumulation, all data-parallel ranks).

Data parallel: ``torchrun --nproc_per_node N -m minidsv3.train ...``. Every rank
draws the *global* batch from the same generator and keeps its own slice, so N
processes see exactly the batch one process would. The model is sharded with FSDP2
(sharding.py): gradients are averaged across ranks as they are reduce-scattered, and
expert loads are summed across ranks before the bias update, so the routing biases
stay identical everywhere. Checkpoints hold full, unsharded state keyed by parameter
name, so a run saved by N processes resumes in any number of them.

Everything a run writes lives in ``--out`` (default ``runs/toy``): the checkpoint
(checkpoint.py), the lock and ``metrics.jsonl`` (rundir.py), ``samples.txt`` and PNG
plots (plots.py). A checkpoint holds the step, optimizer, scheduler and data-generator
state, so ``--resume`` continues a killed run with exactly the losses it would have had.
Training stops, before the optimizer touches the weights, as soon as the loss or the
gradient norm is NaN or infinite, and a checkpoint is never written with a NaN or an
infinity in it, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, parallel, rundir, sharding
from .data import (
    CharTokenizer,
    CorpusDownloadError,
    get_batch,
    iterate_eval_batches,
    load_corpus,
    prepare_corpus,
    split_train_val,
)
from .generate import generate
from .model import DeepSeekV3, set_seed
from .moe import max_violation
from .mtp import cross_entropy
from .plots import save_plots
from .train_cli import adopt_saved_args, build_parser, check_args, make_config, parse_command_line

# Speaker names as the corpus writes them ("NAME." on its own line, then the speech).
SAMPLE_PROMPTS = ("KING HENRY.\n", "PORTIA.\n", "OTHELLO.\n", "ROMEO.\n")


class Diverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite."""


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


# ---------------------------------------------------------------- optimisation

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


def train_step(model, forward, optimizer, scheduler, batches, args, world,
               autocast=None, meshes: sharding.Meshes | None = None) -> dict[str, Any]:
    """One optimizer step over ``batches`` (this rank's micro-batches); returns its numbers."""
    parts = []
    traffic = parallel.StepTraffic()  # what the all-to-alls moved (expert parallelism only)
    for x, y in batches:
        with autocast or nullcontext():
            out = forward(x, y)
        traffic.add(model)
        (out.loss / len(batches)).backward()
        parts.append(torch.stack([out.loss, out.ce, out.mtp, out.balance]).detach().float())
    if meshes is not None:
        sharding.reduce_expert_gradients(model, meshes)
    losses = torch.stack(parts).mean(0)  # (4,) loss, ce, mtp, balance
    moes = model.moe_layers()
    # (L, E) tokens per expert over the whole step: sums over micro-batches and ranks.
    loads = torch.stack([m.expert_load for m in moes]) if moes else torch.zeros(0, 0)
    if world > 1:  # (FSDP has already averaged the gradients while reduce-scattering them)
        dist.all_reduce(losses)
        losses /= world
        if moes:
            dist.all_reduce(loads)
    if not all(math.isfinite(v) for v in losses.tolist()):
        raise Diverged(f"loss is {losses[0].item()}")
    grad_norm = sharding.clip_grad_norm(model, args.grad_clip, meshes)
    if not torch.isfinite(grad_norm):  # a finite loss can still have NaN gradients
        raise Diverged(f"gradient norm is {grad_norm.item()}")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep zero grads: see run()
    scheduler.step()
    for moe, load in zip(moes, loads):
        if args.balance == "aux-free":
            moe.update_bias(args.bias_gamma, load)  # b += gamma * sign(mean - load); resets
        else:
            moe.expert_load.zero_()
    loss, ce, mtp, balance = losses.tolist()
    return {"loss": loss, "ce": ce, "mtp": mtp, "balance": balance, "lr": lr,
            "grad_norm": grad_norm.item(), "loads": loads.cpu(), **traffic.summary()}


@torch.no_grad()
def evaluate(model: DeepSeekV3, val_ids: torch.Tensor, batch_size: int, seq_len: int,
             max_batches: int | None, device: torch.device, autocast) -> dict[str, Any]:
    """Validation CE of the main head (comparable across runs) and MaxVio per MoE layer.

    MaxVio_batch is the mean over evaluation batches of each batch's MaxVio; MaxVio_global
    is the MaxVio of the loads summed over all of them. Only the main layers route here
    (the MTP module needs targets), so the per-layer lists cover the main MoE layers.
    """
    model.eval()
    total, count, batch_vio, global_load = 0.0, 0, [], 0
    for x, y in iterate_eval_batches(val_ids, batch_size, seq_len, max_batches):
        with autocast:
            out = model(x.to(device))
        total += cross_entropy(out.logits, y.to(device)).item() * y.numel()
        count += y.numel()
        if out.router:
            loads = torch.stack([s.load for s in out.router]).cpu()  # (L, E)
            batch_vio.append(max_violation(loads))  # (L,)
            global_load = global_load + loads
    model.train()
    record: dict[str, Any] = {"val_loss": total / count}
    if batch_vio:
        per_batch, per_global = torch.stack(batch_vio).mean(0), max_violation(global_load)
        record.update(maxvio_batch=per_batch.mean().item(), maxvio_global=per_global.mean().item(),
                      maxvio_batch_per_layer=per_batch.tolist(),
                      maxvio_global_per_layer=per_global.tolist(), val_load=global_load.tolist())
    return record


def sample_text(model: DeepSeekV3, tokenizer: CharTokenizer, n_chars: int, seed: int) -> str:
    """Continue a few prompts (those the vocabulary can spell): the text of samples.txt.

    Seeded, so every rank of a sharded model computes the same text in step.
    """
    prompts = [p for p in SAMPLE_PROMPTS if set(p) <= set(tokenizer.vocab)] or ["\n"]
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        room = model.cfg.max_position_embeddings - len(ids)
        new = generate(model, ids, min(n_chars, room), temperature=0.8, top_k=None,
                       seed=seed + i).tokens
        texts.append(prompt + tokenizer.decode(new))
    return "\n\n----------\n\n".join(texts) + "\n"


# ---------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    """The command line: exit status 0 on success, 1 when training diverged."""
    try:
        train(argv)
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def train(argv: list[str] | None = None) -> DeepSeekV3:
    """Parse ``argv`` like the command line, train, and return the trained model.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; a process group it
    creates lives exactly as long as the call (one the caller made is kept, so that
    the caller can still gather the sharded model, e.g. ``sharding.full_model_state``).
    """
    parser = build_parser()
    args, given = parse_command_line(parser, argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL talks to the current device
    own_group = world > 1 and not dist.is_initialized()  # a caller's group is left alone
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    try:
        with rundir.claim(Path(args.out), args.resume, lock=rank == 0):  # only rank 0 writes
            return run(args, given, parser, rank, world, device)
    except rundir.RunDirError as err:
        parser.error(str(err))
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


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


def run(args, given: set[str], parser, rank: int, world: int, device: torch.device
        ) -> DeepSeekV3:
    """Train in ``args.out``, which ``rundir.claim`` has checked (and, on rank 0, locked)."""
    out = Path(args.out)
    if args.resume:
        with resume_errors(parser, out):
            state = checkpoint.load_state(out)
            args = adopt_saved_args(args, state["args"], given, parser)
    check_args(args, parser, world)
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
    except (CorpusDownloadError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    ids = tokenizer.encode(text)
    window = args.seq_len + 1  # the validation tenth, too, must hold one whole window
    if len(ids) < 10 * window:
        parser.error(f"{corpus} has {len(ids):,} characters, too few for --seq-len "
                     f"{args.seq_len}: it needs {10 * window:,}, so that its last tenth (the "
                     f"validation split) holds one window of {window}; use a longer --text or "
                     "a shorter --seq-len")
    train_ids, val_ids = split_train_val(ids)

    if args.resume:
        with resume_errors(parser, out):
            cfg, saved_tokenizer = checkpoint.load_config(out), checkpoint.load_tokenizer(out)
        if saved_tokenizer != tokenizer:
            parser.error(f"the corpus {corpus} has a different vocabulary from the run in {out}")
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
    metrics = out / "metrics.jsonl"
    step = 0
    if args.resume:
        with resume_errors(parser, out):
            sharding.load_full_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            data_rng.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            step = state["step"]
        if rank == 0:
            rundir.truncate_records(metrics, step)

    def save() -> None:
        # Every rank takes part in gathering the full state; rank 0 writes it.
        weights, optimizer_state = sharding.full_state(model, optimizer)
        now = {"step": step, "optimizer": optimizer_state,
               "scheduler": scheduler.state_dict(), "data_rng": data_rng.get_state(),
               "torch_rng": torch.get_rng_state(), "args": vars(args)}
        refused = None
        if rank == 0:  # refuses (NonFiniteTensor) to save a NaN or an infinity
            try:
                checkpoint.save_checkpoint(out, model, tokenizer, now, weights)
            except checkpoint.NonFiniteTensor as err:
                refused = err
        if world > 1:  # rank 0 tells the others, so that every rank stops together
            flag = torch.tensor([float(refused is not None)])
            dist.broadcast(flag, src=0)
            if flag.item() and refused is None:
                refused = checkpoint.NonFiniteTensor("rank 0 refused to save a non-finite tensor")
        if refused is not None:
            raise refused

    if not args.resume:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        save()  # step 0: from now on --resume always has something to start from

    forward = torch.compile(model) if args.compile else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    micro = args.batch_size // args.grad_accum  # sequences per micro-batch, all ranks
    mine = slice(rank * micro // world, (rank + 1) * micro // world)  # this rank's rows
    tokens_per_step = args.batch_size * args.seq_len
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{n_params:,} parameters on {device} ({world} process(es)); {len(train_ids):,} "
              f"training / {len(val_ids):,} validation characters; writing to {out}")
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, unit="step",
               dynamic_ncols=True)
    started = tick = time.perf_counter()
    tick_step = last_ckpt = step

    try:
        while step < args.steps:
            batches = []
            for _ in range(args.grad_accum):
                x, y = get_batch(train_ids, micro, args.seq_len, data_rng)  # global micro-batch
                batches.append((x[mine].to(device), y[mine].to(device)))
            step += 1  # the step being taken, as messages and records number it
            result = train_step(model, forward, optimizer, scheduler, batches, args, world,
                                autocast, meshes)
            record: dict[str, Any] = {}
            if step % args.log_every == 0 or step == args.steps:
                now = time.perf_counter()
                loads = result.pop("loads")
                record.update(step=step, **result,
                              tokens_per_s=tokens_per_step * (step - tick_step) / (now - tick),
                              elapsed_s=now - started)
                if loads.numel():
                    record.update(maxvio_train=max_violation(loads).mean().item(),
                                  bias=[m.gate.e_score_correction_bias.tolist()
                                        for m in model.moe_layers()])
                tick, tick_step = now, step
                bar.set_postfix(loss=f"{result['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
            bar.update(step - bar.n)
            # Every rank evaluates (the same batches): a sharded model's forward needs them all.
            if step % args.eval_every == 0 or step == args.steps:
                last = step == args.steps  # the final evaluation reads the whole split
                ev = evaluate(model, val_ids, args.batch_size, args.seq_len,
                              None if last else args.eval_batches, device, autocast)
                record.update(step=step, **ev)
                if rank == 0:
                    bar.write(f"step {step}: val loss {ev['val_loss']:.4f}"
                              + (f", MaxVio global {ev['maxvio_global']:.3f}"
                                 if "maxvio_global" in ev else ""))
            if rank == 0 and record:
                rundir.append_record(metrics, record)
            if step % args.ckpt_every == 0 or step == args.steps or step == args.stop_after:
                save()
                last_ckpt = step
            if step == args.stop_after:
                break
    except (Diverged, checkpoint.NonFiniteTensor) as err:
        raise Diverged(
            f"{err} at step {step}; training stopped without saving it. The last good "
            f"checkpoint (step {last_ckpt}) in {out} is intact; start a new --out with a lower "
            "--lr or a longer --warmup") from None
    finally:
        bar.close()

    if step < args.steps:  # --stop-after: the run continues with --resume
        if rank == 0:
            print(f"stopped after step {step} of {args.steps}; continue with --resume --out {out}")
    else:
        finish(model, tokenizer, args, out, rank, started)
    if world > 1:
        dist.barrier()
    return model


def finish(model: DeepSeekV3, tokenizer: CharTokenizer, args, out: Path, rank: int,
           started: float) -> None:
    """Samples, plots and the closing summary of a run that reached its last step."""
    samples = sample_text(model, tokenizer, args.sample_chars, args.seed)  # every rank
    if rank == 0:
        (out / "samples.txt").write_text(samples, encoding="utf-8")
        plots = save_plots(out)
        minutes = (time.perf_counter() - started) / 60
        final = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
        print(f"done: {args.steps} steps, final validation loss {final['val_loss']:.4f} "
              f"nats/char ({minutes:.1f} min of training)\n  samples: {out / 'samples.txt'}\n"
              f"  plots:   {', '.join(str(p) for p in plots)}")


if __name__ == "__main__":
    sys.exit(main())
