"""Exercise set 04: auxiliary-loss-free load balancing.

Expert load, the sign update of the routing bias, MaxVio and the sequence-wise
balance loss. References: ``minidsv3.moe`` (RouterStats.load, MoE.update_bias,
max_violation, balance_loss).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..moe import MoE, balance_loss, max_violation
from .compare import expect_close
from .core import Fail, call, task

SET = "04_balancing"
CFG = ModelConfig.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2,
                         num_experts_per_tok=3)


def _router_stats(B: int, T: int, seed: int):
    """RouterStats of the package's MoE layer on random tokens (scores, topk_idx, load)."""
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(CFG)
    for p in moe.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    with torch.no_grad():
        _, stats = moe(torch.randn(B, T, CFG.hidden_size, generator=gen))
    return stats


@task(SET, "expert_load", hints=[
    "Every (token, slot) pair of topk_idx sends one token to one expert: count them all.",
    "torch.bincount(topk_idx.flatten(), minlength=n_experts) counts every expert, including "
    "those that got no token.",
    "Return floats: .float().",
])
def check_expert_load(fn) -> int:
    stats = _router_stats(2, 9, seed=9)
    cases = [("router of the package's MoE, 2 x 9 tokens", stats.topk_idx, stats.load),
             ("experts 3 and 4 get no token", torch.tensor([[[0, 1], [0, 2]]]),
              torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0]))]
    for case, idx, expected in cases:
        n_experts = expected.shape[0]
        got = call(fn, idx.clone(), n_experts, case=case)
        if isinstance(got, torch.Tensor) and got.dim() == 1 and got.shape[0] < n_experts:
            raise Fail(f"load: {got.shape[0]} entries instead of {n_experts}: experts that got no "
                       f"token must count 0 (bincount(..., minlength=n_experts)) (case: {case})")
        first = torch.bincount(idx[..., 0].flatten(), minlength=n_experts).float()
        expect_close(got, expected, "load", case, variants=[
            (expected / expected.sum(), "returned fractions; the load is a count of tokens"),
            (first, "counted only each token's first choice; count every (token, slot) pair"),
        ])
    return len(cases)


@task(SET, "update_bias", references=[MoE.update_bias], hints=[
    "Compare each expert's load with the mean load over all experts.",
    "Underloaded experts (load below the mean) get +gamma, overloaded ones -gamma, experts "
    "exactly at the mean 0: that is gamma * sign(mean - load).",
    "Return bias + gamma * torch.sign(load.mean() - load).",
])
def check_update_bias(fn) -> int:
    gen = torch.Generator().manual_seed(10)
    cases = [("bias 0, load 0..15", torch.zeros(16), torch.arange(16.0), 0.001),
             ("random bias and load", torch.randn(16, generator=gen) * 0.01,
              torch.randint(0, 40, (16,), generator=gen).float(), 0.01),
             ("two experts exactly at the mean", torch.zeros(4), torch.tensor([1.0, 3, 2, 2]),
              0.5)]
    for case, bias, load, gamma in cases:
        moe = MoE(CFG.replace(n_routed_experts=bias.shape[0], n_group=1, topk_group=1,
                              num_experts_per_tok=2))
        moe.gate.e_score_correction_bias.copy_(bias)
        moe.update_bias(gamma, load)
        expected = moe.gate.e_score_correction_bias.clone()
        got = call(fn, bias.clone(), load.clone(), gamma, case=f"{case}, gamma={gamma}")
        step = gamma * torch.sign(load.mean() - load)
        expect_close(got, expected, "new bias", f"{case}, gamma={gamma}", atol=1e-7, variants=[
            (bias - step, "sign flipped: overloaded experts (load above the mean) must get a "
                          "*lower* bias, so fewer tokens pick them"),
            (bias + gamma * (load.mean() - load), "used gamma * (mean - load); the rule uses "
                                                  "only the sign: gamma * sign(mean - load)"),
            (step, "returned only the step: add it to the old bias"),
            (bias + torch.where(load > load.mean(), -gamma, gamma),
             "experts exactly at the mean load must keep their bias (sign(0) = 0)"),
        ])
    return len(cases)


