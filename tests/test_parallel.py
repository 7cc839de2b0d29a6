"""Expert parallelism (minidsv3.parallel) on two real gloo processes, checked against one process.

The two workers are started once per module: each runs every scenario below with
its own tokens and saves what it computed; the tests compare those results with the
one-process model (LocalDispatcher) computed here. One process holding both ranks'
tokens is the reference: its loss, the mean over all tokens, is the mean of the two
ranks' losses, so its gradients are the owner's expert gradient / E (after
``scale_expert_gradients``) and the mean over ranks of every replicated gradient.
"""

import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from minidsv3 import DeepSeekV3, ModelConfig, set_seed
from minidsv3.moe import LocalDispatcher, MoE
from minidsv3.parallel import scale_expert_gradients, shard_experts
from minidsv3.scale_out import alltoall_bytes, ranks_reached, remote_copies

E = 2  # expert-parallel ranks
CFG = ModelConfig.preset("tiny")  # 8 routed experts, top-2, 4 groups, 2 kept; MTP depth 1
ATOL = dict(atol=1e-5, rtol=0)


def _moe_layer(cfg=CFG, bias=None) -> MoE:
    """The same MoE layer in every process, with weights large enough to route unevenly."""
    set_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    if bias is not None:
        moe.gate.e_score_correction_bias.copy_(bias)
    return moe


def _layer_inputs() -> torch.Tensor:
    """(E*3, 5, d): rank r's tokens are rows [3r, 3r+3)."""
    return torch.randn(E * 3, 5, CFG.hidden_size, generator=torch.Generator().manual_seed(1))


def _model() -> DeepSeekV3:
    set_seed(0)
    model = DeepSeekV3(CFG)
    for moe in model.moe_layers():  # some tokens must reach both ranks, some only one
        moe.gate.weight.data.normal_(0, 0.5)
    return model


def _batch():
    """(E*2, 12) tokens and targets: rank r's sequences are rows [2r, 2r+2)."""
    ids = torch.randint(0, CFG.vocab_size, (E * 2, 13), generator=torch.Generator().manual_seed(2))
    return ids[:, :-1], ids[:, 1:]


def _grads(module) -> dict:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


# A rank sends nothing to rank 1, and rank 1 receives nothing: experts 0-3 (rank 0's) win.
FORCED_TO_RANK0 = torch.tensor([10.0] * 4 + [0.0] * 4)


# ------------------------------------------------------------ what each worker runs

def _layer_scenario(rank, bias=None):
    moe = _moe_layer(bias=bias)
    shard_experts(moe)
    x = _layer_inputs()[3 * rank:3 * rank + 3].requires_grad_()
    y, _ = moe(x)
    y.pow(2).mean().backward()  # each rank: the mean over its own tokens
    scale_expert_gradients(moe)
    return dict(y=y.detach(), x_grad=x.grad, grads=_grads(moe), keys=sorted(moe.state_dict()),
                stats=moe.dispatcher.last_stats)


def _model_scenario(rank):
    model = _model()
    shard_experts(model)
    tokens, targets = (t[2 * rank:2 * rank + 2] for t in _batch())
    out = model(tokens, targets)
    out.loss.backward()
    scale_expert_gradients(model)
    return dict(logits=out.logits.detach(), loss=out.loss.detach(), mtp=out.mtp.detach(),
                grads=_grads(model))


def _hand_routing_scenario(rank):
    """The dispatcher alone on hand-written routings (4 experts per rank)."""
    moe = _moe_layer()
    shard_experts(moe)
    idx = [torch.tensor([[0, 1], [0, 5], [4, 6], [2, 7]]),
           torch.tensor([[4, 5], [1, 6], [3, 2]])][rank]
    flat = torch.randn(len(idx), CFG.hidden_size, generator=torch.Generator().manual_seed(rank))
    weights = torch.rand(idx.shape, generator=torch.Generator().manual_seed(9 + rank))
    with torch.no_grad():
        routed = moe.dispatcher(flat, weights, idx, moe.experts)
    return dict(flat=flat, weights=weights, idx=idx, routed=routed,
                stats=moe.dispatcher.last_stats)


