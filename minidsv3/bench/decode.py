"""Decoding speed on this machine: ``python -m minidsv3.bench decode``.

Prints, from one run:

1. cache bytes per token for the naive (per-head K/V) and absorbed (latent) MLA
   paths, by formula and as measured on the allocated cache tensors;
2. decode tokens/s of both paths after a context of 256, 1024 and 4096 tokens, on a
   config with 32 heads (the absorbed path's advantage grows with heads x context).
   The naive path attends with ``F.scaled_dot_product_attention``, whose CPU kernel
   is slow for a single query; on a CPU part of the gap is that kernel, the rest is
   reading 32x more cache per step;
3. MTP speculative decoding vs plain decoding on the trained toy model
   (``runs/toy``; without it a short training run is made first and reported as
   such): tokens/s, acceptance rate and tokens per main-model forward, greedy and
   sampled, and a check that greedy speculative text equals greedy text. Where the
   time goes: a greedy round (draft + one verify forward of 1 + D tokens) in plain
   steps. The speed-up is tokens per round over that cost, so a draft that costs a
   third of a step, and a verify of two tokens that costs more than a step of one,
   cap what even perfect acceptance could buy.

``--dtype bfloat16`` runs all of it with the model cast to bf16 (the GPU path; slower
than fp32 on most CPUs) and checks that cached greedy decoding gives exactly the tokens
of greedy decoding by full forwards in the same dtype.

Each figure is the median over timed steps or repeats, so one slow step on a
shared machine does not skew it; still, treat the numbers as approximate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoint import has_checkpoint, load_model
from ..config import ModelConfig
from ..generate import Generation, allocated_bytes, cache_sizes, generate
from ..model import DeepSeekV3, set_seed
from . import int_at_least

# Many heads and a small latent, few layers and a narrow FFN: attention dominates.
ATTENTION_CONFIG = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=32, q_lora_rank=128, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_nextn_predict_layers=0,
    rope_scaling=None,
)
# Speaker names, as in the corpus. (A bare "\n" is a poor greedy prompt for a small
# model: greedy text falls into "\n\n\n..." while MTP expects a name after a blank line.)
PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING HENRY:\n", "First Citizen:\nWe are"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minidsv3.bench decode",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", type=int_at_least(1), nargs="+", default=[256, 1024, 4096],
                   help="context lengths for the naive vs absorbed comparison")
    p.add_argument("--steps", type=int_at_least(1), default=24,
                   help="timed decode steps per context")
    p.add_argument("--chunk", type=int_at_least(1), default=256,
                   help="prefill chunk (bounds the absorbed path's T x S score matrix)")
    p.add_argument("--run", default="runs/toy", help="trained run for speculative decoding")
    p.add_argument("--fallback-steps", type=int_at_least(1), default=400,
                   help="training steps of the stand-in model when --run has no checkpoint")
    p.add_argument("--repeats", type=int_at_least(1), default=5,
                   help="repeats of each generation")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the models' dtype (RoPE tables and routers stay float32 regardless)")
    return p.parse_args(argv)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- naive vs absorbed

@torch.no_grad()
def decode_seconds(model: DeepSeekV3, context: int, steps: int, mode: str, chunk: int,
                   ) -> tuple[float, int]:
    """Median seconds of one decode step after ``context`` tokens, and the cache bytes."""
    warmup = 2
    caches = model.allocate_caches(1, context + warmup + steps, mode)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + warmup + steps))
    for start in range(0, context, chunk):  # prefill in chunks: only the decode is timed
        end = min(start + chunk, context)
        model(ids[:, start:end], start_pos=start, caches=caches, attn_mode=mode)
    times = []
    for pos in range(context, context + warmup + steps):
        t0 = time.perf_counter()
        model(ids[:, pos:pos + 1], start_pos=pos, caches=caches, attn_mode=mode)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]), allocated_bytes(caches)


@torch.no_grad()
def greedy_by_full_forwards(model: DeepSeekV3, prompt: list[int], n: int, mode: str) -> list[int]:
    """Greedy decoding without caches: the whole sequence again for every new token."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids, attn_mode=mode).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def attention_paths(args: argparse.Namespace) -> None:
    longest = max(args.contexts) + args.steps + 2
    cfg = ModelConfig.preset("toy", **ATTENTION_CONFIG, max_position_embeddings=longest)
    set_seed(0)
    model = DeepSeekV3(cfg).eval().to(DTYPES[args.dtype])
    sizes = cache_sizes(cfg, DTYPES[args.dtype])
    print(f"== naive vs absorbed MLA decode: {cfg.num_attention_heads} heads, "
          f"qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, v {cfg.v_head_dim}, "
          f"kv_lora_rank {cfg.kv_lora_rank}, {cfg.num_hidden_layers} layers, {args.dtype}, "
          "batch 1")
    print(f"cache bytes/token/layer: naive {sizes['naive']:,}  absorbed {sizes['absorbed']:,}  "
          f"({sizes['naive'] / sizes['absorbed']:.0f}x smaller)")
    print(f"{'context':>8} {'naive tok/s':>12} {'absorbed tok/s':>15} {'speed-up':>9} "
          f"{'naive cache MB':>15} {'absorbed cache MB':>18}")
    for context in args.contexts:
        row = {}
        for mode in ("naive", "absorbed"):
            seconds, held = decode_seconds(model, context, args.steps, mode, args.chunk)
            per_token = held / ((context + args.steps + 2) * cfg.num_hidden_layers)
            assert per_token == sizes[mode], "allocated cache differs from the formula"
            row[mode] = (1 / seconds, held / 2**20)
        print(f"{context:>8} {row['naive'][0]:>12.1f} {row['absorbed'][0]:>15.1f} "
              f"{row['absorbed'][0] / row['naive'][0]:>8.2f}x {row['naive'][1]:>15.1f} "
              f"{row['absorbed'][1]:>18.1f}")
    n_prompt = min(16, longest // 2)
    n_new = min(48, longest - n_prompt)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=g).tolist()
    for mode in ("naive", "absorbed"):
        cached = generate(model, prompt, n_new, temperature=0, attn_mode=mode).tokens
        full = greedy_by_full_forwards(model, prompt, n_new, mode)
        print(f"{args.dtype} {mode} cached greedy decode ({n_new} tokens) identical to greedy by "
              f"full forwards: {cached == full}")
    release = cache_sizes(ModelConfig.preset("deepseek-v3"))  # bf16
    print(f"released DeepSeek-V3 (bf16, 61 layers): absorbed {release['absorbed'] * 61:,} "
          f"bytes/token vs naive {release['naive'] * 61:,} "
          f"({release['naive'] / release['absorbed']:.0f}x)")


