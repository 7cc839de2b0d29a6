import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minidsv3 import ModelConfig
from minidsv3.moe import Gate, MoE, balance_loss, max_violation

CFG = ModelConfig.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2,
                         num_experts_per_tok=3)


def reference_route(cfg, s, bias):
    """Token-by-token routing written from the release's rules with Python lists.

    noaux_tc (V3): biased scores, group score = sum of the two best in the group;
    group_limited_greedy (V2): group score = the best score in the group, no bias;
    greedy (V2-Lite): top-k over all experts. Weights come from the unbiased scores,
    renormalised only when norm_topk_prob, then times routed_scaling_factor.
    """
    per_group = cfg.n_routed_experts // cfg.n_group
    all_idx, all_w = [], []
    for scores in s.tolist():
        biased = [a + b for a, b in zip(scores, bias.tolist())] if bias is not None else scores
        group_score = []
        for g in range(cfg.n_group):
            members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
            if cfg.topk_method == "noaux_tc":
                group_score.append(members[0] + members[1])
            else:
                group_score.append(members[0])
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        if cfg.topk_method == "greedy":
            kept = range(cfg.n_group)
        candidates = [e for e in range(cfg.n_routed_experts) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:cfg.num_experts_per_tok]
        total = sum(scores[e] for e in chosen) if cfg.norm_topk_prob else 1.0
        all_idx.append(sorted(chosen))
        all_w.append({e: scores[e] / total * cfg.routed_scaling_factor for e in chosen})
    return all_idx, all_w


def assert_routes_like_reference(gate, x):
    weights, idx, s = gate(x)
    ref_idx, ref_w = reference_route(gate.cfg, s, gate.e_score_correction_bias)
    for t in range(len(x)):
        assert sorted(idx[t].tolist()) == ref_idx[t]
        for slot, e in enumerate(idx[t].tolist()):
            assert abs(weights[t, slot].item() - ref_w[t][e]) < 1e-5
    return s


def test_gate_matches_the_written_out_rule():
    gate = Gate(CFG)
    gate.weight.data.normal_(0, 0.5)
    gate.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(40, CFG.hidden_size)
    s = assert_routes_like_reference(gate, x)
    assert_close(s, torch.sigmoid(x @ gate.weight.T))


# The V2 layouts at unit-test width: V2's 8 groups / 3 kept / route scale 16 (here 4 / 2),
# and V2-Lite's plain greedy top-k; both softmax, no bias, weights not renormalised.
V2 = CFG.replace(scoring_func="softmax", topk_method="group_limited_greedy",
                 norm_topk_prob=False, routed_scaling_factor=16.0)
V2_LITE = CFG.replace(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                      norm_topk_prob=False, routed_scaling_factor=1.0)


@pytest.mark.parametrize("cfg", [V2, V2_LITE, V2.replace(scoring_func="sigmoid")],
                         ids=["v2", "v2-lite", "group_limited_greedy-sigmoid"])
def test_family_gates_match_the_written_out_rule(cfg):
    gate = Gate(cfg)
    assert gate.e_score_correction_bias is None  # V2 checkpoints have no bias
    gate.weight.data.normal_(0, 0.5)
    x = torch.randn(200, cfg.hidden_size)
    s = assert_routes_like_reference(gate, x)
    if cfg.scoring_func == "softmax":
        assert_close(s, F.softmax(x @ gate.weight.T, dim=-1))


def test_group_score_rule_max_versus_top2_sum():
    """Group A = [0.9, 0.0] beats B = [0.5, 0.45] by its maximum, loses by its top-2 sum."""
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.45]])
    cfg = CFG.replace(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)
    v3 = Gate(cfg).select(scores)
    v2 = Gate(cfg.replace(topk_method="group_limited_greedy")).select(scores)
    assert sorted(v3[0].tolist()) == [2, 3]  # 0.95 > 0.9: group B
    assert sorted(v2[0].tolist()) == [0, 1]  # 0.9 > 0.5: group A, -inf elsewhere


