"""Generation: one prefill, then token-by-token decoding over preallocated caches.

    prefill   the whole prompt in one forward; the caches now hold positions 0..n-1
    decode    feed only the newest token at position m; attention reads the cache

By default decoding uses the *absorbed* MLA path, whose cache keeps only the latent
c_KV and the shared RoPE key k_R: (kv_lora_rank + qk_rope_head_dim) numbers per
token per layer instead of n_heads * (qk_head_dim + v_head_dim) for the *naive*
per-head keys and values (``cache_sizes`` reports both).

With ``speculative=True`` the MTP modules draft the next D tokens and the main
model checks them all in one forward (see ``speculative.py``). Plain decoding is
the same loop with zero drafts, so both share every line below.

Length policy: the sequence (prompt + new tokens) never exceeds
``max_position_embeddings``. A prompt that leaves no room raises ``ValueError``;
asking for more new tokens than fit generates up to the limit, then stops with a
warning and ``stop_reason == "max_position_embeddings"`` -- never silently wrapping.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .mla import AttnMode, MLACache, cache_bytes_per_token
from .model import DeepSeekV3
from .speculative import MTPDrafter, accept_or_resample


@dataclass
class Sampler:
    """Turns logits into a distribution (temperature, top-k, top-p) and draws from it.

    ``temperature == 0`` is greedy: the distribution is one-hot on the argmax, so the
    speculative accept/reject rule reduces to "keep the draft iff it is the argmax".
    ``seed`` gives a private ``torch.Generator``; without it the global RNG is used.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not (_is_real(self.temperature) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature={self.temperature!r}: must be a finite number >= 0 "
                             "(0 = greedy)")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k!r}: must be a positive integer or None")
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: must be a number in (0, 1] or None")
        if self.seed is not None:
            if not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):  # torch's range
                raise ValueError(f"seed={self.seed!r}: must be an integer in [-2**63, 2**64) "
                                 "or None")
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (N, V) -> sampling distributions (N, V), float32 on the CPU."""
        logits = logits.detach().float().cpu()
        if self.greedy:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        # Shifting by the max leaves softmax unchanged, and float64 holds any positive
        # temperature: then a tiny one (1e-45) sends the other logits to -inf, never the
        # largest to inf (inf - inf = NaN), and sampling becomes greedy as it should.
        shifted = logits.double() - logits.max(-1, keepdim=True).values.double()
        probs = (shifted / self.temperature).softmax(-1).float()
        if self.top_k is not None and self.top_k < probs.shape[-1]:
            kept = probs.topk(self.top_k, dim=-1).indices  # (N, k)
            probs = torch.zeros_like(probs).scatter(-1, kept, probs.gather(-1, kept))
        if self.top_p is not None:
            # Keep the smallest set of most likely tokens whose mass reaches top_p: drop a
            # token when the tokens ranked above it already hold top_p.
            sorted_p, order = probs.sort(-1, descending=True)  # (N, V) each
            before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return probs / probs.sum(-1, keepdim=True)

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a distribution (V,): its argmax when greedy."""
        if self.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """u ~ U[0, 1) for the accept/reject test."""
        return float(torch.rand((), generator=self.generator))


def _is_real(value) -> bool:
    """A real number; a bool or a numeric string is refused rather than read as one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class Generation:
    """What ``generate`` produced and what it cost."""

    tokens: list[int]  # the new tokens (prompt excluded)
    forwards: int = 0  # main-model forward passes, the prefill included
    drafted: int = 0  # MTP draft tokens proposed
    accepted: int = 0  # draft tokens the main model kept
    seconds: float = 0.0  # wall time from prefill to the last token
    draft_seconds: float = 0.0  # the part of ``seconds`` spent drafting with the MTP modules
    stop_reason: str = "max_new_tokens"  # or "max_position_embeddings"

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafts kept (the report's "second-token acceptance" for D = 1)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward: 1.0 for plain decoding, more when drafts land."""
        return len(self.tokens) / self.forwards if self.forwards else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else float("nan")

    @property
    def rounds(self) -> int:
        """Decode rounds after the prefill: (draft +) one main-model forward each."""
        return self.forwards - 1


def check_prompt(model: DeepSeekV3, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A non-empty single sequence of valid ids -> LongTensor (1, n) on the model's device."""
    if isinstance(prompt_ids, (str, bytes)):
        raise ValueError(f"prompt_ids is a {type(prompt_ids).__name__}; pass token ids, e.g. "
                         "tokenizer.encode(text)")
    try:
        ids = torch.as_tensor(prompt_ids)
    except (TypeError, ValueError, RuntimeError) as e:  # None, strings, ragged lists...
        raise ValueError(f"prompt_ids must be a list or 1-D tensor of token ids; got "
                         f"{type(prompt_ids).__name__} ({e})") from None
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            f"prompt_ids must be one non-empty sequence of token ids (a list or a 1-D tensor); "
            f"got shape {tuple(ids.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids must be integers; got dtype {ids.dtype}")
    ids = ids.long()[None].to(model.embed_tokens.weight.device)
    model.check_tokens(ids, name="prompt_ids")  # ids in [0, vocab_size), length in range
    return ids


