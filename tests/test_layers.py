import math

import torch
from torch.testing import assert_close

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3.config import RopeScaling
from minidsv3.layers import (
    RMSNorm,
    apply_rotary_emb,
    precompute_freqs_cis,
    rope_inv_freq,
    softmax_scale,
    yarn_correction_range,
    yarn_inv_freq,
    yarn_mscale,
)


def test_rmsnorm_formula():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.rand(16) + 0.5
    rms = (x.pow(2).sum(-1, keepdim=True) / 16 + 1e-6).sqrt()
    assert_close(norm(x), x / rms * norm.weight)


def rotate_with_matrices(x, positions, inv_freq):
    """Independent RoPE: an explicit 2x2 rotation of each interleaved pair."""
    out = torch.empty_like(x)
    for t, m in enumerate(positions):
        for i, theta in enumerate(inv_freq.tolist()):
            a = m * theta
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            pair = x[:, t, :, 2 * i: 2 * i + 2]  # (B, H, 2)
            out[:, t, :, 2 * i: 2 * i + 2] = pair @ rot.T
    return out


def test_rope_is_a_rotation_of_interleaved_pairs():
    cfg = ModelConfig.preset("tiny")
    x = torch.randn(2, 6, 3, cfg.qk_rope_head_dim)
    freqs = precompute_freqs_cis(cfg)[:6]
    inv_freq = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta)
    expected = rotate_with_matrices(x, range(6), inv_freq)
    assert_close(apply_rotary_emb(x, freqs), expected, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = ModelConfig.preset("tiny", qk_rope_head_dim=16)
    freqs = precompute_freqs_cis(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (apply_rotary_emb(q, freqs[m:m + 1]) * apply_rotary_emb(k, freqs[n:n + 1])).sum()

    for shift in (1, 7, 30):
        assert_close(score(5, 2), score(5 + shift, 2 + shift), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))  # but it does see the offset


def test_yarn_is_plain_rope_for_factor_one_or_short_context():
    plain = ModelConfig.preset("tiny", rope_scaling=None, max_position_embeddings=64)
    factor_one = plain.replace(
        rope_scaling=RopeScaling(factor=1.0, original_max_position_embeddings=16))
    short = plain.replace(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))
    for cfg in (factor_one, short):
        assert_close(precompute_freqs_cis(cfg), precompute_freqs_cis(plain))
        assert softmax_scale(cfg) == softmax_scale(plain)
    long = plain.replace(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16))
    assert not torch.allclose(precompute_freqs_cis(long), precompute_freqs_cis(plain))


def test_yarn_released_config_by_hand():
    y = RopeScaling()  # factor 40, L 4096, beta_fast 32, beta_slow 1
    # pair index for r rotations: 64 * ln(4096 / (2 pi r)) / (2 ln 1e4)
    #   r = 32 -> 10.47 -> floor 10;   r = 1 -> 22.5 -> ceil 23
    assert yarn_correction_range(y, 64, 1e4) == (10, 23)
    inv, yarn = rope_inv_freq(64, 1e4), yarn_inv_freq(y, 64, 1e4)
    assert_close(yarn[:11], inv[:11])  # fast pairs keep RoPE
    assert_close(yarn[23:], inv[23:] / 40)  # slow pairs fully interpolated
    middle = yarn[11:23] / inv[11:23]
    assert torch.all(middle < 1) and torch.all(middle > 1 / 40)
    assert torch.all(middle[1:] < middle[:-1])  # the ramp moves monotonically
    mscale = 0.1 * math.log(40) + 1
    assert math.isclose(yarn_mscale(40, 1.0), mscale)
    cfg = ModelConfig.preset("deepseek-v3")
    assert math.isclose(softmax_scale(cfg), mscale**2 / math.sqrt(192))


def test_yarn_frequency_of_a_blended_pair_by_hand():
    """Pair 16 of the released config lies strictly inside the ramp (10, 23).

    theta_16 = 1e4^(-32/64) = 0.01; ramp = (16 - 10) / (23 - 10) = 6/13 interpolated,
    so theta' = 0.01/40 * 6/13 + 0.01 * 7/13 = 0.01 * 286/520 = 0.0055.
    """
    yarn = yarn_inv_freq(RopeScaling(), 64, 1e4)
    assert math.isclose(yarn[16].item(), 0.0055, rel_tol=1e-12)
    cfg = ModelConfig.preset("deepseek-v3")
    angle_at_1000 = precompute_freqs_cis(cfg, 1001)[1000, 16].angle().item()
    assert math.isclose(angle_at_1000, math.remainder(1000 * 0.0055, 2 * math.pi), abs_tol=1e-5)


def test_yarn_attention_factor_when_mscale_differs_from_mscale_all_dim():
    """HF's convention: |rotation| = mscale(s, mscale) / mscale(s, mscale_all_dim),
    softmax scale x mscale(s, mscale_all_dim)^2; the released configs make the first 1."""
    cfg = ModelConfig.preset("tiny", max_position_embeddings=64, rope_scaling=RopeScaling(
        factor=40, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.707))
    ratio = (0.1 * math.log(40) + 1) / (0.0707 * math.log(40) + 1)
    assert_close(precompute_freqs_cis(cfg).abs(), torch.full((64, 2), ratio))
    assert math.isclose(softmax_scale(cfg), (0.0707 * math.log(40) + 1) ** 2 / math.sqrt(12))
    for name in ("deepseek-v3", "deepseek-v2"):
        released = precompute_freqs_cis(ModelConfig.preset(name), 8)
        assert_close(released.abs(), torch.ones(8, 32))


def test_rope_on_an_odd_width_split():
    """An odd kv_lora_rank leaves k_R at an odd offset; RoPE must still work there."""
    cfg = ModelConfig.preset("tiny", kv_lora_rank=7, qk_nope_head_dim=5)
    freqs = precompute_freqs_cis(cfg, 6)
    x = torch.randn(2, 6, 3, 7 + cfg.qk_rope_head_dim)
    odd_slice = x[..., 7:]  # storage offset 7, like kv_a_proj_with_mqa's split
    assert_close(apply_rotary_emb(odd_slice, freqs), apply_rotary_emb(odd_slice.clone(), freqs))
    out = DeepSeekV3(cfg)(torch.randint(0, cfg.vocab_size, (2, 6)))
    assert torch.isfinite(out.logits).all()
