"""The DeepSeek-V3 checkpoint format: independent reference, FP8, round trips, errors.

The reference forward below is written separately from the package, in the style
of HF transformers: RoPE by rotate-half on de-interleaved dims, attention head by
head with explicit K and V, MoE as a per-token loop over the chosen experts, all in
float64 straight from the checkpoint's keys. A checkpoint built here by hand (not
by ``save_pretrained``) must give the same logits through ``load_pretrained``.
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minidsv3 import DeepSeekV3, ModelConfig, load_pretrained, save_pretrained
from minidsv3.hf import dequantize_fp8, key_map, read_config

# Tiny, but with YaRN switched on (context 64 > original 16), query compression,
# group-limited routing with a non-zero bias, and one MTP module.
YARN = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=4.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0)
CFG = ModelConfig.preset("tiny", qk_rope_head_dim=8, rope_theta=100.0, rope_scaling=YARN,
                         n_routed_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5)


# ---------------------------------------------------------------- a checkpoint by hand

def random_checkpoint(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's key names, listed from DESIGN.md by hand."""
    g = torch.Generator().manual_seed(seed)

    def mat(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1 + 0.3 * torch.randn(n, generator=g)  # not all-ones: a swapped norm shows

    d, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    c, L = cfg.kv_lora_rank, cfg.num_hidden_layers
    sd = {"model.embed_tokens.weight": mat(V, d, std=1.0), "model.norm.weight": norm(d),
          "lm_head.weight": mat(V, d)}
    for i in range(L + cfg.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = norm(d)
        sd[f"{p}.post_attention_layernorm.weight"] = norm(d)
        if cfg.q_lora_rank:
            sd[f"{p}.self_attn.q_a_proj.weight"] = mat(cfg.q_lora_rank, d)
            sd[f"{p}.self_attn.q_a_layernorm.weight"] = norm(cfg.q_lora_rank)
            sd[f"{p}.self_attn.q_b_proj.weight"] = mat(H * (nope + rope), cfg.q_lora_rank)
        else:
            sd[f"{p}.self_attn.q_proj.weight"] = mat(H * (nope + rope), d)
        sd[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] = mat(c + rope, d)
        sd[f"{p}.self_attn.kv_a_layernorm.weight"] = norm(c)
        sd[f"{p}.self_attn.kv_b_proj.weight"] = mat(H * (nope + v), c)
        sd[f"{p}.self_attn.o_proj.weight"] = mat(d, H * v)
        if i < cfg.first_k_dense_replace:
            experts = {f"{p}.mlp": cfg.intermediate_size}
        else:
            sd[f"{p}.mlp.gate.weight"] = mat(cfg.n_routed_experts, d, std=0.5)
            if cfg.topk_method == "noaux_tc":  # V2 checkpoints have no routing bias
                sd[f"{p}.mlp.gate.e_score_correction_bias"] = mat(cfg.n_routed_experts, std=0.1)
            experts = {f"{p}.mlp.experts.{j}": cfg.moe_intermediate_size
                       for j in range(cfg.n_routed_experts)}
            experts[f"{p}.mlp.shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
        for e, inter in experts.items():
            sd[f"{e}.gate_proj.weight"] = mat(inter, d)
            sd[f"{e}.up_proj.weight"] = mat(inter, d)
            sd[f"{e}.down_proj.weight"] = mat(d, inter)
        if i >= L:  # an MTP module, stored as one more layer
            sd[f"{p}.enorm.weight"] = norm(d)
            sd[f"{p}.hnorm.weight"] = norm(d)
            sd[f"{p}.eh_proj.weight"] = mat(d, 2 * d)
            sd[f"{p}.shared_head.norm.weight"] = norm(d)
            sd[f"{p}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
            sd[f"{p}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    return sd


# ---------------------------------------------------------------- the reference forward

def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_inv_freq(cfg):
    """Frequencies per rotated pair, with YaRN's ramp between extrapolation and interpolation."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    y = cfg.rope_scaling
    if y is None or cfg.max_position_embeddings <= y.original_max_position_embeddings:
        return freq_extra, 1.0, 1.0
    freq_inter = freq_extra / y.factor

    def correction_dim(rotations):
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolate = 1 - ramp
    mscale = 0.1 * y.mscale_all_dim * math.log(y.factor) + 1.0  # on the softmax scale
    cos_factor = (0.1 * y.mscale * math.log(y.factor) + 1.0) / mscale  # on cos and sin
    return freq_inter * (1 - extrapolate) + freq_extra * extrapolate, mscale, cos_factor


def ref_rope(x, positions, inv_freq, cos_factor=1.0):
    """HF style: de-interleave (x0, x1, x2, x3..) -> (x0, x2.., x1, x3..), then rotate halves."""
    T, H, D = x.shape
    x = x.reshape(T, H, D // 2, 2).transpose(2, 3).reshape(T, H, D)
    angles = positions[:, None].double() * inv_freq[None]  # (T, D/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # (T, 1, D)
    rotated = torch.cat([-x[..., D // 2:], x[..., : D // 2]], dim=-1)
    return (x * emb.cos() + rotated * emb.sin()) * cos_factor


def ref_mlp(sd, p, x):
    return (F.silu(x @ sd[f"{p}.gate_proj.weight"].T) * (x @ sd[f"{p}.up_proj.weight"].T)
            ) @ sd[f"{p}.down_proj.weight"].T


def ref_attention(sd, p, cfg, x):
    T, H = x.shape[0], cfg.num_attention_heads
    nope, rope, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if f"{p}.q_a_proj.weight" in sd:
        q_latent = rms(x @ sd[f"{p}.q_a_proj.weight"].T, sd[f"{p}.q_a_layernorm.weight"],
                       cfg.rms_norm_eps)
        q = q_latent @ sd[f"{p}.q_b_proj.weight"].T
    else:
        q = x @ sd[f"{p}.q_proj.weight"].T
    q = q.reshape(T, H, nope + rope)
    kv_a = x @ sd[f"{p}.kv_a_proj_with_mqa.weight"].T  # (T, c + rope)
    latent = rms(kv_a[:, :c], sd[f"{p}.kv_a_layernorm.weight"], cfg.rms_norm_eps)
    kv = (latent @ sd[f"{p}.kv_b_proj.weight"].T).reshape(T, H, nope + cfg.v_head_dim)
    inv_freq, mscale, cos_factor = ref_inv_freq(cfg)
    pos = torch.arange(T)
    q_pe = ref_rope(q[..., nope:], pos, inv_freq, cos_factor)  # (T, H, rope)
    k_pe = ref_rope(kv_a[:, None, c:], pos, inv_freq, cos_factor)[:, 0]  # (T, rope), all heads
    scale = (nope + rope) ** -0.5 * mscale * mscale
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(H):
        q_h = torch.cat([q[:, h, :nope], q_pe[:, h]], dim=-1)  # (T, nope + rope)
        k_h = torch.cat([kv[:, h, :nope], k_pe], dim=-1)
        v_h = kv[:, h, nope:]
        scores = (q_h @ k_h.T * scale).masked_fill(future, float("-inf"))
        heads.append(scores.softmax(-1) @ v_h)
    return torch.cat(heads, dim=-1) @ sd[f"{p}.o_proj.weight"].T


def ref_moe(sd, p, cfg, x):
    """V3 (sigmoid, bias, top-2-sum groups, renormalised) or V2 (softmax, max groups, raw)."""
    E, G = cfg.n_routed_experts, cfg.n_group
    per_group = E // G
    out = torch.zeros_like(x)
    bias = sd.get(f"{p}.gate.e_score_correction_bias")
    for t in range(x.shape[0]):
        logits = sd[f"{p}.gate.weight"] @ x[t]  # (E,)
        s = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        biased = s if bias is None else s + bias
        if bias is not None:
            group_score = [biased[g * per_group:(g + 1) * per_group].topk(2).values.sum()
                           for g in range(G)]
        else:
            group_score = [biased[g * per_group:(g + 1) * per_group].max() for g in range(G)]
        groups = torch.stack(group_score).topk(cfg.topk_group).indices.tolist()
        allowed = [e for e in range(E) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e].item())[: cfg.num_experts_per_tok]
        weights = s[chosen] / (s[chosen].sum() if cfg.norm_topk_prob else 1)
        weights = weights * cfg.routed_scaling_factor
        for w, e in zip(weights, chosen):
            out[t] += w * ref_mlp(sd, f"{p}.experts.{e}", x[t])
        out[t] += ref_mlp(sd, f"{p}.shared_experts", x[t])
    return out


def ref_layer(sd, i, cfg, h):
    p = f"model.layers.{i}"
    h = h + ref_attention(sd, f"{p}.self_attn", cfg,
                          rms(h, sd[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps))
    x = rms(h, sd[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
    dense = i < cfg.first_k_dense_replace
    return h + (ref_mlp(sd, f"{p}.mlp", x) if dense else ref_moe(sd, f"{p}.mlp", cfg, x))


def reference_logits(sd, cfg, tokens):
    """Main logits (T, V) and depth-1 MTP logits (T-1, V) of one sequence."""
    sd = {k: v.double() for k, v in sd.items()}
    eps, L = cfg.rms_norm_eps, cfg.num_hidden_layers
    h = sd["model.embed_tokens.weight"][tokens]
    for i in range(L):
        h = ref_layer(sd, i, cfg, h)
    logits = rms(h, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T
    if not cfg.num_nextn_predict_layers:  # V2: no MTP module
        return logits, None
    p = f"model.layers.{L}"
    emb = sd[f"{p}.embed_tokens.weight"][tokens[1:]]  # t_{i+1}
    merged = torch.cat([rms(emb, sd[f"{p}.enorm.weight"], eps),
                        rms(h[:-1], sd[f"{p}.hnorm.weight"], eps)], dim=-1)
    h1 = ref_layer(sd, L, cfg, merged @ sd[f"{p}.eh_proj.weight"].T)
    mtp_logits = rms(h1, sd[f"{p}.shared_head.norm.weight"], eps) @ sd[
        f"{p}.shared_head.head.weight"].T
    return logits, mtp_logits


def model_logits(model, tokens):
    """The same two sets of logits through the package (uncached, as in training)."""
    out = model(tokens[None])
    if not model.mtp:
        return out.logits[0], None
    T, mtp = tokens.shape[0], model.mtp[0]
    h1, _ = mtp(out.hidden[:, :-1], model.embed_tokens(tokens[None, 1:]), model.freqs_cis[: T - 1])
    return out.logits[0], model.lm_head(mtp.norm(h1))[0]


def write_checkpoint(path, sd, cfg, v5_layout=False, **config_extra):
    """The weights, and config.json in the release's layout or transformers-5's."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, path / "model.safetensors")
    config = cfg.to_hf_dict()
    if v5_layout:
        yarn = config.pop("rope_scaling")
        config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"),
                                     **({"rope_type": "yarn", **yarn} if yarn else
                                        {"rope_type": "default"})}
        config["rope_parameters"].pop("type", None)
    if cfg.model_type == "deepseek_v2":  # V2 files have no MTP field at all
        del config["num_nextn_predict_layers"]
    (path / "config.json").write_text(json.dumps({**config, **config_extra}))


# ---------------------------------------------------------------- FP8 by hand

def quantize_fp8(w, block=128):
    """Per 128x128 block: scale = amax / 448, q = w / scale in e4m3; returns (q, scale_inv)."""
    R, C = w.shape
    nr, nc = math.ceil(R / block), math.ceil(C / block)
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale).to(q.dtype)
            scale_inv[i, j] = scale
    return q, scale_inv


def dequantize_by_loop(q, scale_inv, block=128):
    out = q.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale_inv[i, j]
    return out


def test_fp8_block_dequantisation_with_edge_blocks():
    w = torch.randn(300, 200) * torch.linspace(0.01, 3, 200)  # blocks of different ranges
    q, scale_inv = quantize_fp8(w)
    assert scale_inv.shape == (3, 2)  # 128+128+44 rows, 128+72 columns
    deq = dequantize_fp8(q, scale_inv)
    assert torch.equal(deq, dequantize_by_loop(q, scale_inv))
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, plus the subnormal step.
    scale_per_elem = dequantize_by_loop(torch.ones(300, 200).to(q.dtype), scale_inv)
    assert ((deq - w).abs() <= w.abs() / 16 + scale_per_elem * 2**-9).all()
    with pytest.raises(ValueError, match="expected \\(3, 2\\)"):
        dequantize_fp8(q, scale_inv[:, :1])


# ---------------------------------------------------------------- loading a foreign checkpoint

# The V2 members at tiny width: V2's softmax gate with max-score groups and route scale 16,
# V2-Lite's greedy top-k without query LoRA; both YaRN with mscale 0.707, no MTP.
V2_YARN = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
FAMILY = {
    "v3": CFG,
    "v3-no-q-lora": CFG.replace(q_lora_rank=0),
    "v3-cos-factor": CFG.replace(rope_scaling={**YARN, "mscale_all_dim": 0.707}),
    "v2": CFG.replace(scoring_func="softmax", topk_method="group_limited_greedy",
                      norm_topk_prob=False, routed_scaling_factor=16.0, rope_scaling=V2_YARN,
                      num_nextn_predict_layers=0),
    "v2-lite": CFG.replace(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                           norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=0,
                           rope_scaling=V2_YARN, num_nextn_predict_layers=0),
}


@pytest.mark.parametrize("v5_layout", [False, True], ids=["release-layout", "v5-layout"])
@pytest.mark.parametrize("member", FAMILY)
def test_foreign_checkpoint_matches_independent_reference(tmp_path, member, v5_layout):
    cfg = FAMILY[member]
    sd = random_checkpoint(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (12,))
    ref, ref_mtp = reference_logits(sd, cfg, tokens)
    write_checkpoint(tmp_path, sd, cfg, v5_layout=v5_layout)
    model = load_pretrained(tmp_path)
    assert model.cfg == cfg
    logits, mtp_logits = model_logits(model, tokens)
    assert ref.std() > 1  # logits far from trivial, so agreement means something
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    if ref_mtp is not None:
        torch.testing.assert_close(mtp_logits.double(), ref_mtp, rtol=1e-4, atol=1e-4)


def test_fp8_checkpoint_is_dequantised_on_load(tmp_path):
    sd = random_checkpoint(CFG)
    fp8 = {}
    for k, w in sd.items():  # the release quantises every projection matrix, nothing else
        if k.endswith("proj.weight"):
            fp8[k], fp8[k + "_scale_inv"] = quantize_fp8(w, block=16)
            sd[k] = dequantize_by_loop(fp8[k], fp8[k + "_scale_inv"], block=16)
        else:
            fp8[k] = w
    tokens = torch.randint(0, CFG.vocab_size, (10,))
    ref, ref_mtp = reference_logits(sd, CFG, tokens)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [16, 16]}
    write_checkpoint(tmp_path, fp8, CFG, quantization_config=quant)
    model = load_pretrained(tmp_path)
    w = model.layers[0].self_attn.kv_b_proj.weight
    assert torch.equal(w, sd["model.layers.0.self_attn.kv_b_proj.weight"])
    logits, mtp_logits = model_logits(model, tokens)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mtp_logits.double(), ref_mtp, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- round trips

def test_round_trip_single_file_gives_identical_logits(tmp_path):
    model = DeepSeekV3(CFG).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["model_type"] == "deepseek_v3" and config["torch_dtype"] == "float32"
    loaded = load_pretrained(tmp_path)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert torch.equal(model_logits(model, tokens[0])[1], model_logits(loaded, tokens[0])[1])
    assert not loaded.training and loaded.freqs_cis.device.type == "cpu"


def test_saved_keys_are_the_release_layout(tmp_path):
    model = DeepSeekV3(CFG)
    save_pretrained(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    by_hand = random_checkpoint(CFG)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in by_hand.items()}
    L = CFG.num_hidden_layers
    assert torch.equal(saved[f"model.layers.{L}.embed_tokens.weight"], model.embed_tokens.weight)
    assert torch.equal(saved[f"model.layers.{L}.shared_head.head.weight"], model.lm_head.weight)
    assert torch.equal(saved[f"model.layers.{L}.shared_head.norm.weight"], model.mtp[0].norm.weight)
    assert torch.equal(saved[f"model.layers.{L}.input_layernorm.weight"],
                       model.mtp[0].block.input_layernorm.weight)


def test_sharded_round_trip_and_bf16(tmp_path):
    model = DeepSeekV3(CFG).eval()
    save_pretrained(model, tmp_path, max_shard_size=30_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).stat().st_size < 30_000 + 10_000 for s in shards)  # + header
    assert set(index["weight_map"]) == set(key_map(model))
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        got = loaded.state_dict()[name]
        want = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    # Saving again as one file removes the shards and the index that would mislead a loader.
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_meta_device_checks_without_reading_data(tmp_path):
    save_pretrained(DeepSeekV3(CFG), tmp_path)
    model = load_pretrained(tmp_path, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.layers[1].self_attn.kv_b_proj.weight.shape == (2 * (8 + 8), 8)


def test_release_config_key_names_and_shapes():
    """The 671B layout on the meta device: key names, a few shapes, the 685B total."""
    with torch.device("meta"):
        model = DeepSeekV3(ModelConfig.preset("deepseek-v3"))
    keys, state = key_map(model), model.state_dict()
    shapes = {k: tuple(state[n].shape) for k, n in keys.items()}
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (512 + 64, 7168)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (128 * 256, 512)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (7168, 128 * 128)
    assert shapes["model.layers.2.mlp.down_proj.weight"] == (7168, 18432)
    assert shapes["model.layers.3.mlp.experts.255.up_proj.weight"] == (2048, 7168)
    assert shapes["model.layers.60.mlp.shared_experts.gate_proj.weight"] == (2048, 7168)
    assert shapes["model.layers.3.mlp.gate.e_score_correction_bias"] == (256,)
    assert shapes["model.layers.61.eh_proj.weight"] == (7168, 2 * 7168)
    assert shapes["model.layers.61.shared_head.head.weight"] == (129280, 7168)
    assert shapes["model.layers.61.embed_tokens.weight"] == (129280, 7168)
    assert "model.layers.62.enorm.weight" not in shapes
    total = sum(math.prod(s) for s in shapes.values())
    copies = 2 * 129280 * 7168  # the MTP layer's embedding and head
    assert total == sum(t.numel() for t in state.values()) + copies
    assert 684e9 < total < 685e9  # the release's "685B" (671B main + MTP with copies)


# ---------------------------------------------------------------- errors

def saved(tmp_path):
    save_pretrained(DeepSeekV3(CFG), tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = saved(tmp_path)
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path)
    assert "missing keys: ['model.layers.1.mlp.experts.3.up_proj.weight']" in str(err.value)
    assert "unexpected keys: ['model.layers.1.self_attn.rotary_emb.inv_freq']" in str(err.value)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    sd = saved(tmp_path)
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(16, 32)  # transposed
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: "
                                         r"checkpoint shape \(16, 32\) != model shape \(32, 16\)"):
        load_pretrained(tmp_path)


def test_differing_mtp_copy_is_refused(tmp_path):
    sd = saved(tmp_path)
    sd["model.layers.2.embed_tokens.weight"] += 1
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.2.embed_tokens.weight differs"):
        load_pretrained(tmp_path)


def test_truncated_or_corrupt_file_is_named(tmp_path):
    save_pretrained(DeepSeekV3(CFG), tmp_path, max_shard_size=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = sorted(set(index["weight_map"].values()))[1]  # the second shard
    shard = tmp_path / name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{name} .*truncated"):
        load_pretrained(tmp_path)
    shard.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=name):
        load_pretrained(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=name):
        load_pretrained(tmp_path)


def test_other_architecture_and_pickles_are_refused(tmp_path):
    save_pretrained(DeepSeekV3(CFG), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    llama = {**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match="not a DeepSeek-V3 or V2 checkpoint"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="only 'fp8'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are pickle files"):
        load_pretrained(tmp_path)


def test_release_config_json_is_read_with_its_quantization_config(tmp_path):
    """The fields of the released config.json (as published), FP8 block size included."""
    release = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
        "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
        "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
        "v_head_dim": 128, "vocab_size": 129280,
    }
    (tmp_path / "config.json").write_text(json.dumps(release))
    cfg, block = read_config(tmp_path)
    assert block == (128, 128)
    training_only = {"initializer_range", "aux_loss_alpha"}  # not architecture
    preset = ModelConfig.preset("deepseek-v3")
    for name, value in preset.to_dict().items():
        if name not in training_only:
            assert cfg.to_dict()[name] == value, name


# ---------------------------------------------------------------- hostile checkpoints

def sharded(tmp_path):
    """A sharded checkpoint in tmp_path/ckpt; returns its directory and parsed index."""
    ckpt = tmp_path / "ckpt"
    save_pretrained(DeepSeekV3(CFG), ckpt, max_shard_size=30_000)
    return ckpt, json.loads((ckpt / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("entry", ["../gold/{name}", "{gold}/{name}", "sub/{name}", "..", ""])
def test_index_entries_must_be_plain_names_inside_the_directory(tmp_path, entry):
    ckpt, index = sharded(tmp_path)
    name = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "gold").mkdir()
    (ckpt / "sub").mkdir()
    for outside in (tmp_path / "gold" / name, ckpt / "sub" / name):
        outside.write_bytes((ckpt / name).read_bytes())  # the same tensors, elsewhere
    (ckpt / name).unlink()
    bad = entry.format(name=name, gold=tmp_path / "gold")
    index["weight_map"] = {k: bad if f == name else f for k, f in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"index.json.*{re.escape(repr(bad))}.*plain file name"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("weight_map", [["model-00001-of-00002.safetensors"], {"k": 5}])
def test_index_weight_map_must_map_keys_to_file_names(tmp_path, weight_map):
    ckpt, index = sharded(tmp_path)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="index.json"):
        load_pretrained(ckpt)


def test_key_listed_in_two_shards_of_the_index_is_refused(tmp_path):
    ckpt, index = sharded(tmp_path)
    key = "model.norm.weight"
    first, other = index["weight_map"][key], sorted(set(index["weight_map"].values()))[0]
    assert first != other
    # JSON objects may repeat a key; json.loads would silently keep the last one.
    text = json.dumps(index).replace(f'"{key}": "{first}"',
                                     f'"{key}": "{other}", "{key}": "{first}"')
    (ckpt / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=f"{key}.*twice.*{other}.*{first}"):
        load_pretrained(ckpt)


def test_key_stored_in_two_shard_files_is_refused(tmp_path):
    ckpt, index = sharded(tmp_path)
    key = "model.norm.weight"
    home = index["weight_map"][key]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    sd = load_file(ckpt / other)
    sd[key] = torch.full((CFG.hidden_size,), 7.0)  # a second, different copy
    save_file(sd, ckpt / other)
    with pytest.raises(ValueError, match=f"{key} is stored in both .*(({home}.*{other})|"
                                         f"({other}.*{home}))"):
        load_pretrained(ckpt)


def fp8_checkpoint(tmp_path, block=(16, 16)):
    """A checkpoint whose projections are FP8 with weight_block_size ``block``."""
    sd = {}
    for k, w in random_checkpoint(CFG).items():
        if k.endswith("proj.weight"):
            sd[k], sd[k + "_scale_inv"] = quantize_fp8(w, block=16)
        else:
            sd[k] = w
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}
    write_checkpoint(tmp_path, sd, CFG, quantization_config=quant)
    return sd


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_fp8_scale_or_weight_is_refused(tmp_path, bad):
    sd = fp8_checkpoint(tmp_path)
    key = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    sd[key][0, 0] = bad
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{re.escape(key)}: 1 non-finite value"):
        load_pretrained(tmp_path)
    sd[key][0, 0] = 1.0
    sd["model.norm.weight"][3] = bad  # an unquantised tensor, too
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight: 1 non-finite value.*"
                                         r"model\.safetensors"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("block", [[0, 0], [16], [16, 16, 16], 16, "16", [True, 16], [16.0, 16],
                                   [-16, 16], None])
def test_weight_block_size_must_be_two_positive_ints(tmp_path, block):
    fp8_checkpoint(tmp_path, block=block)
    with pytest.raises(ValueError, match=r"config\.json.*weight_block_size=.*two positive"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", '"deepseek_v3"', "42", "null"])
def test_config_json_must_be_an_object(tmp_path, content):
    save_pretrained(DeepSeekV3(CFG), tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=r"config\.json.*JSON object"):
        load_pretrained(tmp_path)


def test_quantization_config_must_be_an_object(tmp_path):
    save_pretrained(DeepSeekV3(CFG), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": ["fp8"]}))
    with pytest.raises(ValueError, match=r"config\.json.*quantization_config.*object"):
        load_pretrained(tmp_path)