# ---------------------------------------------------------------- speculative decoding

def trained_toy(args: argparse.Namespace, scratch: Path):
    """The trained run, or a short training run made now (said so on stdout)."""
    if has_checkpoint(args.run):
        print(f"model: {args.run}")
        try:
            return load_model(args.run)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --run {args.run}: {e}") from None
    from ..train import train  # imported only when needed: it pulls in the whole trainer
    out = scratch / "toy"
    print(f"model: no checkpoint in {args.run} (run `make train` for the real figures); "
          f"training a stand-in toy model for {args.fallback_steps} steps in {out}")
    train(["--out", str(out), "--steps", str(args.fallback_steps), "--eval-every",
           str(args.fallback_steps), "--ckpt-every", str(args.fallback_steps)])
    return load_model(out)


def plain_and_speculative(model, prompt, repeats: int, **kwargs) -> list[Generation]:
    """Median-time plain and speculative runs, interleaved so that load changes hit both."""
    room = model.cfg.max_position_embeddings - len(prompt)
    runs: list[list[Generation]] = [[], []]
    for _ in range(repeats):
        for spec in (False, True):
            runs[spec].append(generate(model, prompt, room, speculative=spec, **kwargs))
    return [sorted(r, key=lambda g: g.seconds)[len(r) // 2] for r in runs]


def speculative(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = trained_toy(args, Path(scratch))
    model = model.to(DTYPES[args.dtype])
    cfg = model.cfg
    if cfg.num_nextn_predict_layers == 0:
        raise SystemExit(f"error: --run {args.run} has no MTP modules (num_nextn_predict_layers=0)"
                         ", and speculative decoding drafts with them")
    try:
        prompts = [tokenizer.encode(text) for text in PROMPTS]
    except ValueError as e:
        raise SystemExit(f"error: --run {args.run}: its tokenizer cannot encode the benchmark "
                         f"prompts ({e})") from None
    print(f"== MTP speculative decoding (D = {cfg.num_nextn_predict_layers}) vs plain, "
          f"absorbed attention, {args.dtype}, {cfg.max_position_embeddings}-token sequences")
    print(f"{'mode':>15} {'plain tok/s':>12} {'spec tok/s':>11} {'speed-up':>9} "
          f"{'accepted':>9} {'tok/forward':>12}")
    for label, kwargs in [("greedy", dict(temperature=0.0)),
                          ("T=0.8 sampled", dict(temperature=0.8))]:
        plain_s = spec_s = draft_s = 0.0
        tokens = forwards = drafted = accepted = plain_rounds = spec_rounds = 0
        agree, lengths = [], []  # per prompt: tokens before the first difference, all tokens
        for i, prompt in enumerate(prompts):
            seed = dict(seed=i) if kwargs["temperature"] else {}
            plain, spec = plain_and_speculative(model, prompt, args.repeats, **kwargs, **seed)
            agree.append(next((j for j, (a, b) in enumerate(zip(spec.tokens, plain.tokens))
                               if a != b), len(plain.tokens)))
            lengths.append(len(plain.tokens))
            plain_s += plain.seconds
            spec_s += spec.seconds
            draft_s += spec.draft_seconds
            plain_rounds, spec_rounds = plain_rounds + plain.rounds, spec_rounds + spec.rounds
            tokens += len(spec.tokens)
            forwards += spec.forwards
            drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
        print(f"{label:>15} {tokens / plain_s:>12.1f} {tokens / spec_s:>11.1f} "
              f"{plain_s / spec_s:>8.2f}x {accepted / drafted:>9.1%} {tokens / forwards:>12.2f}")
        if label == "greedy":
            # Speed-up = tokens per round / (round time / plain step time): what a round costs.
            step, round_ = plain_s / plain_rounds, spec_s / spec_rounds
            draft = draft_s / spec_rounds
            print(f"{'':>15} a plain step {1e3 * step:.2f} ms; a speculative round "
                  f"{1e3 * round_:.2f} ms = {round_ / step:.2f} plain steps (the draft "
                  f"{draft / step:.2f}, the verify of 1 + D tokens and the rest "
                  f"{(round_ - draft) / step:.2f})")
            same = agree == lengths
            print(f"{'':>15} greedy speculative tokens identical to greedy: {same}")
            if not same:  # expected below float32 only; tests/test_generate.py checks fp32
                worst = agree.index(min(agree))
                print(f"{'':>15} (first difference after {agree[worst]} of {lengths[worst]} "
                      f"tokens: in {args.dtype} verifying 1 + D tokens in one forward rounds "
                      "differently from decoding one, so near-ties can tip the other way)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    attention_paths(args)
    print()
    speculative(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
