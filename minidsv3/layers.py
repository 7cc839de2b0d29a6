"""Building blocks shared by every part of the model.

* ``RMSNorm``          -- root-mean-square normalisation (no mean subtraction, no bias);
* ``MLP``              -- the SwiGLU feed-forward network, used both as the dense FFN
                          and as every (shared or routed) expert;
* RoPE on interleaved pairs -- each pair (x[2i], x[2i+1]) is one complex number rotated
                          by position * theta_i, exactly as the released checkpoint expects;
* YaRN                 -- per-frequency interpolation for long contexts, plus the
                          attention temperature ``mscale`` (V3 report sec. 4.3);
* ``RopeTable``        -- the model's table of rotations, kept complex64 (two float32
                          numbers per pair) whatever dtype the rest of the model is cast to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU FFN: down( silu(gate(x)) * up(x) ). Names match the checkpoint keys."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------
# RoPE and YaRN
# ---------------------------------------------------------------------------------
def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta_i = base^(-2i/dim) for i = 0 .. dim/2-1: the angle per position of pair i."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def yarn_correction_range(yarn: RopeScaling, dim: int, theta: float) -> tuple[int, int]:
    """Pair indices (low, high) between which YaRN blends interpolation and RoPE.

    A pair that completes r full rotations over the original context L has
    wavelength L / r, i.e. index i = dim * ln(L / (2 pi r)) / (2 ln theta).
    Pairs below ``low`` (more than beta_fast rotations) keep plain RoPE; pairs above
    ``high`` (fewer than beta_slow rotations) are fully interpolated (divided by s).
    """
    L = yarn.original_max_position_embeddings

    def pair_index(rotations: float) -> float:
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(pair_index(yarn.beta_fast))
    high = math.ceil(pair_index(yarn.beta_slow))
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """Linear ramp over pair indices: 0 at ``low`` and below, 1 at ``high`` and above."""
    if low == high:
        high += 0.001  # avoid dividing by zero, as the reference does
    return ((torch.arange(n, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def yarn_inv_freq(yarn: RopeScaling, dim: int, theta: float) -> torch.Tensor:
    """YaRN frequencies: theta_i/s for slow pairs, theta_i for fast ones, a ramp between."""
    inv_freq = rope_inv_freq(dim, theta)
    low, high = yarn_correction_range(yarn, dim, theta)
    interpolate = yarn_ramp(low, high, dim // 2)  # 1 = fully interpolated
    return inv_freq / yarn.factor * interpolate + inv_freq * (1 - interpolate)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """Attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def uses_yarn(cfg: ModelConfig) -> bool:
    """YaRN is switched on only when the context exceeds the pre-training context.

    Like the reference implementation, a model built for a context no longer than
    ``original_max_position_embeddings`` uses plain RoPE and the plain softmax scale.
    """
    y = cfg.rope_scaling
    return y is not None and cfg.max_position_embeddings > y.original_max_position_embeddings


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """a * exp(i * m * theta_k) for positions m < seq_len: complex64 of shape (seq_len, d_R/2).

    The magnitude a is 1 for plain RoPE. With YaRN it is mscale / mscale_all_dim's
    temperature ratio (HF's ``attention_factor``; 1 in every released config, where the
    two are equal): the rest of the temperature lives in ``softmax_scale``.
    """
    seq_len = seq_len or cfg.max_position_embeddings
    dim = cfg.qk_rope_head_dim
    magnitude = 1.0
    if uses_yarn(cfg):
        y = cfg.rope_scaling
        inv_freq = yarn_inv_freq(y, dim, cfg.rope_theta)
        magnitude = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        inv_freq = rope_inv_freq(dim, cfg.rope_theta)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, d_R/2)
    return torch.polar(torch.full_like(angles, magnitude), angles).to(torch.complex64)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim: x (B, T, H, d_R), freqs_cis (T, d_R/2).

    The rotation is computed in float32 whatever x's dtype, then cast back to it.
    """
    # (B, T, H, d_R) -> (B, T, H, d_R/2, 2): pair (x0, x1) becomes x0 + i*x1. view_as_complex
    # needs even strides and offset, which a slice after an odd-width split lacks: copy then.
    pairs = x.float().reshape(*x.shape[:-1], -1, 2).contiguous()
    rotated = torch.view_as_complex(pairs) * freqs_cis[None, :, None, :]  # over batch, heads
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # back to (B, T, H, d_R)


class RopeTable(nn.Module):
    """``freqs_cis`` for every position the model supports, immune to dtype casts.

    ``model.to(torch.bfloat16)`` (or ``.half()``, ``.double()``) casts every floating
    and complex buffer to that dtype; for this complex table that would keep only the
    real part, cos(m theta), and every query and key would be *scaled* instead of
    rotated -- silently. So this module follows the rest of the model to its device but
    never changes dtype, and a model built on the meta device gets a real table when it
    is materialised (``to_empty``), since the table is derived from the config.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # derived from the config, so not saved in checkpoints (persistent=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Where would ``fn`` (.to, .cuda, .half, to_empty, ...) send a tensor of ours?
        device = fn(torch.empty(0, device=self.freqs_cis.device)).device
        if self.freqs_cis.is_meta and device.type != "meta":
            self.freqs_cis = precompute_freqs_cis(self.cfg).to(device)
        else:
            self.freqs_cis = self.freqs_cis.to(device)
        return self


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_R), times mscale^2 when YaRN is active (reference MLA)."""
    scale = cfg.qk_head_dim**-0.5
    if uses_yarn(cfg):
        m = yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim)
        scale = scale * m * m
    return scale
