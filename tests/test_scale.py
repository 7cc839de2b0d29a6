"""scale.py against independent paths: checkpoint names, torch's FLOP counter, hand arithmetic."""

import math
from fractions import Fraction

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3 import scale as S
from minidsv3.mla import MLACache, causal_mask

RELEASED = ModelConfig.preset("deepseek-v3")


@pytest.fixture(scope="module")
def released_widths_on_meta():
    """The released widths (256 experts, 128 heads, ...) with 4 blocks instead of 61: every
    kind of tensor at its real shape, built in a second (test_model checks all 61 blocks)."""
    with torch.device("meta"):
        return DeepSeekV3(RELEASED.replace(num_hidden_layers=4))


# -- where the parameters live --------------------------------------------------------------
NAME_RULES = [  # (substring of the checkpoint name, part); the first match wins
    ("embed_tokens", S.EMBEDDING), ("lm_head", S.HEAD), ("e_score_correction_bias", S.ROUTING_BIAS),
    ("norm.weight", S.NORMS), ("mlp.gate.weight", S.GATE), ("shared_experts.", S.SHARED),
    ("experts.", S.ROUTED), ("self_attn.q_", S.QUERY), ("self_attn.kv_a_proj", S.KV_DOWN),
    ("self_attn.kv_b_proj", S.KV_UP), ("self_attn.o_proj", S.ATTN_OUT), ("mlp.", S.DENSE_FFN),
]


def table_from_module(model: DeepSeekV3) -> dict[str, tuple[int, Fraction]]:
    """Totals and activated counts per part, classified by the tensors' names."""
    cfg = model.cfg
    rows = {part: [0, Fraction(0)] for part in S.PARTS}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "rope.freqs_cis" or name.endswith("expert_load"):
            continue  # derived or transient buffers, not in the checkpoint
        part = next(p for key, p in NAME_RULES if key in name) if "mtp." not in name else None
        share = Fraction(1)
        if "experts." in name and "shared_experts." not in name:
            share = Fraction(cfg.num_experts_per_tok, cfg.n_routed_experts)
        if "e_score_correction_bias" in name:
            share = Fraction(0)
        row = rows[part or S.MTP]
        row[0] += t.numel()
        row[1] += t.numel() * share
    return {part: (total, act) for part, (total, act) in rows.items()}


def assert_table_matches(model: DeepSeekV3) -> None:
    table = S.parameter_table(model.cfg)
    assert {r.part: (r.total, r.activated) for r in table} == table_from_module(model)
    counts = S.parameter_counts(model.cfg)
    assert sum(r.total for r in table) == counts.total + counts.mtp_unique
    assert sum(r.activated for r in table) == counts.activated + counts.mtp_activated


def test_parameter_table_matches_checkpoint_names_at_released_widths(released_widths_on_meta):
    assert_table_matches(released_widths_on_meta)


@pytest.mark.parametrize("overrides", [
    dict(), dict(q_lora_rank=0), dict(n_shared_experts=0, first_k_dense_replace=0),
    dict(num_nextn_predict_layers=2, n_shared_experts=2),
])
def test_parameter_table_matches_checkpoint_names_for_small_configs(overrides):
    assert_table_matches(DeepSeekV3(ModelConfig.preset("tiny", **overrides)))


@pytest.mark.parametrize("name, total_billions, digits",
                         [("deepseek-v2", 236, 0), ("deepseek-v2-lite", 15.7, 1)])
def test_v2_family_counts_at_released_widths(name, total_billions, digits):
    """V2 (236B) and V2-Lite (15.7B) as their paper states them (arXiv 2405.04434); the
    formula is checked tensor by tensor at the real widths on the meta device."""
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        assert_table_matches(DeepSeekV3(cfg.replace(num_hidden_layers=3)))
    counts = S.parameter_counts(cfg)
    assert counts.routing_biases == 0 and counts.mtp_unique == 0  # no bias, no MTP in V2
    assert round(counts.total / 1e9, digits) == total_billions


