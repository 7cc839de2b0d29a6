"""DeepSeekMoE with auxiliary-loss-free load balancing (V3 report sec. 2.1.2, eqs. 12-20).

    h' = u + sum_{i<=N_s} FFN^(s)_i(u) + sum_{i<=N_r} g_i FFN^(r)_i(u)      eq. 12
    s_i = sigmoid(u . e_i)                                                 eq. 15
    selection: top-K_r of (s_i + b_i) within the top ``topk_group`` groups    eq. 16
    g_i = s_i / sum_{selected} s_j * routed_scaling_factor                  eqs. 13-14

The same Gate serves the whole family through ``topk_method``: V3's ``noaux_tc``
(above), V2's ``group_limited_greedy`` (softmax scores, no bias, groups ranked by
their best expert, weights not renormalised) and V2-Lite's ``greedy`` (no groups).

The bias b (``e_score_correction_bias``) only decides *which* experts a token
visits; the weights come from the unbiased scores. After every training step the
bias moves by gamma * sign(mean load - load_i), pushing tokens from overloaded to
underloaded experts without a loss term that fights the language-model gradient.
A tiny sequence-wise balance loss (eqs. 17-20) guards against extreme imbalance
within a single sequence.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ModelConfig
from .layers import MLP


@dataclass
class RouterStats:
    """What one MoE layer's router did in one forward pass."""

    scores: torch.Tensor  # (B, T, N_r) unbiased affinities s
    topk_idx: torch.Tensor  # (B, T, K_r) selected experts
    load: torch.Tensor  # (N_r,) number of tokens routed to each expert


class Gate(nn.Module):
    """The router: affinities, (bias-adjusted) group-limited top-k, normalised weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # e_i: one centroid per routed expert (the model re-initialises it with the rest)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.initializer_range)
        if cfg.has_routing_bias:
            # Training-only state: a buffer updated under no_grad, never seen by the optimizer.
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
            )
        else:  # V2: the checkpoint has no bias, and selection uses the scores alone
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s (N, N_r) in float32: sigmoid (V3) or softmax (V2).

        float32 even under autocast, as in the release: autocast would run this linear
        in bf16, and near-ties between experts would then be broken by rounding.
        """
        no_autocast = (nullcontext() if x.device.type == "meta"  # meta has no autocast
                       else torch.autocast(x.device.type, enabled=False))
        with no_autocast:
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(-1)

    def select(self, biased: torch.Tensor) -> torch.Tensor:
        """Indices (N, K_r) of the top-K_r experts inside the best ``topk_group`` groups.

        The group score is the sum of each group's top-2 (biased) scores for V3's
        ``noaux_tc`` and the group's single best score for V2's ``group_limited_greedy``;
        ``greedy`` has one group, i.e. no restriction.
        """
        cfg = self.cfg
        if cfg.n_group > 1:
            # (N, n_group, N_r / n_group)
            grouped = rearrange(biased, "n (g e) -> n g e", g=cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, n_group)
            else:
                group_score = grouped.amax(dim=-1)  # (N, n_group)
            keep = group_score.topk(cfg.topk_group, dim=-1).indices  # (N, M), M = topk_group
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter(1, keep, False)
            grouped = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf"))
            biased = rearrange(grouped, "n g e -> n (g e)")
        return biased.topk(cfg.num_experts_per_tok, dim=-1).indices

    def forward(self, x: torch.Tensor):
        """x (N, d) -> weights (N, K_r), indices (N, K_r), unbiased scores (N, N_r); float32."""
        s = self.scores(x)
        b = self.e_score_correction_bias
        idx = self.select(s if b is None else s + b)  # bias: selection only
        weights = s.gather(1, idx)  # from the *unbiased* scores
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.cfg.routed_scaling_factor, idx, s


def run_experts(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                experts: nn.ModuleList) -> torch.Tensor:
    """out[n] = sum over the pairs p of token n of weight[p] * experts[expert[p]](x[n]).

    x (N, d); token, expert, weight (P,) describe P (token, expert) pairs, with
    ``expert`` indexing ``experts``. The pairs are sorted by expert, so each expert
    runs once on one contiguous slice of its tokens: the loop is over experts, never
    over tokens, and no token is ever dropped (there is no capacity limit).

    The arithmetic is the formula's; the data movement is arranged for speed, since
    at toy width it costs as much as the experts' matmuls: one gather of all P input
    rows with ``index_select`` (its backward is one cheap ``index_add``; ``x[rows]``
    per expert is several times slower both ways), ``split`` into per-expert views
    (whose backward is a ``cat``, where slicing would zero-fill a (P, d) gradient per
    expert), and each expert's weighted output added straight into its tokens' rows.
    """
    order = expert.argsort(stable=True)  # pairs grouped by expert
    token, weight = token[order], weight[order].to(x.dtype)
    counts = torch.bincount(expert, minlength=len(experts)).tolist()
    x_sorted = x.index_select(0, token)  # (P, d): row p is the input of pair p
    out = torch.zeros_like(x)
    # An expert with no token still runs, on an empty slice: its gradient is then zero
    # rather than missing, as sharded data parallelism needs on every rank (FSDP
    # reduce-scatters the same gradients everywhere).
    for module, rows, tokens, w in zip(experts, x_sorted.split(counts), token.split(counts),
                                       weight.split(counts)):
        y = module(rows)  # (count, d)
        # expand_as: CPU kernels multiply by a (count, 1) broadcast several times slower
        out.index_add_(0, tokens, y * w[:, None].expand_as(y))
    return out


