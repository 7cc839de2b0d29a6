"""Exercise set 01: RoPE on interleaved pairs, YaRN's frequencies and softmax scale.

References: ``minidsv3.layers`` (rope_inv_freq, apply_rotary_emb, yarn_ramp,
yarn_correction_range, yarn_inv_freq, softmax_scale).
"""

from __future__ import annotations

import math

import torch

from .. import layers
from ..config import ModelConfig, RopeScaling
from .compare import expect_close
from .core import Fail, call, task

SET = "01_rope_yarn"


@task(SET, "rope_inv_freq", references=[layers.rope_inv_freq], hints=[
    "There is one frequency per *pair* of dimensions, so the result has dim // 2 entries.",
    "Pair i uses the exponent -2i/dim: torch.arange(0, dim, 2) gives the 2i directly.",
    "theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)",
])
def check_rope_inv_freq(fn) -> int:
    cases = [(8, 10000.0), (64, 10000.0), (16, 500.0), (2, 10000.0)]
    for dim, theta in cases:
        case = f"dim={dim}, theta={theta:g}"
        expected = layers.rope_inv_freq(dim, theta)
        got = call(fn, dim, theta, case=case)
        if isinstance(got, torch.Tensor) and got.shape == (dim,) and dim > 2:
            raise Fail(f"one frequency per pair: expected {dim // 2} values, got {dim} "
                       f"(case: {case})")
        i = torch.arange(dim // 2, dtype=torch.float64)
        expect_close(got, expected, "frequencies", case, rtol=1e-5, variants=[
            (theta ** (-i / dim), "the exponent uses i/dim; pair i needs 2i/dim"),
            (theta ** (2 * i / dim), "exponent sign flipped: theta_i = base^(-2i/dim) must "
                                     "*decrease* with i"),
        ])
    return len(cases)


def _rotate_halves(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The GPT-NeoX layout (pairs x_i, x_{i+D/2}): the mistake this set diagnoses."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@task(SET, "rotate_interleaved", references=[layers.apply_rotary_emb], hints=[
    "Pair (x[..., 2i], x[..., 2i+1]) is the complex number x_2i + i*x_2i+1; multiply it by "
    "exp(i*angle) = cos(angle) + i*sin(angle).",
    "x.reshape(*x.shape[:-1], -1, 2) puts each pair in the last axis; angles (T, D/2) must "
    "broadcast over batch and heads: angles[None, :, None, :].",
    "Rotation: (a, b) -> (a*cos - b*sin, a*sin + b*cos); stack the two and flatten the last "
    "two axes back to D.",
])
def check_rotate_interleaved(fn) -> int:
    gen = torch.Generator().manual_seed(1)
    shapes = [(2, 5, 3, 8), (1, 1, 1, 2), (3, 4, 2, 16)]  # T != H, so axes cannot be confused
    for n, (B, T, H, D) in enumerate(shapes):
        x = torch.randn(B, T, H, D, generator=gen)
        angles = torch.rand(T, D // 2, generator=gen) * 6.0
        case = f"x of shape {(B, T, H, D)}, random angles"
        expected = layers.apply_rotary_emb(x, torch.polar(torch.ones_like(angles), angles))
        got = call(fn, x.clone(), angles.clone(), case=case)
        variants = [
            (x, "returned x unchanged: nothing was rotated"),
            (layers.apply_rotary_emb(x, torch.polar(torch.ones_like(angles), -angles)),
             "rotation direction flipped: (a, b) -> (a cos - b sin, a sin + b cos)"),
        ]
        if D > 2:
            variants.append((_rotate_halves(x, angles),
                             "you rotated the halves (x_i, x_{i+D/2}), the GPT-NeoX layout; "
                             "DeepSeek-V3 rotates neighbours (x_2i, x_2i+1)"))
        expect_close(got, expected, "rotated x", case, variants=variants)
        if n == 0:  # angle 0 must leave x alone
            zero = torch.zeros_like(angles)
            got = call(fn, x.clone(), zero, case="all angles 0")
            expect_close(got, x, "rotated x", "all angles 0 (must return x)")
    return len(shapes) + 1


@task(SET, "yarn_ramp", references=[layers.yarn_ramp], hints=[
    "Start from the straight line (i - low) / (high - low) over i = 0 .. n-1.",
    "Clamp it to [0, 1]: .clamp(0, 1).",
    "When low == high the line divides by zero: add 0.001 to high first, like the reference.",
])
def check_yarn_ramp(fn) -> int:
    cases = [(2, 6, 10), (0, 3, 4), (10, 20, 8), (0, 31, 32), (5, 5, 8)]
    for low, high, n in cases:
        case = f"low={low}, high={high}, n={n}"
        expected = layers.yarn_ramp(low, high, n)
        got = call(fn, low, high, n, case=case)
        if low == high and isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
            raise Fail(f"ramp: low == high divides by zero (NaN/inf); nudge high by 0.001 "
                       f"as the reference does (case: {case})")
        line = (torch.arange(n, dtype=torch.float64) - low) / max(high - low, 1e-3)
        expect_close(got, expected, "ramp", case, variants=[
            (line, "values outside [0, 1]: clamp the ramp"),
            (1 - expected, "ramp reversed: it is 0 at and below low (plain RoPE) and 1 at "
                           "and above high (fully interpolated)"),
        ])
    return len(cases)


@task(SET, "yarn_inv_freq", references=[layers.yarn_inv_freq], hints=[
    "Compute the ramp r over the n = len(inv_freq) pairs with your yarn_ramp(low, high, n).",
    "Where r = 1 (slow pairs, index >= high) use inv_freq / factor; where r = 0 (fast pairs) "
    "keep inv_freq; blend linearly in between.",
    "inv_freq / factor * r + inv_freq * (1 - r)",
])
def check_yarn_inv_freq(fn) -> int:
    cases = [  # dim, theta, YaRN parameters
        (64, 10000.0, RopeScaling()),  # the released DeepSeek-V3 values
        (16, 10000.0, RopeScaling(factor=4, original_max_position_embeddings=256,
                                  beta_fast=8, beta_slow=1)),
        (32, 10000.0, RopeScaling(factor=8, original_max_position_embeddings=512)),
    ]
    for dim, theta, yarn in cases:
        low, high = layers.yarn_correction_range(yarn, dim, theta)
        inv = layers.rope_inv_freq(dim, theta)
        case = f"dim={dim}, factor={yarn.factor:g}, low={low}, high={high}"
        expected = layers.yarn_inv_freq(yarn, dim, theta)
        got = call(fn, inv.clone(), yarn.factor, low, high, case=case)
        r = layers.yarn_ramp(low, high, dim // 2)
        s = yarn.factor
        expect_close(got, expected, "frequencies", case, rtol=1e-5, variants=[
            (inv, "returned the frequencies unchanged"),
            (inv / s, "divided every frequency by s (plain position interpolation); YaRN keeps "
                      "the fast pairs (index <= low) unchanged"),
            (inv / s * (1 - r) + inv * r, "interpolated the wrong end: divide by s where the "
                                          "ramp is 1 (slow pairs) and keep RoPE where it is 0"),
            (inv * s * r + inv * (1 - r), "multiplied by s: interpolation *divides* the "
                                          "frequency by s (positions are stretched)"),
        ])
    return len(cases)


def _reference_scale(nope: int, rope: int, factor: float, mscale_all_dim: float,
                     max_len: int, original_len: int) -> float:
    """The package's softmax scale for a config with these numbers."""
    yarn = RopeScaling(factor=factor, mscale_all_dim=mscale_all_dim,
                       original_max_position_embeddings=original_len)
    cfg = ModelConfig.preset("tiny", qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                             rope_scaling=yarn, max_position_embeddings=max_len)
    return layers.softmax_scale(cfg)


@task(SET, "softmax_scale", references=[layers.softmax_scale, layers.yarn_mscale], hints=[
    "Without YaRN the scale is 1 / sqrt(d_h + d_R): the score is a dot product over both parts.",
    "YaRN is active only when max_len > original_len; then mscale = 0.1 * mscale_all_dim * "
    "ln(factor) + 1 (natural log), and 1 when factor <= 1.",
    "Queries and keys both carry one mscale, so the scale is mscale ** 2 / sqrt(d_h + d_R) "
    "when YaRN is active and 1 / sqrt(d_h + d_R) otherwise.",
])
def check_softmax_scale(fn) -> int:
    cases = [  # d_h, d_R, factor, mscale_all_dim, max_len, original_len
        (128, 64, 40.0, 1.0, 163840, 4096),  # the released DeepSeek-V3
        (128, 64, 40.0, 1.0, 4096, 4096),  # context not extended: no YaRN
        (16, 8, 4.0, 0.707, 1024, 256),
        (32, 16, 1.0, 1.0, 512, 256),  # factor 1: mscale is 1
    ]
    for nope, rope, factor, msc, max_len, orig in cases:
        case = (f"d_h={nope}, d_R={rope}, factor={factor:g}, mscale_all_dim={msc:g}, "
                f"max_len={max_len}, original_len={orig}")
        expected = torch.tensor(_reference_scale(nope, rope, factor, msc, max_len, orig),
                                dtype=torch.float64)
        got = call(fn, nope, rope, factor, msc, max_len, orig, case=case)
        base = (nope + rope) ** -0.5
        m = 0.1 * msc * math.log(factor) + 1 if factor > 1 else 1.0
        m10 = 0.1 * msc * math.log10(factor) + 1 if factor > 1 else 1.0
        active = max_len > orig
        variants = [(base * m, "multiplied by mscale once; the reference uses mscale ** 2 "
                               "(one factor each for queries and keys)"),
                    (nope ** -0.5 * (m * m if active else 1.0),
                     "used 1/sqrt(d_h): the score is a dot product over d_h + d_R dimensions"),
                    (1 / (nope + rope) * (m * m if active else 1.0),
                     "forgot the square root: 1 / sqrt(d_h + d_R)"),
                    (base * m10 * m10, "used log10; mscale uses the natural log")]
        if active:
            variants.append((base, "forgot mscale ** 2 although YaRN is active "
                                   "(max_len > original_len)"))
        else:
            variants.append((base * m * m, "applied mscale ** 2 although the context is not "
                                           "extended (max_len <= original_len): no YaRN"))
        expect_close(got, expected, "scale", case, rtol=1e-6,
                     variants=[(torch.tensor(v, dtype=torch.float64), msg)
                               for v, msg in variants])
    return len(cases)