def test_parameter_table_of_released_config_by_hand():
    rows = {r.part: r for r in S.parameter_table(RELEASED)}
    d, L, moe = 7168, 61, 58
    assert rows[S.EMBEDDING].total == rows[S.HEAD].total == 129280 * d
    assert rows[S.QUERY].total == L * (d * 1536 + 1536 * 128 * (128 + 64))
    assert rows[S.KV_DOWN].total == L * d * (512 + 64)
    assert rows[S.KV_UP].total == L * 512 * 128 * (128 + 128)
    assert rows[S.ATTN_OUT].total == L * 128 * 128 * d
    assert rows[S.DENSE_FFN].total == 3 * 3 * d * 18432
    assert rows[S.SHARED].total == moe * 3 * d * 2048
    assert rows[S.ROUTED].total == moe * 256 * 3 * d * 2048
    assert rows[S.ROUTED].activated == moe * 8 * 3 * d * 2048
    assert rows[S.GATE].total == rows[S.GATE].activated == moe * 256 * d
    assert (rows[S.ROUTING_BIAS].total, rows[S.ROUTING_BIAS].activated) == (moe * 256, 0)
    assert rows[S.NORMS].total == L * (2 * d + 1536 + 512) + d
    # MTP: enorm, hnorm, eh_proj, shared_head.norm and one MoE block (with its 256 biases)
    mtp_block = (d * 1536 + 1536 * 128 * 192 + d * 576 + 512 * 128 * 256 + 128 * 128 * d
                 + 2 * d + 1536 + 512 + 257 * 3 * d * 2048 + 256 * d + 256)
    assert rows[S.MTP].total == 3 * d + 2 * d * d + mtp_block


# -- KV cache ---------------------------------------------------------------------------------
def test_kv_cache_of_released_config_by_hand():
    per_token = {"mla": 61 * (512 + 64) * 2, "mla-naive": 61 * 128 * (192 + 128) * 2,
                 "mha": 61 * 2 * 128 * 128 * 2, "gqa": 61 * 2 * 8 * 128 * 2,
                 "mqa": 61 * 2 * 128 * 2}
    assert per_token["mla"] == 70_272  # DESIGN.md / report sec. 2.1.1
    for layout, expected in per_token.items():
        assert S.kv_cache_bytes(RELEASED, layout) == expected
        assert S.kv_cache_bytes(RELEASED, layout, context=131072) == expected * 131072
    assert S.kv_cache_values_per_layer(RELEASED, "mha") == 32_768
    assert S.kv_cache_values_per_layer(RELEASED, "gqa", gqa_groups=16) == 16 * 256


@pytest.mark.parametrize("layout,mode", [("mla", "absorbed"), ("mla-naive", "naive")])
def test_mla_cache_bytes_equal_allocated_caches(layout, mode):
    cfg = ModelConfig.preset("toy")
    model = DeepSeekV3(cfg)
    caches = model.allocate_caches(1, 4, mode, torch.bfloat16)[: cfg.num_hidden_layers]
    assert all(isinstance(c, MLACache) for c in caches)
    assert S.kv_cache_bytes(cfg, layout, context=4) == 4 * sum(c.bytes_per_token() for c in caches)


def test_kv_cache_rejects_bad_layouts():
    with pytest.raises(ValueError, match="gqa_groups"):
        S.kv_cache_bytes(RELEASED, "gqa", gqa_groups=3)
    with pytest.raises(ValueError, match="layout"):
        S.kv_cache_bytes(RELEASED, "paged")


# -- FLOPs -------------------------------------------------------------------------------------
def counted_flops(model, tokens, train: bool) -> int:
    # The reference ("math") attention kernel: two batched matmuls over the full T x T
    # square, which the counter sees (it does not count the fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if train:
            model(tokens, targets=torch.roll(tokens, -1, 1)).loss.backward()
        else:
            model(tokens)
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=0, n_shared_experts=2)])
def test_flops_equal_torch_flop_counter(overrides):
    cfg = ModelConfig.preset("tiny", **overrides)
    model, (B, T) = DeepSeekV3(cfg), (2, 16)
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    # The math kernel computes the full T x T score matrix, masked afterwards: causal=False.
    main = S.flops_per_token(cfg, T, causal=False, include_mtp=False)
    assert counted_flops(model, tokens, train=False) == B * T * main.forward
    # Training: main model on T tokens, MTP depth 1 on T-1 of them; backward = 2 x forward.
    with_mtp = S.flops_per_token(cfg, T - 1, causal=False)
    without = S.flops_per_token(cfg, T - 1, causal=False, include_mtp=False)
    expected = B * T * main.training + B * (T - 1) * (with_mtp.training - without.training)
    assert counted_flops(model, tokens, train=True) == expected


def test_causal_attention_counts_the_allowed_pairs():
    cfg, T = ModelConfig.preset("tiny"), 37
    pairs = int(causal_mask(T, T).sum())
    per_pair = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert S.attention_flops_per_token(cfg, T) * T == pairs * per_pair * layers
    with pytest.raises(ValueError, match="seq_len"):
        S.attention_flops_per_token(cfg, 0)


