"""Multi-token prediction (V3 report sec. 2.2, eqs. 21-25).

Module k (k = 1..D) predicts the token k+1 positions ahead. It keeps the causal
chain: position i combines the previous depth's representation h^{k-1}_i with the
*embedding of the token k positions ahead*, t_{i+k}, which is known at training
time:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]     eq. 21  (embedding first)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                             eq. 22
    P^k_{i+k+1} = OutHead(h^k_i)                                  eq. 23
    L_MTP = lambda / D * sum_k CE(P^k, t_{k+2:T+1})               eqs. 24-25

Embedding and output head are shared with the main model; each module owns its
two norms, the projection M_k (``eh_proj``), one decoder block and a final norm.
Depth k sees T-k positions: the last k have no token k ahead inside the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm


class MTPModule(nn.Module):
    """One sequential MTP depth. ``block`` is a full decoder block (built by model.py)."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)  # normalises Emb(t_{i+k})
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)  # normalises h^{k-1}_i
        self.eh_proj = nn.Linear(2 * d, d, bias=False)  # M_k over [emb; hidden]
        self.block = block
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # ``shared_head.norm`` in the checkpoint

    def forward(self, h_prev: torch.Tensor, emb_ahead: torch.Tensor, freqs_cis: torch.Tensor,
                start_pos: int = 0, cache=None, mode: str = "naive"):
        """h_prev, emb_ahead (B, T', d) -> h^k (B, T', d) and the block's router stats."""
        merged = torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1)  # (B, T', 2d)
        return self.block(self.eh_proj(merged), freqs_cis, start_pos, cache, mode)


def mtp_inputs(tokens: torch.Tensor, targets: torch.Tensor, h_prev: torch.Tensor, k: int):
    """Align depth k: (h^{k-1}_i, t_{i+k}) predict t_{i+k+1} for i < T-k.

    tokens (B, T) are t_1..t_T and targets (B, T) are t_2..t_{T+1}; h_prev holds the
    T-k+1 positions of depth k-1. Returns h^{k-1}_{1:T-k}, t_{1+k:T}, and the
    targets t_{2+k:T+1} -- each with T-k positions.
    """
    T = tokens.shape[1]
    return h_prev[:, : T - k], tokens[:, k:], targets[:, k:]


def mtp_loss(ce_per_depth: list[torch.Tensor], lam: float) -> torch.Tensor:
    """L_MTP = lambda / D * sum_k L^k (eq. 25)."""
    return lam / len(ce_per_depth) * torch.stack(ce_per_depth).sum()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of logits (B, T, V) against targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