def _groups_as_ranks_scenario(rank):
    """n_group = E: group g is rank g's experts; topk_group 1 vs 2 (unrestricted)."""
    reached = {}
    for topk_group in (1, 2):
        moe = _moe_layer(CFG.replace(n_group=E, topk_group=topk_group))
        shard_experts(moe)
        with torch.no_grad():
            moe(_layer_inputs()[3 * rank:3 * rank + 3])
        reached[topk_group] = moe.dispatcher.last_stats.ranks_reached
    return reached


def _errors_scenario(rank):
    errors = {}
    odd = MoE(CFG.replace(n_routed_experts=5, n_group=1, topk_group=1))
    try:
        shard_experts(odd)
    except ValueError as e:
        errors["odd"] = str(e)
    moe = _moe_layer()
    shard_experts(moe)
    try:
        shard_experts(moe)
    except ValueError as e:
        errors["twice"] = str(e)
    try:
        moe.experts[7 - 7 * rank](torch.zeros(1, CFG.hidden_size))  # another rank's expert
    except RuntimeError as e:
        errors["remote"] = str(e)
    return errors


SCENARIOS = {
    "layer": _layer_scenario,
    "layer_forced": lambda rank: _layer_scenario(rank, FORCED_TO_RANK0),
    "model": _model_scenario,
    "hand_routing": _hand_routing_scenario,
    "groups_as_ranks": _groups_as_ranks_scenario,
    "errors": _errors_scenario,
}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    # A timeout, so that a collective one rank never joins fails instead of hanging.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=E, timeout=timedelta(seconds=30))
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(rank)
        except Exception:  # reported by the test that reads this scenario
            results[name] = traceback.format_exc()
    dist.barrier()  # nobody tears the group down while another rank still uses it
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario's results on rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("ep")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=E, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(E)]


def _results(ranks, name):
    for r in ranks:
        if isinstance(r[name], str):
            pytest.fail(f"scenario {name!r} failed in a worker:\n{r[name]}")
    return [r[name] for r in ranks]


# ------------------------------------------------------------ the tests

def _one_process_layer(bias=None):
    moe = _moe_layer(bias=bias)
    assert isinstance(moe.dispatcher, LocalDispatcher)
    x = _layer_inputs().requires_grad_()
    y, stats = moe(x)
    y.pow(2).mean().backward()  # the mean over both ranks' tokens
    return moe, x, y.detach(), stats


def _assert_layer_matches(results, bias=None):
    moe, x, y, _ = _one_process_layer(bias)
    one = _grads(moe)
    for rank, res in enumerate(results):
        mine = slice(3 * rank, 3 * rank + 3)
        assert_close(res["y"], y[mine], **ATOL)
        # this rank's loss weighs its tokens E times more than the one-process mean does
        assert_close(res["x_grad"] / E, x.grad[mine], **ATOL)
    # the owner collected both ranks' tokens (scaled by 1/E); experts nobody chose have zero
    # gradients, in one process and on their owner alike (every expert runs, maybe on nothing)
    experts = {k for k in one if k.startswith("experts.")}
    assert experts == {k for res in results for k in res["grads"] if k.startswith("experts.")}
    for k in experts:
        owner = int(k.split(".")[1]) // 4
        assert_close(results[owner]["grads"][k], one[k], **ATOL, msg=k)
    for k in ("gate.weight", *[k for k in one if k.startswith("shared_experts.")]):
        assert_close(sum(res["grads"][k] for res in results) / E, one[k], **ATOL, msg=k)


def test_one_layer_all_to_all_equals_local_dispatch(ranks):
    results = _results(ranks, "layer")
    _assert_layer_matches(results)
    stats = [r["stats"] for r in results]
    assert all((s.ranks_reached == 2).any() for s in stats)  # some copies crossed ranks