def test_released_flops_are_6n_plus_attention():
    counts = S.parameter_counts(RELEASED)
    rows = {r.part: r for r in S.parameter_table(RELEASED)}
    n_main = counts.activated - rows[S.EMBEDDING].total - rows[S.NORMS].total
    assert S.matmul_weights_per_token(RELEASED, include_mtp=False) == n_main
    # MTP: everything but its norm gains (enorm, hnorm, shared_head.norm, the block's two
    # pre-norms, q_a_layernorm, kv_a_layernorm), plus the shared head once more.
    d = 7168
    n_mtp = counts.mtp_activated - (3 * d + 2 * d + 1536 + 512) + 129280 * d
    assert S.matmul_weights_per_token(RELEASED) == n_main + n_mtp
    f = S.flops_per_token(RELEASED, 4096)
    attention = 2 * 128 * (192 + 128) * 4097 / 2 * 62
    assert f.training == 6 * (n_main + n_mtp) + 3 * attention
    assert S.training_flops(RELEASED) == 14.8e12 * f.training


# -- cost --------------------------------------------------------------------------------------
def test_reported_cost_and_mfu():
    assert sum(S.REPORTED_GPU_HOURS.values()) == 2_788_000
    assert S.training_cost() == pytest.approx(5.576e6)
    assert S.REPORTED_GPU_HOURS["pre-training"] == 14.8 * 180_000  # "180K hours per 1T tokens"
    # One GPU-hour at a 2 TFLOP/s peak could do 7.2e15 FLOPs; 3.6e15 of them is 50%.
    assert S.model_flops_utilization(3.6e15, 1, 2e12) == pytest.approx(0.5)
    flops = S.training_flops(RELEASED)
    bf16 = S.model_flops_utilization(flops, 2_664_000)
    assert bf16 == pytest.approx(2 * S.model_flops_utilization(flops, 2_664_000, 1979e12))
    with pytest.raises(ValueError, match="gpu_hours"):
        S.model_flops_utilization(flops, 0)


# -- memory ------------------------------------------------------------------------------------
def weight_bytes_from_module(model: DeepSeekV3, fmt: str) -> int:
    """Bytes by tensor name: block linears in FP8 + 128x128 FP32 scales, biases FP32."""
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "rope.freqs_cis" or name.endswith("expert_load"):
            continue
        if name.endswith("e_score_correction_bias"):
            total += 4 * t.numel()
        elif fmt == "fp8" and t.dim() == 2 and (".self_attn." in name or ".mlp." in name) \
                and not name.endswith("mlp.gate.weight"):
            total += t.numel() + 4 * math.ceil(t.shape[0] / 128) * math.ceil(t.shape[1] / 128)
        else:
            total += 2 * t.numel()
    return total


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_weight_bytes_match_tensor_by_tensor_sum(fmt, released_widths_on_meta):
    model = released_widths_on_meta
    assert S.weight_bytes(model.cfg, fmt) == weight_bytes_from_module(model, fmt)
    tiny = DeepSeekV3(ModelConfig.preset("tiny"))
    assert S.weight_bytes(tiny.cfg, fmt) == weight_bytes_from_module(tiny, fmt)


def test_training_state_bytes_by_hand():
    counts = S.parameter_counts(RELEASED)
    params = counts.weights + counts.mtp_unique - 256  # the MTP block's biases are buffers
    biases = counts.routing_biases + 256
    # Report: BF16 weights + FP32 grads + FP32 master + 2 BF16 moments = 14 bytes.
    assert S.training_state_bytes(RELEASED) == 14 * params + 4 * biases
    assert S.training_state_bytes(RELEASED, S.Precision(moments=4)) == 18 * params + 4 * biases
    assert S.training_state_bytes(RELEASED, include_mtp=False) == (
        14 * counts.weights + 4 * counts.routing_biases)


def test_activation_estimate_of_tiny_by_hand():
    cfg = ModelConfig.preset("tiny")  # d 32, q_lora 16, 2 heads of 12/8, d_c 8, d_R 4
    attn = 2 * 32 + 2 * 16 + (8 + 4) + 8 + 2 * 2 * 12 + 2 * 2 * 8  # = 196
    dense = attn + 2 * 32 + 3 * 64
    moe = attn + 2 * 32 + 8 + 2 * (32 + 3 * 16) + 3 * 16  # scores, 2 routed, 1 shared
    assert S.activation_values_per_token(cfg, 0) == dense == 452
    assert S.activation_values_per_token(cfg, 1) == moe == 476
    # two main blocks and the MTP block in bf16, plus FP32 logits of the two heads
    assert S.activation_bytes_per_token(cfg) == 2 * (dense + 2 * moe) + 2 * 64 * 4


def test_gpus_needed_and_bad_arguments():
    assert S.gpus_needed(80e9) == 1 and S.gpus_needed(80e9 + 1) == 2
    assert S.gpus_needed(100, gpu_bytes=30) == 4
    with pytest.raises(ValueError, match="gpu_bytes"):
        S.gpus_needed(1, gpu_bytes=0)
    with pytest.raises(ValueError, match="fmt"):
        S.weight_bytes(RELEASED, "fp16")