@torch.no_grad()
def generate(model: DeepSeekV3, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, attn_mode: AttnMode = "absorbed", speculative: bool = False,
             on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens.

    temperature 0 is greedy; ``top_k`` / ``top_p`` restrict sampling; ``seed`` makes it
    repeatable. ``attn_mode`` picks the MLA path and cache layout. ``speculative``
    drafts with the MTP modules; greedy speculative output equals greedy output and
    sampled speculative output follows the main model's distribution.
    ``on_tokens`` receives each batch of new tokens as soon as it is decided.
    """
    cfg = model.cfg
    prompt = check_prompt(model, prompt_ids)  # (1, n)
    n = prompt.shape[1]
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if not isinstance(speculative, bool):
        raise ValueError(f"speculative={speculative!r}: must be True or False")
    if on_tokens is not None and not callable(on_tokens):
        raise ValueError(f"on_tokens={on_tokens!r}: must be a function of the new tokens or None")
    if n >= cfg.max_position_embeddings:
        raise ValueError(
            f"the prompt has {n} tokens, which leaves no room below max_position_embeddings="
            f"{cfg.max_position_embeddings}; shorten the prompt"
        )
    if speculative and cfg.num_nextn_predict_layers == 0:
        raise ValueError("speculative=True needs MTP modules; this config has "
                         "num_nextn_predict_layers=0")
    limit = min(n + max_new_tokens, cfg.max_position_embeddings)  # final sequence length
    sampler = Sampler(temperature, top_k, top_p, seed)
    caches = model.allocate_caches(1, limit, attn_mode)  # main blocks, then MTP blocks
    L = cfg.num_hidden_layers
    drafter = MTPDrafter(model, caches[L:], limit, attn_mode) if speculative else None
    result = Generation(tokens=[])

    was_training = model.training
    model.eval()  # MoE layers count expert load in training mode; inference must not
    try:
        start = time.perf_counter()
        tokens = prompt[0].tolist()
        out = model(prompt, caches=caches, attn_mode=attn_mode)  # prefill: positions 0..n-1
        result.forwards = 1
        if drafter:
            drafter.keep_main_hidden(out.hidden, 0)
        new = [sampler.draw(sampler.probs(out.logits[0, -1:])[0])]
        while True:
            tokens += new
            result.tokens += new
            if on_tokens:
                on_tokens(new)
            if len(tokens) >= limit:
                break
            m = len(tokens) - 1  # the newest token t_m is not in the caches yet
            # Each forward adds at most (drafts + 1) tokens: never pass the length limit.
            n_draft = min(len(model.mtp), limit - m - 2) if drafter else 0
            drafts, q = [], None
            if n_draft:
                drafting = time.perf_counter()
                drafts, q = drafter.draft(tokens, n_draft, sampler)
                result.draft_seconds += time.perf_counter() - drafting
            fed = torch.tensor([[tokens[m], *drafts]], device=prompt.device)  # (1, 1 + drafts)
            out = model(fed, start_pos=m, caches=caches, attn_mode=attn_mode)
            result.forwards += 1
            p = sampler.probs(out.logits[0])  # (1 + drafts, V)
            n_ok, next_token = accept_or_resample(p, q, drafts, sampler)
            result.drafted += len(drafts)
            result.accepted += n_ok
            # Caches now hold positions m..m+len(drafts); only m..m+n_ok are kept. The
            # rest is "rolled back" for free: the next forward writes from m+n_ok+1 on
            # and attention never reads past the positions it has just written.
            if drafter:
                drafter.keep_main_hidden(out.hidden[:, : n_ok + 1], m)
            new = drafts[:n_ok] + [next_token]
        result.seconds = time.perf_counter() - start
    finally:
        model.train(was_training)

    if len(result.tokens) < max_new_tokens:
        result.stop_reason = "max_position_embeddings"
        warnings.warn(
            f"stopped after {len(result.tokens)} of {max_new_tokens} new tokens: the sequence "
            f"reached max_position_embeddings={cfg.max_position_embeddings} (prompt {n} tokens)",
            stacklevel=2,
        )
    return result


# ---------------------------------------------------------------- cache accounting

def cache_sizes(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Decode-cache bytes per token per layer for both MLA paths.

    absorbed = (kv_lora_rank + qk_rope_head_dim) * bytes   -- c_KV and the shared k_R
    naive    = n_heads * (qk_head_dim + v_head_dim) * bytes -- every head's K and V
    Multiply by ``num_hidden_layers`` for the bytes per token of the whole model.
    """
    size = torch.empty((), dtype=dtype).element_size()
    return {mode: cache_bytes_per_token(cfg, mode, size) for mode in ("naive", "absorbed")}


def allocated_bytes(caches: Sequence[MLACache]) -> int:
    """Bytes actually held by a list of caches (all positions, all layers)."""
    return sum(t.numel() * t.element_size() for c in caches for t in (c.first, c.second))