@task(SET, "max_violation", references=[max_violation], hints=[
    "MaxVio = (max load - mean load) / mean load: 0 when perfectly balanced.",
    "Reduce over the last axis only (.amax(-1), .mean(-1)) so a (layers, N_r) load gives one "
    "value per layer.",
])
def check_max_violation(fn) -> int:
    gen = torch.Generator().manual_seed(11)
    cases = [("load [4, 2, 1, 1]", torch.tensor([4.0, 2, 1, 1])),
             ("perfectly balanced", torch.full((8,), 5.0)),
             ("router of the package's MoE", _router_stats(4, 16, seed=12).load),
             ("3 layers x 16 experts", torch.randint(1, 50, (3, 16), generator=gen).float())]
    for case, load in cases:
        expected = max_violation(load)
        got = call(fn, load.clone(), case=case)
        if load.dim() == 2 and isinstance(got, torch.Tensor) and got.dim() == 0:
            raise Fail(f"MaxVio: one value for all layers; reduce over the last axis (experts) "
                       f"only, one value per row (case: {case})")
        mx, mean, mn = load.amax(-1), load.mean(-1), load.amin(-1)
        expect_close(got, expected, "MaxVio", case, rtol=1e-5, variants=[
            ((mx - mn) / mean, "used (max - min) / mean; MaxVio is (max - mean) / mean"),
            ((mx - mean) / mx, "divided by the max; MaxVio divides by the mean load"),
            (mx / mean, "got max / mean: subtract the mean load first"),
            (mx - mean, "forgot to divide by the mean load"),
        ])
    return len(cases)


@task(SET, "sequence_balance_loss", references=[balance_loss], hints=[
    "Work per sequence (axis 0 of scores and topk_idx), then average over sequences. Per "
    "sequence, f_i says how often expert i was chosen relative to its fair share (1 when "
    "balanced) and P_i is its mean normalised affinity; L = alpha * sum_i f_i * P_i.",
    "f_i = N_r / (K_r * T) * (number of the sequence's tokens routed to i); P_i = mean over "
    "the T tokens of s'_i, where s' = s / s.sum(-1, keepdim=True).",
    "Counts per sequence, (B, N_r): torch.zeros(B, N_r).scatter_add_(1, topk_idx.reshape(B, "
    "T * K_r), torch.ones(B, T * K_r)). Then alpha * (f * P).sum(-1).mean(); the counts need "
    "no gradient, P keeps it.",
])
def check_sequence_balance_loss(fn) -> int:
    stats = _router_stats(3, 6, seed=13)
    by_hand = (torch.tensor([[[1.0, 1, 1, 1], [2.0, 1, 1, 0]]]), torch.tensor([[[0, 1], [0, 2]]]))
    cases = [("the worked example (L = 1.25 alpha)", *by_hand, 1e-4),
             ("router of the package's MoE, 3 sequences of 6 tokens", stats.scores,
              stats.topk_idx, 1e-4),
             ("same, alpha = 0.01", stats.scores, stats.topk_idx, 0.01)]
    for case, scores, idx, alpha in cases:
        expected = alpha * balance_loss(scores, idx, "sigmoid")
        s = scores.clone().requires_grad_(True)
        got = call(fn, s, idx.clone(), alpha, case=case)
        E, K = scores.shape[-1], idx.shape[-1]
        pooled = balance_loss(scores.flatten(0, 1)[None], idx.flatten(0, 1)[None], "sigmoid")
        expect_close(got, expected, "loss", case, atol=1e-12, rtol=1e-5, variants=[
            (expected / alpha, "forgot to multiply by alpha"),
            (alpha * balance_loss(scores, idx, "softmax"), "P_i uses the raw sigmoid scores; "
             "normalise them over all N_r experts first (s / s.sum(-1))"),
            (expected * K / E, "f_i lacks the factor N_r / K_r"),
            (expected / E, "f_i lacks the factor N_r"),
            (alpha * pooled, "computed over the whole batch as one sequence; the loss is "
                             "computed per sequence, then averaged"),
        ])
        if not (isinstance(got, torch.Tensor) and got.requires_grad):
            raise Fail("the loss has no gradient with respect to scores: compute P_i from "
                       f"scores without .detach(), .item() or torch.no_grad() (case: {case})")
    return len(cases)
