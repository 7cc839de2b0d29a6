"""Accounting for any config: parameters, KV cache, training FLOPs, cost and memory.

Every number here is derived from the config alone (no model is built), so it can be
checked against a model built on the meta device, or against torch's FLOP counter on
a small one. For the released config (DeepSeek-V3 report, arXiv 2412.19437):

* parameters: 671,026,404,352 weights + 58 x 256 routing biases = 671,026,419,200,
  about 37.55B activated per token, and 11.6B more in the MTP module (sec. 1, 4.2);
* KV cache: (d_c + d_R) = 576 values per token per layer, 70,272 bytes per token in
  bf16 over 61 layers, against 2 x 128 x 128 values per layer for multi-head attention
  with the same heads (sec. 2.1.1; the comparison follows DeepSeek-V2's Table 1);
* training compute: 6 x (activated matmul weights) + attention, per token, over 14.8T
  tokens at sequence length 4K (sec. 4.2);
* cost: 2.788M H800 GPU-hours at $2 = $5.576M (Table 1);
* memory: FP8 weights with one scale per 128x128 block (sec. 3.3.2), AdamW with BF16
  moments and FP32 master weights and gradients (sec. 3.3.3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import nn

from .config import ModelConfig
from .mla import cache_bytes_per_token

# ---------------------------------------------------------------------------------
# Where the parameters live
# ---------------------------------------------------------------------------------
EMBEDDING = "embedding"
QUERY = "attention: query (W_DQ, W_UQ, W_QR)"
KV_DOWN = "attention: KV down (W_DKV, W_KR)"
KV_UP = "attention: KV up (W_UK, W_UV)"
ATTN_OUT = "attention: output (W_O)"
DENSE_FFN = "dense FFN"
SHARED = "shared experts"
ROUTED = "routed experts"
GATE = "gates (expert centroids)"
ROUTING_BIAS = "routing biases"
NORMS = "RMSNorm gains"
HEAD = "output head"
MTP = "MTP modules"
PARTS = (EMBEDDING, QUERY, KV_DOWN, KV_UP, ATTN_OUT, DENSE_FFN, SHARED, ROUTED, GATE,
         ROUTING_BIAS, NORMS, HEAD, MTP)
# Matrices the report runs as FP8 GEMMs (sec. 3.3.1): the linear layers of attention and
# FFNs. Embedding, output head, gates and norms stay in BF16/FP32.
FP8_PARTS = (QUERY, KV_DOWN, KV_UP, ATTN_OUT, DENSE_FFN, SHARED, ROUTED)


@dataclass(frozen=True)
class Weights:
    """``copies`` tensors of one ``shape`` in one part of the model (e.g. 256 experts' up_proj).

    Matrices use the ``nn.Linear`` layout (out_features, in_features).
    """

    part: str  # the row of ``parameter_table`` it adds to
    shape: tuple[int, ...]
    copies: int = 1
    active: int | None = None  # copies one token passes through; None = all of them
    mtp: bool = False  # part of a multi-token-prediction module

    @property
    def total(self) -> int:
        return math.prod(self.shape) * self.copies

    @property
    def activated(self) -> int:
        return math.prod(self.shape) * (self.copies if self.active is None else self.active)

    @property
    def is_matmul(self) -> bool:
        """A matrix multiplied by the activations (the embedding is a lookup, not a matmul)."""
        return len(self.shape) == 2 and self.part != EMBEDDING


def _swiglu(part: str, d: int, inter: int, copies: int = 1, active: int | None = None):
    """gate_proj and up_proj (inter, d), down_proj (d, inter)."""
    return [Weights(part, (inter, d), 2 * copies, None if active is None else 2 * active),
            Weights(part, (d, inter), copies, active)]


def block_weights(cfg: ModelConfig, layer_idx: int) -> list[Weights]:
    """Every tensor of one decoder block (``model.layers.{layer_idx}`` in the checkpoint)."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    ws = [Weights(NORMS, (d,), 2)]  # input_layernorm, post_attention_layernorm
    if cfg.q_lora_rank:  # eqs. 6-8: q_a_proj, its norm, q_b_proj (W_UQ and W_QR together)
        ws += [Weights(QUERY, (cfg.q_lora_rank, d)), Weights(NORMS, (cfg.q_lora_rank,)),
               Weights(QUERY, (H * cfg.qk_head_dim, cfg.q_lora_rank))]
    else:
        ws.append(Weights(QUERY, (H * cfg.qk_head_dim, d)))
    ws += [Weights(KV_DOWN, (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)),  # eqs. 1, 3
           Weights(NORMS, (cfg.kv_lora_rank,)),  # kv_a_layernorm
           Weights(KV_UP, (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
           Weights(ATTN_OUT, (d, H * cfg.v_head_dim))]  # eq. 11
    if not cfg.is_moe_layer(layer_idx):
        return ws + _swiglu(DENSE_FFN, d, cfg.intermediate_size)
    E = cfg.n_routed_experts
    ws.append(Weights(GATE, (E, d)))
    if cfg.has_routing_bias:  # V3 only; a buffer that only picks experts: not "activated"
        ws.append(Weights(ROUTING_BIAS, (E,), active=0))
    ws += _swiglu(ROUTED, d, cfg.moe_intermediate_size, E, cfg.num_experts_per_tok)
    if cfg.n_shared_experts:  # built as one SwiGLU N_s times the expert width
        ws += _swiglu(SHARED, d, cfg.moe_intermediate_size * cfg.n_shared_experts)
    return ws


def model_weights(cfg: ModelConfig) -> list[Weights]:
    """Every tensor of ``DeepSeekV3(cfg)``: embedding, blocks, final norm, head, MTP modules."""
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    ws = [Weights(EMBEDDING, (V, d))]
    for i in range(L):
        ws += block_weights(cfg, i)
    ws.append(Weights(NORMS, (d,)))  # model.norm
    ws.append(Weights(HEAD, (V, d)))  # never tied to the embedding (config refuses tying)
    for k in range(cfg.num_nextn_predict_layers):  # embedding and head are shared
        own = [Weights(NORMS, (d,), 2), Weights(MTP, (d, 2 * d)), Weights(NORMS, (d,))]
        ws += [dataclasses.replace(w, mtp=True) for w in own + block_weights(cfg, L + k)]
    return ws


@dataclass
class ParameterCounts:
    weights: int  # main model weights (embedding, blocks, final norm, head)
    routing_biases: int  # main model e_score_correction_bias entries
    total: int  # weights + routing_biases: the number the report's 671B refers to
    activated: int  # weights one token passes through (embedding and head counted)
    mtp_unique: int  # MTP modules with their gates' routing biases, without the shared emb./head
    mtp_activated: int  # of which one token passes through
    released_with_mtp: int  # total + mtp + duplicated embedding/head copies (the "685B")


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    """Exact parameter counts of a DeepSeekV3 built from ``cfg``, by formula."""
    ws = model_weights(cfg)
    main, mtp = [w for w in ws if not w.mtp], [w for w in ws if w.mtp]
    biases = sum(w.total for w in main if w.part == ROUTING_BIAS)
    weights = sum(w.total for w in main) - biases
    mtp_unique = sum(w.total for w in mtp)
    # The release stores each MTP module with its own copy of embedding and head.
    copies = cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size
    return ParameterCounts(
        weights, biases, weights + biases, sum(w.activated for w in main), mtp_unique,
        sum(w.activated for w in mtp), weights + biases + mtp_unique + copies)


@dataclass
class PartCount:
    part: str
    total: int  # parameters (routing biases included) in this part
    activated: int  # of which one token passes through


def parameter_table(cfg: ModelConfig) -> list[PartCount]:
    """Parameters per part (``PARTS`` order), over all layers; MTP modules are one row.

    The totals sum to ``total + mtp_unique`` and the activated column to
    ``activated + mtp_activated`` of ``parameter_counts``.
    """
    rows = {part: PartCount(part, 0, 0) for part in PARTS}
    for w in model_weights(cfg):
        row = rows[MTP if w.mtp else w.part]
        row.total += w.total
        row.activated += w.activated
    return list(rows.values())


def module_parameter_counts(model: nn.Module) -> dict[str, int]:
    """The same totals summed from an actual module tree (works on the meta device)."""
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    biases = sum(b.numel() for n, b in model.named_buffers()
                 if n.endswith("e_score_correction_bias") and not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    mtp += sum(b.numel() for n, b in model.named_buffers()
               if n.endswith("e_score_correction_bias") and n.startswith("mtp."))
    return {"weights": weights, "routing_biases": biases, "total": weights + biases,
            "mtp_unique": mtp}


# ---------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------
KV_LAYOUTS = ("mla", "mla-naive", "mha", "gqa", "mqa")


def kv_cache_values_per_layer(cfg: ModelConfig, layout: str, gqa_groups: int = 8) -> int:
    """Values one token adds to one layer's cache.

    * ``mla``:       c_KV and the shared roped key, d_c + d_R (what the released model
      caches with the absorbed path; ``minidsv3.mla.cache_bytes_per_token``);
    * ``mla-naive``: per-head keys (d_h + d_R) and values d_v, as MLA's naive path keeps them;
    * ``mha``, ``gqa``, ``mqa``: keys and values of H heads, ``gqa_groups`` groups or one
      head, with d_h = ``qk_nope_head_dim`` keys and d_v values each -- DeepSeek-V2's
      Table 1 (2 n_h d_h per layer for MHA), i.e. the same heads without decoupled RoPE.
    """
    H, d_h, d_v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    if layout == "mla":
        return cache_bytes_per_token(cfg, "absorbed", dtype_bytes=1)
    if layout == "mla-naive":
        return cache_bytes_per_token(cfg, "naive", dtype_bytes=1)
    if layout == "gqa" and (gqa_groups <= 0 or H % gqa_groups):
        raise ValueError(f"gqa_groups={gqa_groups}: must divide num_attention_heads={H}")
    kv_heads = {"mha": H, "gqa": gqa_groups, "mqa": 1}.get(layout)
    if kv_heads is None:
        raise ValueError(f"KV cache layout {layout!r}: choose one of {KV_LAYOUTS}")
    return kv_heads * (d_h + d_v)


def kv_cache_bytes(cfg: ModelConfig, layout: str, context: int = 1, dtype_bytes: int = 2,
                   gqa_groups: int = 8) -> int:
    """Cache bytes for ``context`` tokens of one sequence over the main model's layers.

    The MTP module is left out: it is only used for (optional) speculative decoding.
    """
    values = kv_cache_values_per_layer(cfg, layout, gqa_groups)
    return values * cfg.num_hidden_layers * dtype_bytes * context


# ---------------------------------------------------------------------------------
# Training FLOPs
# ---------------------------------------------------------------------------------
def matmul_weights_per_token(cfg: ModelConfig, include_mtp: bool = True) -> int:
    """Weights one token multiplies its activations with, once each per forward pass.

    The activated weights less the embedding (a row lookup, no arithmetic), the RMSNorm
    gains and the routing biases (elementwise, negligible); with MTP, each depth's block
    and projection plus one more pass through the shared output head.
    """
    ws = [w for w in model_weights(cfg) if w.is_matmul and (include_mtp or not w.mtp)]
    heads = cfg.num_nextn_predict_layers if include_mtp else 0
    return sum(w.activated for w in ws) + heads * cfg.vocab_size * cfg.hidden_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                              include_mtp: bool = True) -> float:
    """Forward FLOPs of the scores q.k and the weighted sum of values, per token.

    In a training sequence of ``seq_len`` tokens, the query at position i (1-based)
    sees i keys with the causal mask -- (seq_len + 1) / 2 on average -- or all seq_len
    without it. Per (query, key) pair and head: 2 (d_h + d_R) FLOPs for the score and
    2 d_v for the value (naive/training path). Softmax and masking are not counted.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be a positive number of tokens")
    keys = (seq_len + 1) / 2 if causal else seq_len
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys * layers


@dataclass
class FlopsPerToken:
    matmul: float  # forward: 2 FLOPs (multiply + add) per matmul weight
    attention: float  # forward: scores and weighted values
    forward: float  # matmul + attention
    training: float  # forward + backward = 3 x forward (backward: input and weight grads)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                    include_mtp: bool = True) -> FlopsPerToken:
    """FLOPs per training token: 6 N + 3 x attention, N = ``matmul_weights_per_token``.

    The backward pass multiplies by each weight twice (gradient of its input and of the
    weight itself), twice the forward's cost, which gives the familiar 6 N.
    """
    matmul = 2.0 * matmul_weights_per_token(cfg, include_mtp)
    attention = attention_flops_per_token(cfg, seq_len, causal, include_mtp)
    return FlopsPerToken(matmul, attention, matmul + attention, 3 * (matmul + attention))


def training_flops(cfg: ModelConfig, tokens: float = 14.8e12, seq_len: int = 4096,
                   include_mtp: bool = True) -> float:
    """Total training FLOPs; defaults: the report's 14.8T pre-training tokens at 4K context."""
    return tokens * flops_per_token(cfg, seq_len, include_mtp=include_mtp).training


# ---------------------------------------------------------------------------------
# Cost and model FLOP utilisation
# ---------------------------------------------------------------------------------
REPORTED_GPU_HOURS = {  # V3 report Table 1 (H800 GPU-hours)
    "pre-training": 2_664_000,
    "context extension": 119_000,
    "post-training": 5_000,
}
PRICE_PER_GPU_HOUR = 2.0  # the rental price Table 1 assumes, in US$
# H800 SXM dense tensor-core peaks (the same compute as H100 SXM; without sparsity).
H800_PEAK_FLOPS = {"bf16": 989.5e12, "fp8": 1979e12}


def training_cost(gpu_hours: float | None = None, price: float = PRICE_PER_GPU_HOUR) -> float:
    """US$ for ``gpu_hours`` (default: all of Table 1, 2.788M) at ``price`` per GPU-hour."""
    hours = sum(REPORTED_GPU_HOURS.values()) if gpu_hours is None else gpu_hours
    return hours * price


def model_flops_utilization(flops: float, gpu_hours: float,
                            peak_flops: float = H800_PEAK_FLOPS["bf16"]) -> float:
    """Useful FLOPs over what the GPUs could have done at peak in that time."""
    if gpu_hours <= 0 or peak_flops <= 0:
        raise ValueError(f"gpu_hours={gpu_hours}, peak_flops={peak_flops}: must be positive")
    return flops / (gpu_hours * 3600 * peak_flops)


# ---------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, fmt: str = "bf16", include_mtp: bool = True,
                 block: int = 128) -> int:
    """Bytes to store the weights (the MTP module's included by default).

    ``bf16``: 2 bytes each. ``fp8``: the matrices of ``FP8_PARTS`` take 1 byte (E4M3) plus
    one FP32 scale per ``block`` x ``block`` tile (``weight_scale_inv``); the rest BF16.
    Routing biases stay FP32 in both.
    """
    if fmt not in ("bf16", "fp8"):
        raise ValueError(f"fmt={fmt!r}: use 'bf16' or 'fp8'")
    total = 0
    for w in model_weights(cfg):
        if w.mtp and not include_mtp:
            continue
        if w.part == ROUTING_BIAS:
            total += 4 * w.total
        elif fmt == "fp8" and w.part in FP8_PARTS:
            rows, cols = w.shape
            tiles = math.ceil(rows / block) * math.ceil(cols / block)
            total += w.total + 4 * tiles * w.copies
        else:
            total += 2 * w.total
    return total


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each training state (defaults: the report, sec. 3.3.3)."""

    weights: float = 2  # BF16 working copy the matmuls read (cast to FP8 tile by tile)
    grads: float = 4  # FP32 gradients, accumulated over micro-batches
    master: float = 4  # FP32 master weights kept by the optimizer
    moments: float = 2  # each of AdamW's two moments: BF16 in the report, 4 for FP32

    @property
    def per_parameter(self) -> float:
        return self.weights + self.grads + self.master + 2 * self.moments


def training_state_bytes(cfg: ModelConfig, precision: Precision = Precision(),
                         include_mtp: bool = True) -> float:
    """Weights, gradients and AdamW state; routing biases are 4-byte buffers, not trained."""
    ws = [w for w in model_weights(cfg) if include_mtp or not w.mtp]
    biases = sum(w.total for w in ws if w.part == ROUTING_BIAS)
    params = sum(w.total for w in ws) - biases
    return params * precision.per_parameter + 4 * biases


def activation_values_per_token(cfg: ModelConfig, layer_idx: int) -> int:
    """Values one token leaves saved for the backward pass in one block (a rough estimate).

    The inputs of every matmul and norm, plus the SwiGLU halves, with no recomputation
    (the report recomputes norms and MLA up-projections and keeps some activations in
    FP8, sec. 3.2.3 and 3.3.3, so the real figure is lower). Attention keeps q, k, v and
    its output (FlashAttention style: no T x T matrix).
    """
    d, H = cfg.hidden_size, cfg.num_attention_heads
    q_latent = 2 * cfg.q_lora_rank  # q_a_proj output, then its norm (the q_b_proj input)
    attn = (2 * d  # block input (norm backward) and normed input (q_a/kv_a input)
            + q_latent
            + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # kv_a out, normed
            + 2 * H * cfg.qk_head_dim + 2 * H * cfg.v_head_dim)  # q, k, v, attention output
    ffn_in = 2 * d  # residual after attention and its norm
    if not cfg.is_moe_layer(layer_idx):
        return attn + ffn_in + 3 * cfg.intermediate_size  # gate, up, silu(gate)*up
    inter = cfg.moe_intermediate_size
    routed = cfg.num_experts_per_tok * (d + 3 * inter)  # each copy's input and hidden
    shared = 3 * inter * cfg.n_shared_experts
    return attn + ffn_in + cfg.n_routed_experts + routed + shared  # + router scores


def activation_bytes_per_token(cfg: ModelConfig, dtype_bytes: float = 2,
                               include_mtp: bool = True) -> float:
    """All blocks' activations per token, plus the FP32 logits of each head for the loss."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    values = sum(activation_values_per_token(cfg, i) for i in range(layers))
    heads = 1 + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return values * dtype_bytes + heads * cfg.vocab_size * 4


def gpus_needed(total_bytes: float, gpu_bytes: float = 80e9) -> int:
    """The fewest GPUs whose memory together holds ``total_bytes`` (80 GB H800 by default)."""
    if gpu_bytes <= 0:
        raise ValueError(f"gpu_bytes={gpu_bytes}: must be positive")
    return math.ceil(total_bytes / gpu_bytes)