def test_v2_routing_differs_from_the_v3_group_rule_on_many_tokens():
    """Why the rule matters: at DeepSeek-V2's own width (160 experts, 8 groups, 3 kept)
    the top-2-sum rule would send about 30% of tokens to other experts."""
    cfg = ModelConfig.preset("deepseek-v2")
    gate = Gate(cfg)
    gate.weight.data.normal_(0, 0.02)
    s = gate.scores(torch.randn(500, cfg.hidden_size, generator=torch.Generator().manual_seed(0)))
    v2 = gate.select(s).sort(-1).values
    v3 = Gate(cfg.replace(topk_method="noaux_tc")).select(s).sort(-1).values
    assert (v2 != v3).any(-1).float().mean() > 0.2


def test_norm_topk_prob_defaults_follow_the_released_configs():
    assert ModelConfig.preset("tiny").norm_topk_prob is True  # sigmoid: V3 renormalises
    assert ModelConfig.preset("tiny", scoring_func="softmax").norm_topk_prob is False  # V2
    assert ModelConfig.preset("tiny", scoring_func="softmax", norm_topk_prob=True).norm_topk_prob


def test_bias_update_needs_the_v3_rule():
    moe = MoE(V2)
    with pytest.raises(ValueError, match="noaux_tc"):
        moe.update_bias(0.001)


def test_bias_changes_selection_but_not_the_weights():
    gate = Gate(CFG)
    gate.weight.data.normal_(0, 0.5)
    x = torch.randn(64, CFG.hidden_size)
    w0, idx0, s0 = gate(x)
    gate.e_score_correction_bias[:4] = 10.0  # force experts 0-3 (group 0)
    w1, idx1, s1 = gate(x)
    assert_close(s0, s1)  # affinities are untouched by the bias
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values)
    assert torch.isin(idx1, torch.arange(4)).all()
    chosen = s1.gather(1, idx1)  # weights come from the unbiased scores of the selection
    assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * CFG.routed_scaling_factor)
    assert_close(w1.sum(-1), torch.full((64,), CFG.routed_scaling_factor))


def test_no_expert_outside_the_kept_groups():
    gate = Gate(CFG)
    gate.weight.data.normal_(0, 1.0)
    gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(500, CFG.hidden_size)
    _, idx, s = gate(x)
    biased = (s + gate.e_score_correction_bias).view(500, CFG.n_group, -1)
    kept = biased.topk(2, -1).values.sum(-1).topk(CFG.topk_group, -1).indices  # (N, 2)
    group_of_choice = idx // (CFG.n_routed_experts // CFG.n_group)
    assert (group_of_choice.unsqueeze(-1) == kept.unsqueeze(1)).any(-1).all()


def test_softmax_scoring_without_normalisation():
    cfg = CFG.replace(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)
    gate = Gate(cfg)
    gate.weight.data.normal_(0, 0.5)
    x = torch.randn(10, cfg.hidden_size)
    w, idx, s = gate(x)
    assert_close(s, F.softmax(x @ gate.weight.T, dim=-1))
    assert_close(w, s.gather(1, idx))


def test_dispatch_equals_a_dense_per_token_sum():
    moe = MoE(CFG)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(3, 7, CFG.hidden_size)
    y, stats = moe(x)
    flat = x.reshape(-1, CFG.hidden_size)
    weights, idx, _ = moe.gate(flat)
    expected = torch.stack([
        moe.shared_experts(tok) + sum(w * moe.experts[e](tok) for w, e in zip(ws, es.tolist()))
        for tok, ws, es in zip(flat, weights, idx)
    ])
    assert_close(y.reshape(-1, CFG.hidden_size), expected, atol=1e-5, rtol=1e-5)
    assert stats.load.sum() == 21 * CFG.num_experts_per_tok
    assert_close(stats.load, torch.bincount(idx.flatten(), minlength=16).float())


