"""The model at every precision: RoPE's table survives dtype casts, the router stays float32.

A bf16 model must compute what the float32 model computes, to bf16 accuracy. The
config has init std 0.1 so that attention is far from uniform and a RoPE that
scales instead of rotating changes the logits by much more than bf16 rounding does.
"""

import pytest
import torch
from torch.testing import assert_close

from minidsv3 import DeepSeekV3, ModelConfig, generate, set_seed
from minidsv3.hf import load_pretrained, save_pretrained
from minidsv3.layers import precompute_freqs_cis

CFG = ModelConfig.preset("tiny", initializer_range=0.1, max_position_embeddings=128)
CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(float16)": lambda m: m.to(torch.float16),
    "to(cpu, bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "double()": lambda m: m.double(),
    "to(float64)": lambda m: m.to(torch.float64),
}


@pytest.fixture(scope="module")
def fp32_model():
    set_seed(0)
    return DeepSeekV3(CFG).eval()


def copy_of(model: DeepSeekV3) -> DeepSeekV3:
    clone = DeepSeekV3(model.cfg).eval()
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("cast", CASTS)
def test_rope_table_survives_every_cast(fp32_model, cast):
    model = CASTS[cast](copy_of(fp32_model))
    assert model.freqs_cis.dtype == torch.complex64
    torch.testing.assert_close(model.freqs_cis, precompute_freqs_cis(CFG), rtol=0, atol=0)
    assert model.lm_head.weight.dtype != torch.float32  # while the weights did move


def test_bf16_logits_match_float32(fp32_model):
    """Within bf16 tolerance wherever both models route alike; a cos-only table misses by O(1).

    A token whose scores are within rounding of a tie may pick another expert in bf16
    (about 1 in 100 here): its logits then differ for a legitimate reason, so the
    tight tolerance applies to the tokens routed identically in every MoE layer.
    """
    tokens = torch.randint(0, CFG.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp32_model(tokens)
        got = copy_of(fp32_model).to(torch.bfloat16)(tokens)
        broken = copy_of(fp32_model)  # what the old real-part-only table computed
        broken.rope.freqs_cis = broken.freqs_cis.real.to(torch.complex64)
        wrong = broken(tokens).logits
    same_route = torch.ones(tokens.shape, dtype=torch.bool)
    for a, b in zip(ref.router, got.router):
        same_route &= (a.topk_idx.sort(-1).values == b.topk_idx.sort(-1).values).all(-1)
    assert same_route.float().mean() > 0.95
    err = (got.logits.float() - ref.logits).abs()[same_route].max().item()
    broken_err = (wrong - ref.logits).abs()[same_route].max().item()
    scale = ref.logits.abs().max().item()
    assert err < 0.03 * scale, (err, scale)  # bf16 keeps 8 bits: ~0.4% per rounding
    assert broken_err > 0.3 * scale, (broken_err, scale)
    agree = (got.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    assert agree > 0.9


def test_autocast_keeps_router_in_float32(fp32_model):
    gate = fp32_model.layers[1].mlp.gate
    x = torch.randn(5, CFG.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = gate.scores(x)
        weights, idx, scores = gate(x)
        assert torch.nn.functional.linear(x, gate.weight).dtype == torch.bfloat16  # autocast is on
    assert s.dtype == scores.dtype == weights.dtype == torch.float32
    assert_close(s, torch.sigmoid(x @ gate.weight.T), rtol=1e-6, atol=1e-6)


def test_autocast_forward_gives_float32_router_stats(fp32_model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32_model(tokens)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.scores.dtype == torch.float32 for r in out.router)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_cached_bf16_decoding_equals_bf16_full_forwards(fp32_model, mode):
    """Token for token, on the same attention path (the two paths round differently)."""
    model = copy_of(fp32_model).to(torch.bfloat16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got = generate(model, prompt, 24, temperature=0, attn_mode=mode).tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(24):  # the plainest greedy loop: re-run everything, bf16 all the way
            ids = torch.cat([ids, model(ids, attn_mode=mode).logits[:, -1:].argmax(-1)], dim=1)
    assert got == ids[0, len(prompt):].tolist()


def test_load_pretrained_in_bf16_keeps_the_rope_table(fp32_model, tmp_path):
    save_pretrained(fp32_model, tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.freqs_cis.dtype == torch.complex64
    assert_close(model.freqs_cis, precompute_freqs_cis(CFG), rtol=0, atol=0)
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
