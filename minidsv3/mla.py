"""Multi-head Latent Attention (V3 report sec. 2.1.1, eqs. 1-11).

Keys and values of all heads are reconstructed from one small latent per token,

    c_KV = RMSNorm(W_DKV h)                      (d_c = kv_lora_rank values)      eq. 1
    k_C  = W_UK c_KV,   v_C = W_UV c_KV          (per head, d_h and d_v values)   eqs. 2, 5
    k_R  = RoPE(W_KR h)                          (d_R values, shared by heads)    eq. 3

and queries likewise from their own latent c_Q (eqs. 6-9). RoPE acts only on the
small decoupled part, so the position-free part can be reordered:

    q_C . k_C = q_C . (W_UK c_KV) = (W_UK^T q_C) . c_KV

That is the *absorbed* path: fold W_UK into the query and W_UV into the output, and
the cache holds only c_KV and k_R -- (d_c + d_R) = 576 numbers per token per layer
for the released model. The *naive* path materialises per-head K and V as in
training. Both take a cache and a start position and give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, apply_rotary_emb, softmax_scale

AttnMode = Literal["naive", "absorbed"]


@dataclass
class MLACache:
    """Preallocated per-layer decode cache; positions >= the caller's length are unused.

    naive:    k (B, T_max, H, d_h + d_R) and v (B, T_max, H, d_v)
    absorbed: kv (B, T_max, d_c) -- normalised latent -- and pe (B, T_max, d_R) -- roped key
    """

    mode: AttnMode
    first: torch.Tensor  # k (naive) or kv (absorbed)
    second: torch.Tensor  # v (naive) or pe (absorbed)

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, mode: AttnMode,
                 dtype: torch.dtype = torch.float32, device=None) -> MLACache:
        H = cfg.num_attention_heads
        if mode == "naive":
            shapes = (batch, max_len, H, cfg.qk_head_dim), (batch, max_len, H, cfg.v_head_dim)
        elif mode == "absorbed":
            shapes = (batch, max_len, cfg.kv_lora_rank), (batch, max_len, cfg.qk_rope_head_dim)
        else:
            raise ValueError(f"attention mode {mode!r}: use 'naive' or 'absorbed'")
        first, second = (torch.zeros(s, dtype=dtype, device=device) for s in shapes)
        return cls(mode, first, second)

    @property
    def max_len(self) -> int:
        return self.first.shape[1]

    def bytes_per_token(self) -> int:
        """Bytes this cache stores per token (summed over its tensors), for one layer."""
        per_token = [t[0, 0].numel() * t.element_size() for t in (self.first, self.second)]
        return sum(per_token)

    def write(self, start: int, first: torch.Tensor, second: torch.Tensor):
        """Store new entries at [start, start+T) and return everything up to start+T."""
        end = start + first.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; writing up to {end}")
        self.first[:, start:end] = first
        self.second[:, start:end] = second
        return self.first[:, :end], self.second[:, :end]


def cache_bytes_per_token(cfg: ModelConfig, mode: AttnMode, dtype_bytes: int = 2) -> int:
    """Cache bytes per token per layer by formula (bf16 = 2 bytes by default)."""
    if mode == "absorbed":
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    if mode == "naive":
        H = cfg.num_attention_heads
        return H * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    raise ValueError(f"attention mode {mode!r}: use 'naive' or 'absorbed'")


class MLA(nn.Module):
    """Multi-head Latent Attention with naive and absorbed paths."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, d = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = H
        if cfg.q_lora_rank > 0:  # low-rank query compression (eqs. 6-7)
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:  # full-rank query projection (the V2-Lite layout)
            self.q_proj = nn.Linear(d, H * cfg.qk_head_dim, bias=False)
        # One projection makes both the KV latent (d_c) and the shared RoPE key (d_R).
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        # W_UK and W_UV stacked per head: rows [h, :d_h] are keys, [h, d_h:] values.
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=False)
        self.scale = softmax_scale(cfg)

    def queries(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        """q_C (B, T, H, d_h) and roped q_R (B, T, H, d_R)."""
        cfg = self.cfg
        if cfg.q_lora_rank > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = rearrange(q, "b t (h d) -> b t h d", h=self.n_heads)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary_emb(q_pe, freqs_cis)

    def latents(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        """Normalised c_KV (B, T, d_c) and roped shared key k_R (B, T, d_R)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split(
            [self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1
        )
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)  # one "head"
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0,
                cache: MLACache | None = None, mode: AttnMode = "naive") -> torch.Tensor:
        """x (B, T, d) at positions [start_pos, start_pos+T); freqs_cis for those positions."""
        if cache is not None and cache.mode != mode:
            raise ValueError(f"cache was allocated for mode {cache.mode!r}, not {mode!r}")
        T = x.shape[1]
        q_nope, q_pe = self.queries(x, freqs_cis)
        c_kv, k_pe = self.latents(x, freqs_cis)
        if mode == "naive":
            out = self._naive(q_nope, q_pe, c_kv, k_pe, start_pos, cache)
        elif mode == "absorbed":
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, start_pos, cache)
        else:
            raise ValueError(f"attention mode {mode!r}: use 'naive' or 'absorbed'")
        return self.o_proj(rearrange(out, "b t h v -> b t (h v)", t=T))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, start_pos, cache):
        cfg, H = self.cfg, self.n_heads
        kv = rearrange(self.kv_b_proj(c_kv), "b s (h d) -> b s h d", h=H)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        # The RoPE key is shared: the same k_R is appended to every head's key.
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)  # (B,S,H,d_qk)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, d_h + d_R)
        if cache is not None:
            k, v = cache.write(start_pos, k, v)  # (B, start+T, H, .)
        q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))
        if q.shape[2] == k.shape[2]:  # no cached prefix: the fused causal kernel is fastest
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            mask = causal_mask(q.shape[2], k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return rearrange(out, "b h t v -> b t h v")

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, start_pos, cache):
        cfg, H = self.cfg, self.n_heads
        w = rearrange(self.kv_b_proj.weight, "(h d) c -> h d c", h=H)  # (H, d_h + d_v, d_c)
        w_uk, w_uv = w.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        if cache is not None:
            c_kv, k_pe = cache.write(start_pos, c_kv, k_pe)  # (B, S, d_c), (B, S, d_R)
        # Fold W_UK into the query: q_C . (W_UK c) = (W_UK^T q_C) . c
        q_latent = einsum(q_nope, w_uk, "b t h d, h d c -> b t h c")
        scores = (einsum(q_latent, c_kv, "b t h c, b s c -> b h t s")
                  + einsum(q_pe, k_pe, "b t h r, b s r -> b h t s")) * self.scale
        allowed = causal_mask(scores.shape[2], scores.shape[3], scores.device)
        probs = scores.float().masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        probs = probs.to(c_kv.dtype)
        # Attend in latent space, then apply W_UV once per head.
        o_latent = einsum(probs, c_kv, "b h t s, b s c -> b t h c")
        return einsum(o_latent, w_uv, "b t h c, h v c -> b t h v")


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """Boolean (t, s), True where allowed: query i (the last t of s positions) sees j <= s-t+i."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)
