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

``--time-budget SECONDS`` trains for a wall-clock budget instead of a number of steps:
the first steps are timed and ``--steps`` is planned from them, so that the cosine
schedule ends with the budget (budget.py).

``--fp8`` runs the three GEMMs of every attention, FFN and expert projection in simulated
FP8 (fp8.py, V3 report sec. 3.3); ``--fp8-scaling tensor`` and ``--fp8-promote-every 0`` are
the baselines the report improves on. Checkpoints keep the FP32 master weights under the
usual names, so an FP8 run samples, resumes and exports like any other.

This module is the loop (``train_step``, evaluation, samples); ``train_setup.py`` builds
and resumes what it works on, ``train_cli.py`` is the command line.

Everything a run writes lives in ``--out`` (default ``runs/toy``): the checkpoint
(checkpoint.py), the lock and ``metrics.jsonl`` (rundir.py), ``samples.txt`` and PNG
plots (plots.py). A checkpoint holds the step, optimizer, scheduler and data-generator
state, so ``--resume`` continues a killed run with exactly the losses it would have had.
Training stops, before the optimizer touches the weights, as soon as the loss or the
gradient norm is NaN or infinite, and a checkpoint is never written with a NaN or an
infinity in it, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, parallel, rundir, sharding
from .budget import BudgetTooShort, TimeBudget
from .data import get_batch, iterate_eval_batches
from .generate import generate
from .model import DeepSeekV3
from .moe import max_violation
from .mtp import cross_entropy
from .plots import save_plots
from .tokenizer import Tokenizer
from .train_cli import build_parser, parse_command_line
from .train_setup import pick_device, save_run, set_up

# Speaker names as the corpus writes them ("NAME." on its own line, then the speech).
SAMPLE_PROMPTS = ("KING HENRY.\n", "PORTIA.\n", "OTHELLO.\n", "ROMEO.\n")


class Diverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite."""


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
             max_batches: int | None, device: torch.device, autocast,
             chars_per_token: torch.Tensor) -> dict[str, Any]:
    """Validation CE of the main head and MaxVio per MoE layer.

    ``val_loss`` is in nats per token, comparable between runs of one tokenizer;
    ``val_loss_per_char`` spreads the same nats over the characters of the text the
    targets spell out (``chars_per_token``, the tokenizer's), comparable between
    tokenizers: a BPE token that holds three characters is one harder prediction, not
    three. For a character tokenizer the two are equal.

    MaxVio_batch is the mean over evaluation batches of each batch's MaxVio; MaxVio_global
    is the MaxVio of the loads summed over all of them. Only the main layers route here
    (the MTP module needs targets), so the per-layer lists cover the main MoE layers.
    """
    model.eval()
    total, count, chars, batch_vio, global_load = 0.0, 0, 0, [], 0
    for x, y in iterate_eval_batches(val_ids, batch_size, seq_len, max_batches):
        with autocast:
            out = model(x.to(device))
        total += cross_entropy(out.logits, y.to(device)).item() * y.numel()
        count += y.numel()
        chars += chars_per_token[y].sum().item()
        if out.router:
            loads = torch.stack([s.load for s in out.router]).cpu()  # (L, E)
            batch_vio.append(max_violation(loads))  # (L,)
            global_load = global_load + loads
    model.train()
    record: dict[str, Any] = {"val_loss": total / count, "val_loss_per_char": total / chars}
    if batch_vio:
        per_batch, per_global = torch.stack(batch_vio).mean(0), max_violation(global_load)
        record.update(maxvio_batch=per_batch.mean().item(), maxvio_global=per_global.mean().item(),
                      maxvio_batch_per_layer=per_batch.tolist(),
                      maxvio_global_per_layer=per_global.tolist(), val_load=global_load.tolist())
    return record


def _can_encode(tokenizer: Tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
    except ValueError:  # a character the vocabulary lacks (a BPE encodes any text)
        return False
    return True


def sample_text(model: DeepSeekV3, tokenizer: Tokenizer, n_chars: int, seed: int) -> str:
    """Continue a few prompts (those the vocabulary can spell): the text of samples.txt.

    Each continuation is ``n_chars`` tokens, cut to ``n_chars`` characters: the same
    thing for a character tokenizer, and for a BPE, whose tokens are mostly longer, a
    sample of the length asked for. Seeded, so every rank of a sharded model computes
    the same text in step.
    """
    prompts = [p for p in SAMPLE_PROMPTS if _can_encode(tokenizer, p)] or ["\n"]
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        room = model.cfg.max_position_embeddings - len(ids)
        new = generate(model, ids, min(n_chars, room), temperature=0.8, top_k=None,
                       seed=seed + i).tokens
        texts.append(prompt + tokenizer.decode(new)[:n_chars])
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
    except (rundir.RunDirError, BudgetTooShort) as err:
        parser.error(str(err))
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def run(args, given: set[str], parser, rank: int, world: int, device: torch.device
        ) -> DeepSeekV3:
    """Train in ``args.out``, which ``rundir.claim`` has checked (and, on rank 0, locked)."""
    r = set_up(args, given, parser, rank, world, device)
    args, out, model, optimizer, scheduler = r.args, r.out, r.model, r.optimizer, r.scheduler
    train_ids, val_ids, data_rng, meshes = r.train_ids, r.val_ids, r.data_rng, r.meshes
    budget = r.budget  # None without --time-budget
    metrics = out / "metrics.jsonl"

    forward = torch.compile(model) if args.compile else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    micro = args.batch_size // args.grad_accum  # sequences per micro-batch, all ranks
    mine = slice(rank * micro // world, (rank + 1) * micro // world)  # this rank's rows
    tokens_per_step = args.batch_size * args.seq_len
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        val_chars = r.tokenizer.chars_per_token[val_ids].sum().item()
        print(f"{n_params:,} parameters on {device} ({world} process(es)); {r.tokenizer!r}: "
              f"{len(train_ids):,} training / {len(val_ids):,} validation tokens "
              f"({len(val_ids) / val_chars:.3f} per character); writing to {out}")
    bar = tqdm(total=args.steps, initial=r.step, disable=rank != 0, unit="step",
               dynamic_ncols=True)
    started = tick = time.perf_counter()
    tick_step = last_ckpt = r.step

    try:
        while r.step < args.steps:
            with budget.step() if budget else nullcontext():  # what a --time-budget counts
                batches = []
                for _ in range(args.grad_accum):
                    x, y = get_batch(train_ids, micro, args.seq_len, data_rng)  # all ranks' rows
                    batches.append((x[mine].to(device), y[mine].to(device)))
                r.step += 1  # the step being taken, as messages and records number it
                result = train_step(model, forward, optimizer, scheduler, batches, args, world,
                                    autocast, meshes)
            if budget:
                budget.after_step(r.step, args)  # may plan args.steps, or end the run here
                bar.total = args.steps
            last = r.step == args.steps
            record: dict[str, Any] = {}
            if r.step % args.log_every == 0 or last:
                now = time.perf_counter()
                loads = result.pop("loads")
                record.update(step=r.step, **result,
                              tokens_per_s=tokens_per_step * (r.step - tick_step) / (now - tick),
                              elapsed_s=now - started)
                if budget:
                    record.update(budget.record(r.step, tokens_per_step, last))
                if loads.numel():
                    per_layer = max_violation(loads)  # (L,): main MoE layers, then MTP
                    record.update(maxvio_train=per_layer.mean().item(),
                                  maxvio_train_per_layer=per_layer.tolist(),
                                  bias=[m.gate.e_score_correction_bias.tolist()
                                        for m in model.moe_layers()])
                tick, tick_step = now, r.step
                bar.set_postfix(loss=f"{result['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
            bar.update(r.step - bar.n)
            # Every rank evaluates (the same batches): a sharded model's forward needs them all.
            if r.step % args.eval_every == 0 or last:  # the final evaluation reads the whole split
                ev = evaluate(model, val_ids, args.batch_size, args.seq_len,
                              None if last else args.eval_batches, device, autocast,
                              r.tokenizer.chars_per_token)
                record.update(step=r.step, **ev)
                if rank == 0:
                    bar.write(f"step {r.step}: val loss {ev['val_loss']:.4f} per token, "
                              f"{ev['val_loss_per_char']:.4f} per char"
                              + (f", MaxVio global {ev['maxvio_global']:.3f}"
                                 if "maxvio_global" in ev else ""))
            if rank == 0 and record:
                rundir.append_record(metrics, record)
            if r.step % args.ckpt_every == 0 or last or r.step == args.stop_after:
                save_run(r, rank, world)
                last_ckpt = r.step
            if r.step == args.stop_after:
                break
    except (Diverged, checkpoint.NonFiniteTensor) as err:
        raise Diverged(
            f"{err} at step {r.step}; training stopped without saving it. The last good "
            f"checkpoint (step {last_ckpt}) in {out} is intact; start a new --out with a lower "
            "--lr or a longer --warmup") from None
    finally:
        bar.close()

    if r.step < args.steps:  # --stop-after: the run continues with --resume
        if rank == 0:
            total = (f"of {args.steps}" if budget is None or budget.planned
                     else "(the time budget has not planned the total yet)")
            print(f"stopped after step {r.step} {total}; continue with --resume --out {out}")
    else:
        finish(model, r.tokenizer, args, out, rank, started, budget)
    if world > 1:
        dist.barrier()
    return model


def finish(model: DeepSeekV3, tokenizer: Tokenizer, args, out: Path, rank: int,
           started: float, budget: TimeBudget | None) -> None:
    """Samples, plots and the closing summary of a run that reached its last step."""
    samples = sample_text(model, tokenizer, args.sample_chars, args.seed)  # every rank
    if rank == 0:
        (out / "samples.txt").write_text(samples, encoding="utf-8")
        plots = save_plots(out)
        minutes = (time.perf_counter() - started) / 60
        final = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
        print(f"done: {args.steps} steps, final validation loss {final['val_loss']:.4f} "
              f"nats/token, {final['val_loss_per_char']:.4f} nats/char ({minutes:.1f} min of "
              f"training)\n  samples: {out / 'samples.txt'}\n"
              f"  plots:   {', '.join(str(p) for p in plots)}")
        if budget:
            print(f"  time budget: {budget.seconds:g} s of training steps; {budget.spent:.1f} s "
                  f"spent on {args.steps} of the {budget.planned} planned steps (the final "
                  "evaluation, samples and plots ran outside the budget)")


if __name__ == "__main__":
    sys.exit(main())