def test_bias_update_sign_rule():
    moe = MoE(CFG).train()
    load = torch.arange(16.0)  # mean 7.5: experts 0..7 underloaded, 8..15 overloaded
    used = moe.update_bias(0.001, load)
    b = moe.gate.e_score_correction_bias
    assert torch.equal(used, load)
    assert_close(b[:8], torch.full((8,), 0.001))
    assert_close(b[8:], torch.full((8,), -0.001))
    moe(torch.randn(2, 5, CFG.hidden_size))  # training forward accumulates counts
    assert moe.expert_load.sum() == 10 * CFG.num_experts_per_tok
    moe.update_bias(0.001)
    assert moe.expert_load.sum() == 0  # reset after the update
    moe.eval()(torch.randn(2, 5, CFG.hidden_size))
    assert moe.expert_load.sum() == 0  # evaluation does not count


def test_bias_updates_balance_a_skewed_router():
    moe = MoE(CFG).train()
    # A router whose centroids 0-5 lean towards a direction every token shares.
    moe.gate.weight.data.normal_(0, 0.3)
    direction = torch.randn(CFG.hidden_size)
    direction /= direction.norm()
    moe.gate.weight.data[:6] += direction
    x = torch.randn(512, 1, CFG.hidden_size) + 2 * direction
    with torch.no_grad():
        before = max_violation(moe(x)[1].load)
        for _ in range(200):
            moe(x)
            moe.update_bias(0.01)
        after = max_violation(moe(x)[1].load)
    assert before > 1.0
    assert after < 0.25  # 1.42 -> 0.17 with this seed: one sign step of jitter remains


def test_sequence_balance_loss_by_hand():
    # One sequence, T=2 tokens, N_r=4 experts, K_r=2.
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0]]])
    idx = torch.tensor([[[0, 1], [0, 2]]])
    # f = 4/(2*2) * counts = [2, 1, 1, 0];  P = mean of normalised s = [.375, .25, .25, .125]
    # L = 2*.375 + .25 + .25 + 0 = 1.25
    assert balance_loss(scores, idx).item() == pytest.approx(1.25)
    # Two identical sequences average to the same; the batch-level form pools tokens.
    assert balance_loss(scores.repeat(2, 1, 1), idx.repeat(2, 1, 1)).item() == pytest.approx(1.25)


def test_max_violation():
    assert max_violation(torch.tensor([2.0, 2.0, 2.0, 2.0])).item() == 0
    assert max_violation(torch.tensor([4.0, 2.0, 1.0, 1.0])).item() == pytest.approx(1.0)


def test_a_standalone_gate_is_initialised():
    """Built outside DeepSeekV3, the gate must still hold finite, small random centroids."""
    gate = Gate(CFG)
    assert torch.isfinite(gate.weight).all()
    assert 0.5 * CFG.initializer_range < gate.weight.std() < 2 * CFG.initializer_range


def test_sequence_wise_loss_is_per_sequence_not_pooled():
    """Two sequences that route differently, by hand (N_r = 4, K_r = 1, T = 2).

    Sequence 0 sends both tokens to expert 0: f = 4/(1*2) * [2, 0, 0, 0] = [4, 0, 0, 0];
    its normalised scores [.4 .2 .2 .2] and [.6 .2 .1 .1] average to P_0 = .5: L = 2.0.
    Sequence 1 sends both to expert 1: P_1 = mean(.6, .45) = .525, L = 2.1. Mean: 2.05.
    Pooling the batch first would give f = [2, 2, 0, 0], P = [.3125, .3625]: 1.35.
    """
    scores = torch.tensor([[[0.8, 0.4, 0.4, 0.4], [0.6, 0.2, 0.1, 0.1]],
                           [[0.2, 0.6, 0.1, 0.1], [0.1, 0.9, 0.5, 0.5]]])
    topk = torch.tensor([[[0], [0]], [[1], [1]]])
    assert_close(balance_loss(scores, topk), torch.tensor(2.05))
    pooled = balance_loss(scores.reshape(1, 4, 4), topk.reshape(1, 4, 1))
    assert_close(pooled, torch.tensor(1.35))
