"""The decoder block and the DeepSeek-V3 model.

    h = h + MLA(RMSNorm(h))                       (pre-norm attention)
    h = h + FFN(RMSNorm(h))                       FFN = dense SwiGLU for the first
                                                  ``first_k_dense_replace`` blocks, MoE after

The model adds the embedding, a final RMSNorm, an untied output head and D
multi-token-prediction modules. ``forward`` returns logits and, with targets, the
training loss  L = CE + L_MTP + L_Bal  with each part reported separately.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .layers import MLP, RMSNorm, RopeTable
from .mla import MLA, AttnMode, MLACache
from .moe import Gate, MoE, RouterStats, balance_loss
from .mtp import MTPModule, cross_entropy, mtp_inputs, mtp_loss


def set_seed(seed: int) -> None:
    """Seed Python and torch so that a run (and a notebook) is repeatable."""
    random.seed(seed)
    torch.manual_seed(seed)


class Block(nn.Module):
    """One pre-norm decoder block; names match ``model.layers.{i}`` in the checkpoint."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(
            cfg.hidden_size, cfg.intermediate_size
        )

    def forward(self, h: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0,
                cache: MLACache | None = None, mode: AttnMode = "naive"):
        """h (B, T, d) -> (B, T, d), and RouterStats for a MoE block (else None)."""
        h = h + self.self_attn(self.input_layernorm(h), freqs_cis, start_pos, cache, mode)
        ffn_in = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            ffn_out, stats = self.mlp(ffn_in)
        else:
            ffn_out, stats = self.mlp(ffn_in), None
        return h + ffn_out, stats


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab) next-token logits of the main model
    hidden: torch.Tensor  # (B, T, d) last block output before the final norm (h^0 for MTP)
    loss: torch.Tensor | None = None  # ce + mtp + balance
    ce: torch.Tensor | None = None  # main next-token cross-entropy
    mtp: torch.Tensor | None = None  # lambda/D * sum_k CE_k
    balance: torch.Tensor | None = None  # alpha * sequence-wise (+ batch-level) balance loss
    mtp_ce: list[torch.Tensor] = field(default_factory=list)  # CE_k per depth (unweighted)
    router: list[RouterStats] = field(default_factory=list)  # per MoE layer (main, then MTP)


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, Block(cfg, cfg.num_hidden_layers + k))
            for k in range(cfg.num_nextn_predict_layers)
        )
        # RoPE rotations for every position the model supports (complex64 at any model dtype).
        self.rope = RopeTable(cfg)
        self.apply(self._init_weights)

    @property
    def freqs_cis(self) -> torch.Tensor:
        """(max_position_embeddings, d_R/2) complex64: e^(i m theta_k) for every position m."""
        return self.rope.freqs_cis

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for every matrix (report: std 0.006); norms stay 1."""
        std = self.cfg.initializer_range
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            return  # meta tensors hold no values: nothing to initialise (keeps 671B fast)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Gate):  # the expert centroids
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer (main blocks, then MTP blocks): the owners of routing biases."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def allocate_caches(self, batch: int, max_len: int, mode: AttnMode = "absorbed",
                        dtype: torch.dtype | None = None) -> list[MLACache]:
        """One decode cache per main block, then one per MTP block."""
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        n = self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers
        return [MLACache.allocate(self.cfg, batch, max_len, mode, dtype, device) for _ in range(n)]

    def check_tokens(self, tokens: torch.Tensor, start_pos: int = 0, name: str = "tokens"):
        """Refuse input that would silently give a wrong answer."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            dtype = getattr(tokens, "dtype", None)
            raise ValueError(f"{name} must be a LongTensor of shape (B, T); got {got} {dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(
                f"{name} ids must be in [0, {self.cfg.vocab_size}); got min {tokens.min().item()}"
                f", max {tokens.max().item()} (does the tokenizer match the model's vocab_size?)"
            )
        end = start_pos + tokens.shape[1]
        if end > self.cfg.max_position_embeddings:
            raise ValueError(
                f"positions up to {end} exceed max_position_embeddings="
                f"{self.cfg.max_position_embeddings}; shorten the input"
            )

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                start_pos: int = 0, caches: list[MLACache] | None = None,
                attn_mode: AttnMode = "naive") -> ModelOutput:
        """tokens (B, T) at positions [start_pos, start_pos+T); targets (B, T) = next tokens."""
        self.check_tokens(tokens, start_pos)
        T = tokens.shape[1]
        freqs = self.freqs_cis[start_pos:start_pos + T]
        h = self.embed_tokens(tokens)  # (B, T, d)
        router: list[RouterStats] = []
        for i, block in enumerate(self.layers):
            h, stats = block(h, freqs, start_pos, None if caches is None else caches[i], attn_mode)
            if stats is not None:
                router.append(stats)
        logits = self.lm_head(self.norm(h))  # (B, T, vocab)
        out = ModelOutput(logits=logits, hidden=h, router=router)
        if targets is None:
            return out

        self.check_tokens(targets, name="targets")
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
        out.ce = cross_entropy(logits, targets)
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                raise ValueError(f"MTP depth {k} needs sequences longer than {k} tokens; got {T}")
            h_in, ahead, mtp_targets = mtp_inputs(tokens, targets, h_prev, k)
            h_prev, stats = module(h_in, self.embed_tokens(ahead), self.freqs_cis[: T - k])
            router.append(stats)
            out.mtp_ce.append(cross_entropy(self.lm_head(module.norm(h_prev)), mtp_targets))
        zero = logits.new_zeros((), dtype=torch.float32)
        out.mtp = mtp_loss(out.mtp_ce, self.cfg.mtp_loss_lambda) if out.mtp_ce else zero
        out.balance = self.balance_term(router) if router else zero
        out.loss = out.ce + out.mtp + out.balance
        return out

    def balance_term(self, router: list[RouterStats]) -> torch.Tensor:
        """Sum over MoE layers of alpha * L_seq (+ alpha_e * batch-level loss)."""
        cfg, total = self.cfg, router[0].scores.new_zeros(())
        for s in router:
            if cfg.aux_loss_alpha:
                total = total + cfg.aux_loss_alpha * balance_loss(
                    s.scores, s.topk_idx, cfg.scoring_func)
            if cfg.expert_aux_loss_alpha:  # the whole batch as one "sequence"
                total = total + cfg.expert_aux_loss_alpha * balance_loss(
                    s.scores.flatten(0, 1)[None], s.topk_idx.flatten(0, 1)[None],
                    cfg.scoring_func)
        return total
