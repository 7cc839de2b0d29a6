"""Exercise set 03: DeepSeekMoE -- the SwiGLU expert, the gate and the combination.

References: ``minidsv3.layers.MLP`` and ``minidsv3.moe`` (Gate.select, Gate.forward,
run_experts). Routing results are compared order-free: a (N, N_r) table holding each
token's weight at its selected experts and zeros elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..config import ModelConfig
from ..layers import MLP
from ..moe import Gate, LocalDispatcher, MoE, run_experts
from .compare import expect_close, expect_equal, expect_tuple
from .core import Fail, call, task

SET = "03_deepseekmoe"
CFG = ModelConfig.preset("tiny", hidden_size=12, n_routed_experts=16, n_group=4, topk_group=2,
                         num_experts_per_tok=3)

# Four groups of four experts, built so that the group score decides: the top-2 sum keeps
# groups {1, 0}, the maximum {0, 2}, the sum of all members {3, 0}; no group limit picks 0, 8, 4.
CRAFTED = torch.tensor([[0.95, 0.11, 0.12, 0.13, 0.60, 0.59, 0.01, 0.02,
                         0.70, 0.05, 0.06, 0.07, 0.35, 0.34, 0.36, 0.33]])


@task(SET, "swiglu_expert", references=[MLP.forward], hints=[
    "Weights are stored like nn.Linear: x @ w.T applies w.",
    "SiLU(a) = a * sigmoid(a) (F.silu); it acts on the *gate* projection only.",
    "(F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T",
])
def check_swiglu(fn) -> int:
    gen = torch.Generator().manual_seed(5)
    for d, inter, n in ((6, 10, 4), (12, 16, 1)):
        mlp = MLP(d, inter)
        for p in mlp.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        x = torch.randn(n, d, generator=gen)
        wg, wu, wd = (m.weight.detach() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        case = f"{n} tokens, width {d}, expert width {inter}"
        got = call(fn, x.clone(), wg.clone(), wu.clone(), wd.clone(), case=case)
        g, u = x @ wg.T, x @ wu.T
        expect_close(got, mlp(x).detach(), "expert output", case, variants=[
            ((g * F.silu(u)) @ wd.T, "SiLU applied to the up projection; it belongs on the gate"),
            ((torch.sigmoid(g) * u) @ wd.T, "used sigmoid(gate); SiLU is gate * sigmoid(gate)"),
            ((F.relu(g) * u) @ wd.T, "used ReLU; SwiGLU uses SiLU"),
            ((F.gelu(g) * u) @ wd.T, "used GELU; SwiGLU uses SiLU"),
            ((g * u) @ wd.T, "no activation: the gate projection must go through SiLU"),
        ])
    return 2


def _select_by(biased: torch.Tensor, cfg: ModelConfig, group_score) -> torch.Tensor:
    """Group-limited top-k with another group score: the mistakes this set diagnoses."""
    grouped = rearrange(biased, "n (g e) -> n g e", g=cfg.n_group)  # (N, n_group, N_r/n_group)
    keep = group_score(grouped).topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
    dropped = torch.ones(grouped.shape[:2], dtype=torch.bool).scatter(1, keep, False)
    masked = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf"))
    return rearrange(masked, "n g e -> n (g e)").topk(cfg.num_experts_per_tok, dim=-1).indices


def _as_indices(got, n: int, cfg: ModelConfig, what: str, case: str) -> torch.Tensor:
    """Validate a (N, K) index result and return it sorted per row."""
    k = cfg.num_experts_per_tok
    if not isinstance(got, torch.Tensor):
        raise Fail(f"{what}: expected a LongTensor of shape ({n}, {k}), got {type(got).__name__}")
    if got.is_floating_point():
        raise Fail(f"{what}: expected expert *indices* (integers), got {got.dtype} values; "
                   f"use .indices of topk (case: {case})")
    if got.shape != (n, k):
        raise Fail(f"{what}: wrong shape: expected ({n}, {k}) = (tokens, num_experts_per_tok), "
                   f"got {tuple(got.shape)} (case: {case})")
    if (got.min() < 0) or (got.max() >= cfg.n_routed_experts):
        raise Fail(f"{what}: indices must be in [0, {cfg.n_routed_experts}) (case: {case})")
    ordered = got.sort(-1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise Fail(f"{what}: an expert was selected twice for one token (case: {case})")
    return ordered


def _selection_variants(biased: torch.Tensor, cfg: ModelConfig):
    flat = CFG.replace(n_group=1, topk_group=1, num_experts_per_tok=cfg.num_experts_per_tok)
    return [
        (_select_by(biased, cfg, lambda g: g.amax(-1)).sort(-1).values,
         "the group score is the maximum of each group; V3 sums the top-2 scores of each group"),
        (_select_by(biased, cfg, lambda g: g.sum(-1)).sort(-1).values,
         "the group score sums all experts of a group; V3 sums only the top 2"),
        (Gate(flat).select(biased).sort(-1).values,
         "no group limit: experts from dropped groups were selected (keep only the topk_group "
         "best groups)"),
    ]


@task(SET, "group_limited_topk", references=[Gate.select], hints=[
    "View the scores as (N, n_group, experts_per_group) and score each group by the sum of its "
    "two largest entries: .topk(2, dim=-1).values.sum(-1).",
    "Keep the topk_group best groups; set every expert of the other groups to -inf "
    "(masked_fill).",
    "Flatten back to (N, N_r) and take .topk(top_k, dim=-1).indices.",
])
def check_group_limited_topk(fn) -> int:
    gen = torch.Generator().manual_seed(6)
    cases = [("crafted scores where the group score decides", CRAFTED, CFG),
             ("64 random tokens", torch.rand(64, 16, generator=gen), CFG),
             ("no groups (n_group=1)", torch.rand(8, 16, generator=gen),
              CFG.replace(n_group=1, topk_group=1))]
    for case, biased, cfg in cases:
        got = call(fn, biased.clone(), cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                   case=case)
        got = _as_indices(got, biased.shape[0], cfg, "selected experts", case)
        expected = Gate(cfg).select(biased).sort(-1).values
        expect_equal(got, expected, "selected experts", case,
                     variants=_selection_variants(biased, cfg) if cfg.n_group > 1 else ())
    return len(cases)


def _route(cfg: ModelConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """The package's gate for config ``cfg``: (weights, idx, unbiased scores)."""
    gate = Gate(cfg)
    gate.weight.data.copy_(weight)
    gate.e_score_correction_bias.copy_(bias)
    with torch.no_grad():
        return gate(x)