class LocalDispatcher:
    """One process holds every expert: run them on the (token, slot) pairs, here."""

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
        """flat (N, d), weights (N, K) float32, idx (N, K) -> routed output (N, d)."""
        N, K = idx.shape
        token = torch.arange(N, device=idx.device).repeat_interleave(K)  # token of each pair
        return run_experts(flat, token, idx.flatten(), weights.flatten(), experts)


class MoE(nn.Module):
    """Shared experts (always on) plus routed experts chosen by the Gate.

    Where the routed experts run is the dispatcher's business:
    ``dispatcher(flat (N, d), weights (N, K), idx (N, K), experts) -> routed (N, d)``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        # N_s shared experts are one SwiGLU of N_s times the expert width (same maths).
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0 else None
        )
        # Sends each token to its experts and sums their weighted outputs: LocalDispatcher
        # in one process, parallel.AllToAllDispatcher once the experts are sharded.
        self.dispatcher = LocalDispatcher()
        # Tokens per expert since the last update_bias (training forwards only).
        self.register_buffer(
            "expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, d = x.shape
        flat = rearrange(x, "b t d -> (b t) d")  # (N, d), N = B*T
        weights, idx, scores = self.gate(flat)  # (N, K), (N, K), (N, N_r)
        load = torch.bincount(idx.flatten(), minlength=self.cfg.n_routed_experts).float()
        if self.training:
            self.expert_load += load
        routed = self.dispatcher(flat, weights, idx, self.experts)
        y = routed if self.shared_experts is None else routed + self.shared_experts(flat)
        stats = RouterStats(
            scores=rearrange(scores, "(b t) e -> b t e", b=B),
            topk_idx=rearrange(idx, "(b t) k -> b t k", b=B),
            load=load,
        )
        return rearrange(y, "(b t) d -> b t d", b=B), stats

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> torch.Tensor:
        """b_i <- b_i + gamma * sign(mean load - load_i); returns the load used, then resets it.

        ``load`` defaults to the counts accumulated since the last call (all
        micro-batches of the step); data-parallel training all-reduces
        ``expert_load`` first so that every rank applies the same update.
        """
        if self.gate.e_score_correction_bias is None:
            raise ValueError(
                f"topk_method={self.cfg.topk_method!r} has no routing bias to update: the "
                "auxiliary-loss-free bias update needs topk_method='noaux_tc' (DeepSeek-V3)")
        load = self.expert_load.clone() if load is None else load.float()
        self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()
        return load


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load (0 = perfectly balanced)."""
    mean = load.float().mean(-1)
    return (load.float().amax(-1) - mean) / mean


def balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, scoring_func: str = "sigmoid"
                 ) -> torch.Tensor:
    """Sum_i f_i * P_i per sequence, averaged over sequences (eqs. 17-20, without alpha).

    scores (B, T, N_r) unbiased affinities, topk_idx (B, T, K_r) selections.
    f_i = N_r / (K_r T) * #tokens of the sequence routed to i;  P_i = mean_t s'_{i,t}
    with s' the affinities normalised over all N_r experts. Pass a batch reshaped
    to (1, B*T, .) for the classic batch-level (expert-level) balance loss.
    """
    B, T, n_experts = scores.shape
    k = topk_idx.shape[-1]
    if scoring_func == "sigmoid":
        normalised = scores / scores.sum(-1, keepdim=True)
    else:  # softmax affinities already sum to one
        normalised = scores
    counts = torch.zeros(B, n_experts, device=scores.device)
    counts.scatter_add_(1, topk_idx.reshape(B, T * k), torch.ones(B, T * k, device=scores.device))
    f = counts * n_experts / (k * T)  # (B, N_r); no gradient flows through f
    P = normalised.mean(dim=1)  # (B, N_r)
    return (f * P).sum(-1).mean()
