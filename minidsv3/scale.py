"""Accounting for any config: parameters by formula, total and activated per token.

Every count here is derived from the config alone (no model is built), so it can
be checked against the module sums of a model built on the meta device. For the
released config: 671,026,404,352 weights + 58 x 256 routing biases =
671,026,419,200, about 37.55B activated per token, and 11.6B more in the MTP module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """One MLA layer: query path, KV down/up projections, their norms, output projection."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    else:
        q = d * H * cfg.qk_head_dim
    kv_a = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # + its RMSNorm
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = H * cfg.v_head_dim * d
    return q + kv_a + kv_b + out


def swiglu_params(d: int, inter: int) -> int:
    """gate, up and down projections of one SwiGLU FFN."""
    return 3 * d * inter


@dataclass
class LayerCounts:
    """Parameters of one decoder block, split into what every token uses and what it may."""

    total: int  # every weight of the block (routing bias excluded)
    activated: int  # weights one token passes through
    routing_biases: int  # the e_score_correction_bias buffer (0 for dense blocks)


def block_counts(cfg: ModelConfig, layer_idx: int) -> LayerCounts:
    d = cfg.hidden_size
    common = attention_params(cfg) + 2 * d  # attention + the two pre-norms
    if not cfg.is_moe_layer(layer_idx):
        ffn = swiglu_params(d, cfg.intermediate_size)
        return LayerCounts(common + ffn, common + ffn, 0)
    expert = swiglu_params(d, cfg.moe_intermediate_size)
    gate = cfg.n_routed_experts * d  # one centroid e_i per routed expert
    shared = cfg.n_shared_experts * expert
    total = common + gate + shared + cfg.n_routed_experts * expert
    activated = common + gate + shared + cfg.num_experts_per_tok * expert
    return LayerCounts(total, activated, cfg.n_routed_experts)


@dataclass
class ParameterCounts:
    weights: int  # main model weights (embedding, blocks, final norm, head)
    routing_biases: int  # main model e_score_correction_bias entries
    total: int  # weights + routing_biases: the number the report's 671B refers to
    activated: int  # weights one token passes through (embedding and head counted)
    mtp_unique: int  # MTP modules, without their shared embedding/head (and their biases)
    mtp_activated: int  # of which one token passes through
    released_with_mtp: int  # total + mtp + duplicated embedding/head copies (the "685B")


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    """Exact parameter counts of a DeepSeekV3 built from ``cfg``, by formula."""
    d, V = cfg.hidden_size, cfg.vocab_size
    embed_head = V * d * (1 if cfg.tie_word_embeddings else 2)
    blocks = [block_counts(cfg, i) for i in range(cfg.num_hidden_layers)]
    weights = embed_head + sum(b.total for b in blocks) + d  # + final norm
    biases = sum(b.routing_biases for b in blocks)
    activated = embed_head + sum(b.activated for b in blocks) + d
    mtp, mtp_act = 0, 0
    for k in range(cfg.num_nextn_predict_layers):
        block = block_counts(cfg, cfg.num_hidden_layers + k)
        own = 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, final (shared_head) norm
        mtp += own + block.total + block.routing_biases
        mtp_act += own + block.activated
    # The release stores each MTP module with its own copy of embedding and head.
    released = weights + biases + mtp + cfg.num_nextn_predict_layers * 2 * V * d
    return ParameterCounts(weights, biases, weights + biases, activated, mtp, mtp_act, released)


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
