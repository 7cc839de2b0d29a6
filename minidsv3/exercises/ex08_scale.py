"""Exercise set 08: scaling the same code to 671B.

Accounting from the config alone: the parameters of one MoE layer, the KV cache of MLA
against multi-head attention, training FLOPs per token (6N + attention) and the $5.576M
of Table 1. References: ``minidsv3.scale``.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from ..config import ModelConfig
from ..mla import MLACache, cache_bytes_per_token
from ..scale import (
    GATE,
    REPORTED_GPU_HOURS,
    ROUTED,
    ROUTING_BIAS,
    SHARED,
    attention_flops_per_token,
    block_weights,
    flops_per_token,
    kv_cache_bytes,
    kv_cache_values_per_layer,
    matmul_weights_per_token,
    model_weights,
    parameter_counts,
    parameter_table,
    training_cost,
    training_flops,
)
from .compare import expect_close, expect_equal, expect_tuple
from .core import Fail, call, task

SET = "08_scale"

# The toy model first: its head widths differ (qk_nope 16, v 32), so mistakes that coincide
# at the released widths are told apart. Then the release, and the V2 family: two shared
# experts (V2) and no routing bias or query LoRA (V2-Lite) make more mistakes show.
PRESETS = ("toy", "deepseek-v3", "deepseek-v2", "deepseek-v2-lite")
# Every function of scale.py that counts parameters: a student may call none of them.
COUNTERS = [parameter_table, parameter_counts, model_weights, block_weights]


def _number(got, what: str, case: str):
    """A plain int or float; 1-element tensors count too (students may compute in torch)."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        return got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        raise Fail(f"{what}: return a number (an int or a float), got {type(got).__name__} "
                   f"(case: {case})")
    return int(got) if isinstance(got, numbers.Integral) else float(got)  # numpy scalars too


