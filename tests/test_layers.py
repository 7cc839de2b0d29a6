import math

import torch
from torch.testing import assert_close

from minidsv3 import ModelConfig
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