def test_state_dict_holds_the_owned_experts_under_global_names(ranks):
    keys = [r["keys"] for r in _results(ranks, "layer")]
    full = sorted(_moe_layer().state_dict())
    for rank, got in enumerate(keys):
        others = {str(j) for j in range(8) if j // 4 != rank}
        assert got == [k for k in full if not (k.startswith("experts.")
                                               and k.split(".")[1] in others)]


def test_a_rank_that_receives_no_token(ranks):
    results = _results(ranks, "layer_forced")
    _, _, _, stats = _one_process_layer(FORCED_TO_RANK0)
    assert stats.load[4:].sum() == 0  # the forcing worked: rank 1's experts get nothing
    assert [r["stats"].copies_sent for r in results] == [0, 15]  # rank 1 sends all 15 tokens
    _assert_layer_matches(results, FORCED_TO_RANK0)


def test_whole_model_with_mtp_equals_one_process(ranks):
    results = _results(ranks, "model")
    tokens, targets = _batch()
    model = _model()
    for rank, res in enumerate(results):  # the same halves in one process
        half = model(tokens[2 * rank:2 * rank + 2], targets[2 * rank:2 * rank + 2])
        assert_close(res["logits"], half.logits.detach(), **ATOL)
        assert_close(res["loss"], half.loss.detach(), **ATOL)
        assert_close(res["mtp"], half.mtp.detach(), **ATOL)
    full = model(tokens, targets)  # the global batch
    assert_close(sum(r["loss"] for r in results) / E, full.loss.detach(), **ATOL)
    full.loss.backward()
    one = _grads(model)
    expert_keys = [k for k in one if ".mlp.experts." in k]
    assert any(k.startswith("mtp.") for k in expert_keys)  # the MTP block's experts too
    for k, g in one.items():
        have = [r["grads"][k] for r in results if k in r["grads"]]
        if k in expert_keys:
            assert len(have) == 1, k  # exactly one owner
            assert_close(have[0], g, **ATOL, msg=k)
        else:
            assert len(have) == E, k  # replicated
            assert_close(sum(have) / E, g, **ATOL, msg=k)


def test_stats_against_a_hand_computation(ranks):
    results = _results(ranks, "hand_routing")
    d, fp32 = CFG.hidden_size, 4
    # rank 0: [0,1] -> {0}, [0,5] -> {0,1}, [4,6] -> {1}, [2,7] -> {0,1}; 3 rows go to rank 1
    # rank 1: [4,5] -> {1}, [1,6] -> {0,1}, [3,2] -> {0}; 2 rows go to rank 0
    expected = [([1, 2, 1, 2], 3), ([1, 2, 1], 2)]
    moe = _moe_layer()
    for res, (reached, copies) in zip(results, expected):
        s = res["stats"]
        assert s.ranks_reached.tolist() == reached
        assert s.copies_sent == copies
        assert s.dispatch_bytes == s.combine_bytes == copies * d * fp32
        local = LocalDispatcher()(res["flat"], res["weights"], res["idx"], moe.experts)
        assert_close(res["routed"], local, **ATOL)


def test_groups_mapped_to_ranks_bound_the_ranks_reached(ranks):
    results = _results(ranks, "groups_as_ranks")
    for reached in results:
        assert (reached[1] == 1).all()  # topk_group = 1: one rank per token
    assert any((reached[2] == 2).any() for reached in results)  # unrestricted: some reach 2


def test_bad_layouts_are_refused(ranks):
    for rank, errors in enumerate(_results(ranks, "errors")):
        assert "n_routed_experts=5 is not divisible by the expert-parallel size 2" in errors["odd"]
        assert "already sharded" in errors["twice"]
        other = 7 - 7 * rank
        assert f"routed expert {other} lives on expert-parallel rank {1 - rank}" in errors["remote"]
    with pytest.raises(ValueError, match="expert parallelism needs torch.distributed"):
        shard_experts(_moe_layer())  # this process never initialised torch.distributed


def test_measured_bytes_equal_the_scale_out_formula(ranks):
    """The planning formula of scale_out.py predicts the bytes the dispatcher sent, from
    the routing alone (a second, independent count of the ranks each token reaches)."""
    for rank, res in enumerate(_results(ranks, "hand_routing")):
        s, per_rank = res["stats"], CFG.n_routed_experts // E
        copies = remote_copies(res["idx"], per_rank, rank)
        assert s.dispatch_bytes == alltoall_bytes(copies, CFG.hidden_size, dtype_bytes=4)
        assert s.combine_bytes == alltoall_bytes(copies, CFG.hidden_size, dtype_bytes=4)
        assert torch.equal(s.ranks_reached, ranks_reached(res["idx"], per_rank))
