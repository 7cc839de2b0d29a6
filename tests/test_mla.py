import pytest
import torch
from torch.testing import assert_close

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3.layers import apply_rotary_emb, precompute_freqs_cis
from minidsv3.mla import MLA, MLACache, cache_bytes_per_token

CFGS = {
    "q_lora": ModelConfig.preset("tiny", num_attention_heads=4),
    "no_q_lora": ModelConfig.preset("tiny", num_attention_heads=3, q_lora_rank=0),
}


def reference_attention(attn: MLA, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-11 written out head by head with explicit matrices (no einops, no SDPA)."""
    cfg = attn.cfg
    B, T, _ = x.shape
    dn, dr, dv, dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    else:
        q = attn.q_proj(x)
    kv_a = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = attn.kv_a_layernorm(kv_a[..., :dc])
    k_r = apply_rotary_emb(kv_a[..., dc:].reshape(B, T, 1, dr), freqs).reshape(B, T, dr)
    w_kv = attn.kv_b_proj.weight  # (H*(dn+dv), dc)
    heads = []
    for h in range(cfg.num_attention_heads):
        rows = w_kv[h * (dn + dv):(h + 1) * (dn + dv)]
        k_c, v = c_kv @ rows[:dn].T, c_kv @ rows[dn:].T  # (B, T, dn), (B, T, dv)
        q_h = q[..., h * (dn + dr):(h + 1) * (dn + dr)]
        q_c = q_h[..., :dn]
        q_r = apply_rotary_emb(q_h[..., dn:].reshape(B, T, 1, dr), freqs).reshape(B, T, dr)
        scores = (q_c @ k_c.transpose(1, 2) + q_r @ k_r.transpose(1, 2)) / (dn + dr) ** 0.5
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        heads.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_both_paths_equal_the_written_out_equations(name, mode):
    cfg = CFGS[name]
    attn = MLA(cfg)
    for p in attn.parameters():  # break the all-ones norms so they matter
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 9, cfg.hidden_size)
    freqs = precompute_freqs_cis(cfg)[:9]
    assert_close(attn(x, freqs, mode=mode), reference_attention(attn, x, freqs),
                 atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", CFGS)
def test_token_by_token_decode_with_caches_matches_full_forward(name):
    cfg = CFGS[name]
    attn = MLA(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    freqs = precompute_freqs_cis(cfg)
    full = attn(x, freqs[:10], mode="naive")
    for mode in ("naive", "absorbed"):
        cache = MLACache.allocate(cfg, 2, 16, mode)
        # prefill 4 tokens, then one at a time
        steps = [attn(x[:, :4], freqs[:4], 0, cache, mode)]
        for t in range(4, 10):
            steps.append(attn(x[:, t:t + 1], freqs[t:t + 1], t, cache, mode))
        assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_model_level_naive_equals_absorbed_decode():
    cfg = ModelConfig.preset("tiny")
    model = DeepSeekV3(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(tokens).logits
    outs = {}
    for mode in ("naive", "absorbed"):
        caches = model.allocate_caches(2, 12, mode)
        logits = [model(tokens[:, :5], caches=caches, attn_mode=mode).logits]
        for t in range(5, 12):
            logits.append(model(tokens[:, t:t + 1], start_pos=t, caches=caches,
                                attn_mode=mode).logits)
        outs[mode] = torch.cat(logits, dim=1)
        assert_close(outs[mode], full, atol=1e-5, rtol=1e-5)


def test_cache_sizes():
    cfg = CFGS["q_lora"]
    absorbed = MLACache.allocate(cfg, 1, 8, "absorbed")
    naive = MLACache.allocate(cfg, 1, 8, "naive")
    per_token = absorbed.first[0, 0].numel() + absorbed.second[0, 0].numel()
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert absorbed.bytes_per_token() == cache_bytes_per_token(cfg, "absorbed", dtype_bytes=4)
    assert naive.bytes_per_token() == cache_bytes_per_token(cfg, "naive", dtype_bytes=4)
    assert naive.bytes_per_token() == 4 * 4 * (cfg.qk_head_dim + cfg.v_head_dim)
    big = ModelConfig.preset("deepseek-v3")
    assert cache_bytes_per_token(big, "absorbed") // 2 == 576  # values per token per layer
    assert cache_bytes_per_token(big, "absorbed") * big.num_hidden_layers == 70_272


def test_cache_overflow_and_mode_mismatch_are_clear():
    cfg = CFGS["q_lora"]
    attn = MLA(cfg)
    freqs = precompute_freqs_cis(cfg)
    cache = MLACache.allocate(cfg, 1, 4, "absorbed")
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        attn(torch.randn(1, 5, cfg.hidden_size), freqs[:5], 0, cache, "absorbed")
    with pytest.raises(ValueError, match="allocated for mode 'absorbed'"):
        attn(torch.randn(1, 2, cfg.hidden_size), freqs[:2], 0, cache, "naive")


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
@pytest.mark.parametrize("prefix, chunk", [(5, 3), (1, 7), (7, 1)])
def test_a_chunk_after_a_filled_cache_equals_the_uncached_forward(mode, prefix, chunk):
    """Speculative verification and chunked prefill: several new tokens at once, after a
    prefix already in the cache. Each new token must see the prefix and the chunk's
    earlier tokens, nothing after it and nothing beyond what was written: unwritten cache
    positions are filled with garbage so that reading them shows."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", initializer_range=0.1)
    model = DeepSeekV3(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, prefix + chunk))
    with torch.no_grad():
        full = model(tokens).logits  # uncached, naive path, as in training
        caches = model.allocate_caches(2, prefix + chunk + 4, mode)
        for cache in caches:
            cache.first.normal_(0, 100)
            cache.second.normal_(0, 100)
        model(tokens[:, :prefix], caches=caches, attn_mode=mode)
        out = model(tokens[:, prefix:], start_pos=prefix, caches=caches, attn_mode=mode).logits
    assert_close(out, full[:, prefix:], atol=1e-5, rtol=1e-4)
