"""Stream text from a trained run: ``python -m minidsv3.sample --run runs/toy --prompt "ROMEO:"``.

The text goes to stdout as it is generated; speed (and, with ``--speculative``, the
MTP acceptance rate) goes to stderr at the end, so ``> out.txt`` keeps only text.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .checkpoint import load_model
from .generate import generate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minidsv3.sample",
                                description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory written by training (runs/NAME)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
    p.add_argument("--tokens", type=int, default=500, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--attn", choices=("absorbed", "naive"), default="absorbed",
                   help="MLA path: latent cache (absorbed) or per-head K/V cache (naive)")
    p.add_argument("--speculative", action="store_true",
                   help="draft with the MTP module(s) and verify with the main model")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        torch.zeros(1, device=args.device)  # an absent device fails here, not deep inside
    except (RuntimeError, AssertionError):  # AssertionError: torch built without CUDA
        print(f"error: --device {args.device} is not available on this machine; use --device "
              "cpu", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model(args.run, device=args.device)
    except (OSError, ValueError) as e:  # checkpoint.py names the file and the fix
        print(f"error: --run: {e}", file=sys.stderr)
        return 2
    try:
        prompt = tokenizer.encode(args.prompt)
    except ValueError as e:
        print(f"error: --prompt: {e}", file=sys.stderr)
        return 2
    room = model.cfg.max_position_embeddings - len(prompt)
    if room < 1:
        print(f"error: --prompt has {len(prompt)} tokens; the model's context is "
              f"{model.cfg.max_position_embeddings}", file=sys.stderr)
        return 2
    if args.tokens > room:
        print(f"note: the model's context is {model.cfg.max_position_embeddings} tokens, so "
              f"{room} new tokens fit after the prompt, not {args.tokens}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    new: list[int] = []  # the tokens generated so far
    shown = 0  # how many characters of their text are written

    def stream(ids: list[int], final: bool = False) -> None:
        # Decode all new tokens, not just these: a byte-level BPE token can end inside a
        # multi-byte character, which reads U+FFFD until the next token completes it, so
        # such a tail waits (to the end, if it is one the model really wrote).
        nonlocal shown
        new.extend(ids)
        text = tokenizer.decode(new)
        if not final:
            text = text.rstrip("\ufffd")
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)

    try:
        result = generate(model, prompt, min(args.tokens, room), temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          attn_mode=args.attn, speculative=args.speculative, on_tokens=stream)
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    stream([], final=True)
    sys.stdout.write("\n")
    report = (f"{len(result.tokens)} tokens in {result.seconds:.2f} s "
              f"({result.tokens_per_second:.1f} tokens/s, {args.attn} attention)")
    if args.speculative:
        report += (f"; MTP drafts accepted {result.accepted}/{result.drafted} "
                   f"({result.acceptance_rate:.1%}), {result.tokens_per_forward:.2f} tokens "
                   "per main-model forward")
    print(report, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