def _table(weights: torch.Tensor, idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N, N_r) routing table: each token's weight at its experts, 0 elsewhere."""
    table = torch.zeros(idx.shape[0], n_experts, dtype=torch.float64)
    return table.scatter(1, idx.long(), weights.detach().double())


@task(SET, "gate", references=[Gate.forward, Gate.scores, Gate.select], hints=[
    "Affinities s = sigmoid(x @ weight.T), shape (N, N_r). The bias is added only to choose: "
    "idx = group_limited_topk(s + bias, ...).",
    "The weights come from the *unbiased* s of the chosen experts: s.gather(1, idx).",
    "Normalise them to sum to 1 over the K chosen experts, then multiply by scale.",
])
def check_gate(fn) -> int:
    gen = torch.Generator().manual_seed(7)
    cases = [("64 tokens, bias 0", 0.0, CFG), ("64 tokens, random bias", 0.3, CFG),
             ("64 tokens, random bias, no groups", 0.3, CFG.replace(n_group=1, topk_group=1))]
    for case, bias_std, cfg in cases:
        x = torch.randn(64, cfg.hidden_size, generator=gen)
        weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen) * 0.5
        bias = torch.randn(cfg.n_routed_experts, generator=gen) * bias_std

        got = call(fn, x.clone(), weight.clone(), bias.clone(), cfg.n_group, cfg.topk_group,
                   cfg.num_experts_per_tok, cfg.routed_scaling_factor, case=case)
        w_got, idx_got = expect_tuple(got, ["weights", "idx"], "result")
        idx_sorted = _as_indices(idx_got, 64, cfg, "idx", case)
        w_ref, idx_ref, s = _route(cfg, x, weight, bias)
        biased = s + bias
        expect_equal(idx_sorted, idx_ref.sort(-1).values, "idx", case, variants=[
            (_route(cfg, x, weight, torch.zeros_like(bias))[1].sort(-1).values,
             "the selection ignores the bias: choose experts by s + bias"),
            (_route(cfg.replace(scoring_func="softmax"), x, weight, bias)[1].sort(-1).values,
             "used softmax affinities; V3 uses sigmoid"),
        ] + (_selection_variants(biased, cfg) if cfg.n_group > 1 else []))
        if not isinstance(w_got, torch.Tensor) or w_got.shape != idx_ref.shape:
            shape = tuple(w_got.shape) if isinstance(w_got, torch.Tensor) else type(w_got)
            raise Fail(f"weights: expected shape {tuple(idx_ref.shape)} (one weight per "
                       f"selected expert), got {shape} (case: {case})")
        chosen, scale = s.gather(1, idx_ref), cfg.routed_scaling_factor
        leaked = biased.gather(1, idx_ref)
        E = cfg.n_routed_experts
        expect_close(_table(w_got, idx_got, E), _table(w_ref, idx_ref, E), "weights", case,
                     variants=[
            (_table(leaked / leaked.sum(-1, keepdim=True) * scale, idx_ref, E),
             "bias leaked into the weights: they come from s + bias; the bias only selects, "
             "the weights use the unbiased s"),
            (_table(chosen * scale, idx_ref, E), "weights not normalised: divide by their sum "
                                                 "over the selected experts"),
            (_table(chosen / chosen.sum(-1, keepdim=True), idx_ref, E),
             "forgot to multiply by scale (routed_scaling_factor)"),
            (_table(chosen / s.sum(-1, keepdim=True) * scale, idx_ref, E),
             "normalised over all experts; divide by the sum over the selected ones only"),
            (_table(chosen.softmax(-1) * scale, idx_ref, E),
             "used a softmax over the selected scores; V3 divides by their sum"),
            (_table(_route(cfg.replace(scoring_func="softmax"), x, weight, bias)[0], idx_ref, E),
             "used softmax affinities; V3 uses sigmoid"),
        ])
    return len(cases)


