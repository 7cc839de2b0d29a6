"""scale_out.py against loops over hand-made routings, brute-force enumeration, Monte-Carlo
samples and arithmetic done by hand from the report's numbers."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from minidsv3 import ModelConfig
from minidsv3 import scale as S
from minidsv3 import scale_out as O

RELEASED = ModelConfig.preset("deepseek-v3")
HAND_ROUTING = torch.tensor([[0, 1, 2, 3],  # experts_per_rank=4: all on rank 0
                             [0, 4, 8, 12],  # one expert on each of ranks 0..3
                             [15, 14, 0, 1]])  # ranks 3 and 0


# -- the all-to-all from routing decisions ----------------------------------------------------
def loop_ranks(topk_idx, experts_per_rank):
    return [{int(e) // experts_per_rank for e in row} for row in topk_idx]


def test_ranks_reached_and_remote_copies_on_a_hand_made_routing():
    assert O.ranks_reached(HAND_ROUTING, 4).tolist() == [1, 4, 2]
    assert O.remote_copies(HAND_ROUTING, 4, own_rank=0) == 0 + 3 + 1
    assert O.remote_copies(HAND_ROUTING, 4, own_rank=3) == 1 + 3 + 1
    assert O.alltoall_bytes(O.remote_copies(HAND_ROUTING, 4, 3), 7168, 1) == 5 * 7168


def test_ranks_reached_and_remote_copies_match_a_loop_on_random_routings():
    idx = torch.rand(200, 64).topk(6, dim=-1).indices
    for per_rank in (1, 4, 16):
        sets = loop_ranks(idx, per_rank)
        assert O.ranks_reached(idx, per_rank).tolist() == [len(s) for s in sets]
        for own in (0, 3):
            assert O.remote_copies(idx, per_rank, own) == sum(len(s - {own}) for s in sets)


@pytest.mark.parametrize("bad, match", [
    (dict(topk_idx=torch.tensor([0, 1])), "shape"),
    (dict(topk_idx=HAND_ROUTING.float()), "integer"),
    (dict(topk_idx=torch.zeros(3, 0, dtype=torch.long)), "K >= 1"),
    (dict(topk_idx=-HAND_ROUTING), ">= 0"),
    (dict(experts_per_rank=0), "experts_per_rank=0"),
])
def test_bad_routings_are_refused(bad, match):
    args = dict(topk_idx=HAND_ROUTING, experts_per_rank=4) | bad
    with pytest.raises(ValueError, match=match):
        O.ranks_reached(**args)
    with pytest.raises(ValueError, match="own_rank=-1"):
        O.remote_copies(HAND_ROUTING, 4, own_rank=-1)
    with pytest.raises(ValueError, match="copies=-1"):
        O.alltoall_bytes(-1, 7168, 1)


# -- fan-out ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts, k, per_rank, allowed",
                         [(12, 3, 3, None), (12, 3, 3, 2), (16, 4, 2, 5), (8, 2, 4, 1)])
def test_expected_ranks_reached_equals_brute_force_enumeration(n_experts, k, per_rank, allowed):
    """Average over every allowed set of ranks and every choice of k experts among them."""
    ranks = n_experts // per_rank
    allowed = ranks if allowed is None else allowed
    total, count = Fraction(0), 0
    for chosen in itertools.combinations(range(ranks), allowed):
        pool = [r * per_rank + j for r in chosen for j in range(per_rank)]
        for experts in itertools.combinations(pool, k):
            total += len({e // per_rank for e in experts})
            count += 1
    expected = O.expected_ranks_reached(n_experts, k, per_rank, allowed)
    assert expected == pytest.approx(float(total / count), rel=1e-12)


def uniform_routing(n_tokens, cfg, nodes_allowed):
    """k distinct experts drawn uniformly among those of ``nodes_allowed`` random nodes."""
    E, G = cfg.n_routed_experts, cfg.n_group
    keep = torch.rand(n_tokens, G).topk(nodes_allowed, dim=-1).indices
    allowed = torch.zeros(n_tokens, G, dtype=torch.bool).scatter(1, keep, True)
    scores = torch.rand(n_tokens, E).masked_fill(~allowed.repeat_interleave(E // G, 1), -1)
    return scores.topk(cfg.num_experts_per_tok, dim=-1).indices


@pytest.mark.parametrize("node_limited", [True, False])
def test_fan_out_of_the_released_config_matches_a_monte_carlo_sample(node_limited):
    """Tokens on GPU 0 (node 0, in-node index 0) of the EP group: 64 GPUs, 4 experts each."""
    n = 20_000
    idx = uniform_routing(n, RELEASED, RELEASED.topk_group if node_limited else RELEASED.n_group)
    f = O.fan_out(RELEASED, node_limited=node_limited)
    nodes = O.ranks_reached(idx, 32).float()
    gpus_hit = torch.zeros(n, 64).scatter(1, idx // 4, 1.0)  # a second path to the GPU counts
    nvlink = gpus_hit[:, torch.arange(64) % 8 != 0].sum(1)  # not the landing GPU of a node
    tolerance = 4 / math.sqrt(n)  # four standard errors; each count's spread is below 1
    assert nodes.mean().item() == pytest.approx(f.nodes, abs=tolerance)
    assert O.remote_copies(idx, 32, own_rank=0) / n == pytest.approx(f.remote_nodes, abs=tolerance)
    assert gpus_hit.sum(1).mean().item() == pytest.approx(f.gpus, abs=tolerance)
    assert nvlink.mean().item() == pytest.approx(f.nvlink_copies, abs=tolerance)
    assert nodes.max().item() == f.max_nodes == (4 if node_limited else 8)


def test_fan_out_by_hand():
    """8 experts of 256, 32 per node: a node is missed with probability prod (224-i)/(256-i)."""
    miss = math.prod(Fraction(224 - i, 256 - i) for i in range(8))
    miss_limited = math.prod(Fraction(96 - i, 128 - i) for i in range(8))  # 4 nodes, 128 experts
    assert O.fan_out(RELEASED, node_limited=False).nodes == pytest.approx(float(8 * (1 - miss)))
    limited = O.fan_out(RELEASED)
    assert limited.nodes == pytest.approx(float(4 * (1 - miss_limited)))
    assert limited.remote_nodes == pytest.approx(limited.nodes * 7 / 8)
    with pytest.raises(ValueError, match="n_group=4 expert groups but ep=64 spans 8 nodes"):
        O.fan_out(RELEASED.replace(n_group=4, topk_group=2))
    with pytest.raises(ValueError, match="n_routed_experts=256 is not divisible by ep=48"):
        O.fan_out(RELEASED, O.Layout(gpus=96 * 16, ep=48), node_limited=False)


# -- traffic and time ---------------------------------------------------------------------------
def test_token_traffic_and_totals_by_hand():
    for node_limited in (True, False):
        f = O.fan_out(RELEASED, node_limited=node_limited)
        t = O.token_traffic(RELEASED, node_limited=node_limited)
        assert t.ib_dispatch == pytest.approx(7168 * f.remote_nodes)  # FP8: 1 byte per value
        assert t.ib_combine == pytest.approx(2 * 7168 * f.remote_nodes)  # BF16
        assert t.nvlink_combine == pytest.approx(2 * 7168 * f.nvlink_copies)
        scaled = O.token_traffic(RELEASED, node_limited=node_limited, fp8_scales=True)
        assert scaled.ib_dispatch == pytest.approx(t.ib_dispatch * (1 + 4 / 128))
        assert scaled.ib_combine == t.ib_combine
    limited, free = O.token_traffic(RELEASED), O.token_traffic(RELEASED, node_limited=False)
    assert limited.ib < free.ib
    assert O.moe_layers(RELEASED) == 61 - 3 and O.moe_layers(RELEASED, include_mtp=True) == 59


def test_alltoall_seconds_takes_the_slower_leg_of_each_direction():
    t = O.Traffic(ib_dispatch=100, ib_combine=100, nvlink_dispatch=400, nvlink_combine=100)
    # on the H800 the dispatch waits for NVLink (400 / 160e9 > 100 / 50e9), the combine for IB
    assert O.alltoall_seconds(t, 1000, O.H800) == pytest.approx(1000 * (400 / 160e9 + 100 / 50e9))
    assert O.alltoall_seconds(t, 1000, O.H100) == pytest.approx(1000 * (100 / 50e9 + 100 / 50e9))
    released = O.token_traffic(RELEASED)  # InfiniBand-bound on both GPUs
    ib_only = 4096 * released.ib / 50e9
    assert O.alltoall_seconds(released, 4096, O.H800) == pytest.approx(ib_only)
    assert O.alltoall_seconds(released, 4096, O.H100) == pytest.approx(ib_only)
    assert O.H800.nvlink_per_ib == pytest.approx(3.2)  # "4 nodes x 3.2 experts/node" = 13
    assert round(4 * O.H800.nvlink_per_ib) == 13 and O.H100.nvlink_per_ib == pytest.approx(9)
    with pytest.raises(ValueError, match="tokens=-1"):
        O.alltoall_seconds(released, -1)


# -- layout and memory per GPU ------------------------------------------------------------------
def test_the_reports_layout():
    layout = O.Layout()
    assert (layout.dp, layout.expert_dp, layout.ep_nodes) == (2048 // 16, 2048 // 16 // 64, 8)


@pytest.mark.parametrize("bad, match", [
    (dict(ep=48), "ep=48 does not divide the 128 GPUs of a stage"),
    (dict(ep=4), "ep=4 does not span whole 8-GPU nodes"),
    (dict(gpus=2044), "gpus=2044 do not fill whole 8-GPU nodes"),
    (dict(gpus=2040), "gpus=2040 is not divisible by pp=16"),
    (dict(schedule="nope"), "schedule='nope'"),
    (dict(pp=15, gpus=15 * 128), "DualPipe needs an even number"),
    (dict(pp=0), "must be positive"),
])
def test_bad_layouts_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        O.Layout(**bad)


def test_memory_on_one_gpu_is_the_whole_training_state():
    one = O.Layout(gpus=1, gpus_per_node=1, pp=1, ep=1, schedule="1f1b")
    assert O.memory_per_gpu(RELEASED, one).total == pytest.approx(S.training_state_bytes(RELEASED))


def test_memory_per_gpu_sums_to_the_replicas_over_the_cluster():
    """ZeRO-1 stores each optimizer state once per DualPipe copy; the weights live on the 128
    GPUs of their stage, each routed expert on 2 of them (one per expert-parallel group)."""
    m = O.memory_per_gpu(RELEASED)
    ws = S.model_weights(RELEASED)
    routed = sum(w.total for w in ws if w.part == S.ROUTED)
    biases = sum(w.total for w in ws if w.part == S.ROUTING_BIAS)
    rest = sum(w.total for w in ws) - routed - biases
    assert m.optimizer * 2048 == pytest.approx(2 * (routed + rest) * (4 + 2 * 2))
    assert m.parameters * 2048 == pytest.approx(2 * (rest * 128 + routed * 2))
    assert m.grads == pytest.approx(4 * m.parameters)
    assert m.weights == pytest.approx(2 * m.parameters + 4 * biases * 2 / 16)
    single = O.memory_per_gpu(RELEASED, O.Layout(schedule="1f1b"))
    assert m.total == pytest.approx(2 * single.total)  # Table 2: DualPipe keeps 2x parameters


# -- pipeline bubbles ---------------------------------------------------------------------------
def test_pipeline_costs_of_table_2_by_hand():
    t = O.ChunkTimes(forward=1, backward=2, weights=1, overlapped=2.5)
    costs = {s: O.pipeline_cost(s, 16, t) for s in ("1f1b", "zb1p", "dualpipe")}
    assert costs["1f1b"] == O.PipelineCost(bubble=15 * 3, parameter_copies=1, activations=16)
    assert costs["zb1p"] == O.PipelineCost(bubble=15 * 1, parameter_copies=1, activations=16)
    assert costs["dualpipe"] == O.PipelineCost(bubble=7 * 1.5, parameter_copies=2, activations=17)
    no_overlap = O.ChunkTimes(forward=1, backward=2, weights=1)  # F&B defaults to F + B
    assert O.pipeline_cost("dualpipe", 16, no_overlap).bubble == 7 * 2
    assert O.pipeline_cost("dualpipe", 2, t).bubble == 0


def test_bad_pipelines_are_refused():
    t = O.ChunkTimes(1, 2, 1)
    with pytest.raises(ValueError, match="pp=15: must be >= 1, and even for DualPipe"):
        O.pipeline_cost("dualpipe", 15, t)
    with pytest.raises(ValueError, match="schedule='gpipe'"):
        O.pipeline_cost("gpipe", 16, t)
    with pytest.raises(ValueError, match="W is part of B"):
        O.ChunkTimes(forward=1, backward=1, weights=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        O.ChunkTimes(forward=-1, backward=1, weights=0)