def _as_float(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


def _expect_float(got, expected: float, what: str, case: str, variants) -> None:
    """Floats with a relative tolerance: sums of large numbers may round differently."""
    expect_close(_as_float(_number(got, what, case)), _as_float(expected), what, case,
                 atol=0.0, rtol=1e-9, variants=[(_as_float(v), m) for v, m in variants])


# ---------------------------------------------------------------------------------
# Task 1: one MoE layer
# ---------------------------------------------------------------------------------
def _moe_ffn(cfg: ModelConfig, routed=None, shared=None, matrices=3, width=None,
             gate=True) -> int:
    """One MoE layer's FFN weights by formula, with one mistake or another."""
    d, E = cfg.hidden_size, cfg.n_routed_experts
    routed = E if routed is None else routed
    shared = cfg.n_shared_experts if shared is None else shared
    width = cfg.moe_intermediate_size if width is None else width
    return (E * d if gate else 0) + (routed + shared) * matrices * d * width


@task(SET, "moe_layer_params", references=COUNTERS, hints=[
    "Three pieces hold weights: the gate (one centroid of width hidden_size per routed "
    "expert), the n_routed_experts routed experts and the n_shared_experts shared experts. "
    "The routing bias is counted apart, as the second number.",
    "An expert is a SwiGLU FFN: gate_proj and up_proj (moe_intermediate_size x hidden_size) "
    "and down_proj (hidden_size x moe_intermediate_size), 3 * d * d_e weights. The dense FFN's "
    "intermediate_size plays no part here.",
    "weights = N_r * d + (N_r + N_s) * 3 * d * d_e; biases = N_r if cfg.has_routing_bias "
    "else 0 (only V3's gate has the correction bias).",
])
def check_moe_layer_params(fn) -> int:
    for preset in PRESETS:
        cfg = ModelConfig.preset(preset)
        case = (f"{preset} preset: N_r={cfg.n_routed_experts}, N_s={cfg.n_shared_experts}, "
                f"d={cfg.hidden_size}, d_e={cfg.moe_intermediate_size}")
        layer = block_weights(cfg, cfg.first_k_dense_replace)  # the first MoE layer
        weights = sum(w.total for w in layer if w.part in (GATE, ROUTED, SHARED))
        biases = sum(w.total for w in layer if w.part == ROUTING_BIAS)
        got = call(fn, dataclasses.replace(cfg), case=case)
        got_weights, got_biases = expect_tuple(got, ["weights", "routing_biases"], "result")
        E = cfg.n_routed_experts
        expect_equal(_number(got_weights, "weights", case), weights, "weights", case, variants=[
            (_moe_ffn(cfg, shared=0), "the shared expert is missing: it is an expert like the "
                                      "routed ones, (N_r + N_s) experts in all"),
            (_moe_ffn(cfg, shared=1), "counted one shared expert: this config has "
                                      f"n_shared_experts={cfg.n_shared_experts}"),
            (_moe_ffn(cfg, matrices=2), "2 matrices per expert: SwiGLU has three, gate_proj, "
                                        "up_proj and down_proj"),
            (_moe_ffn(cfg, width=cfg.intermediate_size), "used intermediate_size, the dense "
             "FFN's width: experts are moe_intermediate_size wide"),
            (_moe_ffn(cfg, gate=False), "forgot the gate: N_r centroids of width hidden_size "
                                        "score every token"),
            (weights + E, "counted the routing biases as weights: return them apart, as the "
                          "second number"),
            (_moe_ffn(cfg, routed=cfg.num_experts_per_tok),
             "counted only the experts one token visits: the layer holds all N_r routed "
             "experts"),
        ])
        if biases:
            bias_mistakes = [(0, "forgot the routing biases: V3's gate has one per routed "
                                 "expert (e_score_correction_bias)"),
                             (E * cfg.hidden_size, "the gate's weight is not a bias: the bias "
                                                   "has one entry per routed expert")]
        else:
            bias_mistakes = [(E, "this config has no routing bias: only V3's gate "
                                 "(cfg.has_routing_bias) has e_score_correction_bias")]
        expect_equal(_number(got_biases, "routing_biases", case), biases, "routing_biases",
                     case, variants=bias_mistakes)
    return len(PRESETS)


# ---------------------------------------------------------------------------------
# Task 2: the KV cache
# ---------------------------------------------------------------------------------
def _cache_mistakes(cfg: ModelConfig, expected: int, dtype_bytes: int) -> list:
    """Mistakes that MLA's and MHA's totals share: layers, bytes, the MTP layer."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    per_layer = expected // L
    mistakes = [(per_layer, f"one layer's cache: multiply by the num_hidden_layers={L} layers"),
                (expected // dtype_bytes, "counted values, not bytes: multiply by dtype_bytes")]
    if D:
        mistakes.append((per_layer * (L + D), "counted the MTP module's layer too: it only "
                         "serves speculative decoding, its cache is not the model's"))
    return mistakes


@task(SET, "kv_cache_per_token", references=[kv_cache_bytes, kv_cache_values_per_layer,
                                             cache_bytes_per_token, MLACache.bytes_per_token],
      hints=[
    "Per token and layer MLA caches the latent c_KV (kv_lora_rank values) and the one RoPE "
    "key k_R shared by all heads (qk_rope_head_dim values): 512 + 64 = 576 for V3.",
    "Multi-head attention caches, per head, a key of qk_nope_head_dim values and a value of "
    "v_head_dim values: n_h (d_h + d_v) per layer, 2 * 128 * 128 for V3.",
    "Multiply the values per layer by num_hidden_layers (the MTP module is not counted) and "
    "by dtype_bytes: 576 * 61 * 2 = 70,272 bytes for V3 in bf16.",
])
def check_kv_cache_per_token(fn) -> int:
    n = 0
    for preset in PRESETS:
        cfg = ModelConfig.preset(preset)
        H, L = cfg.num_attention_heads, cfg.num_hidden_layers
        for b in (2, 1) if preset == "deepseek-v3" else (2,):
            case = f"{preset} preset, dtype_bytes={b}"
            mla, mha = kv_cache_bytes(cfg, "mla", 1, b), kv_cache_bytes(cfg, "mha", 1, b)
            got = call(fn, dataclasses.replace(cfg), b, case=case)
            got_mla, got_mha = expect_tuple(got, ["mla_bytes", "mha_bytes"], "result")
            expect_equal(_number(got_mla, "mla_bytes", case), mla, "mla_bytes", case,
                         variants=_cache_mistakes(cfg, mla, b) + [
                (cfg.kv_lora_rank * L * b, "forgot the decoupled RoPE key: MLA caches c_KV "
                 "(kv_lora_rank) and k_R (qk_rope_head_dim)"),
                (kv_cache_bytes(cfg, "mla-naive", 1, b), "cached the decompressed keys and "
                 "values of every head: MLA keeps only the latent c_KV and k_R"),
                (mla * H, "counted per head: the latent and k_R are shared by all heads"),
            ])
            expect_equal(_number(got_mha, "mha_bytes", case), mha, "mha_bytes", case,
                         variants=_cache_mistakes(cfg, mha, b) + [
                (H * (cfg.qk_head_dim + cfg.v_head_dim) * L * b, "MHA keys without "
                 "decoupled RoPE are qk_nope_head_dim wide (this is MLA's naive cache)"),
                (H * cfg.qk_nope_head_dim * L * b, "forgot the values: each head caches a "
                 "key (qk_nope_head_dim) and a value (v_head_dim)"),
                ((cfg.qk_nope_head_dim + cfg.v_head_dim) * L * b, "one head only: MHA caches "
                 "keys and values for each of the num_attention_heads heads"),
            ])
            n += 1
    return n


# ---------------------------------------------------------------------------------
# Task 3: training FLOPs per token
# ---------------------------------------------------------------------------------
@task(SET, "training_flops_per_token", references=[
    flops_per_token, training_flops, matmul_weights_per_token, attention_flops_per_token,
    *COUNTERS], hints=[
    "N counts the matmul weights one token meets: each layer's attention matrices (no norms), "
    "the dense FFN (3 d d_ff) or the MoE layer's gate, shared experts and K_r = "
    "num_experts_per_tok routed experts (not all N_r), the output head (V d), and for each "
    "MTP depth one more attention, MoE layer, eh_proj (2d x d) and head pass. Not the "
    "embedding: a lookup.",
    "Attention per token, forward: 2 n_h (qk_head_dim + v_head_dim) * (T + 1) / 2 * (L + D), "
    "with qk_head_dim = qk_nope_head_dim + qk_rope_head_dim and D = num_nextn_predict_layers.",
    "Forward = 2N + attention (one multiply and one add per weight); training = 3 x forward "
    "(backward: input and weight gradients), i.e. 6N + 3 x attention.",
])
def check_training_flops_per_token(fn) -> int:
    n = 0
    for preset in PRESETS:
        cfg = ModelConfig.preset(preset)
        for T in (4096, 1) if preset == "deepseek-v3" else (4096,):
            case = f"{preset} preset, seq_len={T}"
            ref = flops_per_token(cfg, T)
            got = call(fn, dataclasses.replace(cfg), T, case=case)
            N = matmul_weights_per_token(cfg)
            attn = ref.attention
            moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace \
                + cfg.num_nextn_predict_layers
            unvisited = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 \
                * cfg.hidden_size * cfg.moe_intermediate_size * moe_layers
            no_mtp = flops_per_token(cfg, T, include_mtp=False).training
            mistakes = [
                (ref.forward, "forward pass only: training adds the backward pass, twice the "
                              "forward's cost, so multiply by 3"),
                (3 * (N + attn), "counted one FLOP per weight: a multiply and an add are 2, "
                                 "so the matmuls cost 2N forward, 6N in training"),
                (6 * N, "forgot attention: the scores and weighted values add "
                        "3 x 2 n_h (qk_head_dim + v_head_dim) (T + 1) / 2 (L + D)"),
                (6 * N + 3 * attention_flops_per_token(cfg, T, causal=False),
                 "every query sees all T keys: with the causal mask it sees (T + 1) / 2 on "
                 "average"),
                (6 * N + 6 * attn, "multiplied attention by 6: N counts weights, attention "
                                   "is already counted in FLOPs, so it is 3 x attention"),
                (ref.training + 6 * unvisited, "counted all routed experts: a "
                 "token visits only num_experts_per_tok of them"),
                (ref.training + 6 * cfg.vocab_size * cfg.hidden_size,
                 "counted the embedding: looking up a row is no arithmetic"),
                (6 * parameter_counts(cfg).activated, "6 x activated parameters: that counts "
                 "the embedding and norms, and leaves out attention and the MTP module"),
            ]
            if cfg.num_nextn_predict_layers:  # V2 configs have none: the same number
                mistakes.append((no_mtp, "left out the MTP module: it is trained too, with "
                                 "its own block, eh_proj and one more pass through the head"))
            _expect_float(got, ref.training, "flops", case, mistakes)
            n += 1
    return n


# ---------------------------------------------------------------------------------
# Task 4: the cost
# ---------------------------------------------------------------------------------
REPORT = dict(tokens=14.8e12, gpu_hours_per_trillion=180_000,
              later_stages={k: v for k, v in REPORTED_GPU_HOURS.items() if k != "pre-training"},
              price=2.0, n_gpus=2048)


@task(SET, "training_cost", references=[training_cost], hints=[
    "Pre-training GPU-hours = tokens / 1e12 * gpu_hours_per_trillion (the throughput is per "
    "trillion tokens): 14.8 * 180K = 2,664K for V3.",
    "Add the GPU-hours of the later stages (the values of the dict: 119K context extension, "
    "5K post-training); GPU-hours already count every GPU, so dollars = hours * price.",
    "The wall-clock time of pre-training: its GPU-hours are shared by n_gpus GPUs working at "
    "once, so days = pre-training hours / n_gpus / 24 (about 54 days for V3).",
])
def check_training_cost(fn) -> int:
    cases = [
        (REPORT, "the report: 14.8T tokens at 180K GPU-hours per trillion, 2048 H800s, $2"),
        (dict(REPORT, tokens=1e12, price=3.5, n_gpus=512), "1T tokens, $3.50, 512 GPUs"),
        (dict(tokens=2.5e12, gpu_hours_per_trillion=40_000, later_stages={"fine-tuning": 7_000},
              price=1.25, n_gpus=256), "2.5T tokens at 40K per trillion, one later stage"),
    ]
    for inputs, case in cases:
        tokens, rate, later, price, gpus = inputs.values()
        pre = tokens / 1e12 * rate
        hours = pre + sum(later.values())
        got = call(fn, tokens, rate, dict(later), price, gpus, case=case)
        got_hours, got_dollars, got_days = expect_tuple(got, ["gpu_hours", "dollars", "days"],
                                                        "result")
        _expect_float(got_hours, hours, "gpu_hours", case, [
            (pre, "only pre-training: add the later stages (context extension and "
                  "post-training in the report)"),
            (tokens * rate + sum(later.values()), "the throughput is per trillion tokens: "
                                                  "divide tokens by 1e12"),
            (hours * gpus, "multiplied by n_gpus: GPU-hours already count every GPU"),
        ])
        _expect_float(got_dollars, training_cost(hours, price), "dollars", case, [
            (training_cost(pre, price), "only pre-training is priced: the later stages cost "
                                        "GPU-hours too"),
            (training_cost(hours, price) * gpus, "multiplied by n_gpus: the price is per "
                                                 "GPU-hour, and GPU-hours already count every "
                                                 "GPU"),
            (training_cost(hours / gpus, price), "divided by n_gpus: the price is per GPU-hour, "
                                                 "and the hours are GPU-hours"),
        ])
        _expect_float(got_days, pre / gpus / 24, "days", case, [
            (pre / 24, "the time one GPU alone would take: n_gpus share the GPU-hours, divide "
                       "by n_gpus"),
            (pre / gpus, "hours, not days: divide by 24"),
            (hours / gpus / 24, "counted the later stages: days is the wall-clock time of "
                                "pre-training only"),
        ])
    return len(cases)