@task(SET, "moe_combine", references=[MoE.forward, LocalDispatcher.__call__, run_experts], hints=[
    "Eq. 12 without the residual: out[n] = shared_expert(x)[n] + the sum over the K slots j of "
    "weights[n, j] * experts[idx[n, j]](x[n]). The shared expert sees every token.",
    "Run each expert once, on its own tokens: rows, slots = (idx == e).nonzero(as_tuple=True) "
    "are the tokens that chose expert e and the slots where they chose it; their gate weights "
    "are weights[rows, slots].",
    "Start from out = shared_expert(x); then for e, expert in enumerate(experts): rows, slots = "
    "(idx == e).nonzero(as_tuple=True); out = out.index_add(0, rows, weights[rows, slots, None] "
    "* expert(x[rows])).",
])
def check_moe_combine(fn) -> int:
    gen = torch.Generator().manual_seed(8)
    moe = MoE(CFG)
    for p in moe.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    for n in (20, 1):
        x = torch.randn(n, CFG.hidden_size, generator=gen)
        with torch.no_grad():
            weights, idx, _ = moe.gate(x)
            routed = moe.dispatcher(x, weights, idx, moe.experts)
            shared = moe.shared_experts(x)
            unweighted = moe.dispatcher(x, torch.ones_like(weights), idx, moe.experts)
        case = f"{n} tokens, {CFG.n_routed_experts} experts, top-{CFG.num_experts_per_tok}"
        with torch.no_grad():
            got = call(fn, x.clone(), weights.clone(), idx.clone(), list(moe.experts),
                       moe.shared_experts, case=case)
        expect_close(got, routed + shared, "MoE output", case, variants=[
            (routed, "the shared expert is missing: add shared_expert(x) for every token"),
            (unweighted + shared, "the routed outputs are not multiplied by their weights"),
            (x + routed + shared, "added the residual x: the decoder block adds it, the MoE "
                                  "layer returns only the FFN output"),
        ])
    return 2
