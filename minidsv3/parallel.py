"""Expert parallelism: the routed experts of every MoE layer split over E ranks (report sec. 3.2).

Rank r of an expert-parallel group of E ranks owns the routed experts
[r N_r/E, (r+1) N_r/E); every rank keeps the attention, the gate and the shared
experts, and routes its own tokens. One MoE forward is then

1. *route*: the gate picks each token's K experts, here, as in one process;
2. *count*: a token goes ONCE to every rank that owns at least one of its experts
   (copies are de-duplicated by rank, as DeepSeek's DeepEP does, so the number of
   ranks a token reaches -- not K -- sets the traffic; node-limited routing,
   ``topk_group`` groups mapped to ranks, bounds it); the per-rank counts are
   exchanged first so that every rank knows how many rows it will receive;
3. *dispatch*: an all-to-all sends each copy's activation with its K weights, and
   its expert ids in the receiver's numbering (-1 where another rank owns the expert);
4. *run*: the receiver expands the copies into (token, local expert) pairs and runs
   each local expert once on a contiguous slice (``moe.run_experts``, the same code
   as one process), summing each copy's weighted outputs into one vector;
5. *combine*: the reverse all-to-all returns one vector per copy, and the sender
   adds them into its tokens' outputs. No token is ever dropped.

Every rank of the group must run each MoE forward (and backward) together: the
all-to-alls are collectives.

Gradients. Each rank's loss is the mean over its own tokens. The backward of an
all-to-all is the all-to-all with the splits swapped, so an expert's owner receives
the gradient contributions of EVERY rank's tokens: its expert gradient is the SUM
of the E ranks' losses' gradients, while a replicated parameter (attention, gate,
shared experts) gets its own rank's gradient only. With E equal shares of a global
batch, the one-process loss is the mean of the E ranks' losses, hence

    one-process gradient = (owner's expert gradient) / E          (scale_expert_gradients)
                         = mean over ranks of a replicated gradient (data parallelism).

Design notes. The weights travel in the same differentiable message as the
activations: with one differentiable all-to-all per direction, the backward
collectives follow a strict chain (combine, then dispatch, layer after layer) and
are issued in the same order on every rank, which a collective needs. The small
autograd function below is written out (rather than taken from
``torch.distributed.nn.functional``, deprecated in recent PyTorch) because its
backward is the lesson: gradients travel back along the same routes, reversed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .moe import MoE, run_experts


@dataclass
class DispatchStats:
    """What one MoE layer's all-to-all moved in one forward, seen from this rank's tokens."""

    ranks_reached: torch.Tensor  # (N,) distinct ranks owning each token's experts (own included)
    copies_sent: int  # (token, other rank) pairs: the rows that left this rank
    dispatch_bytes: int  # activation bytes of those rows (ids and weights not counted)
    combine_bytes: int  # activation bytes that came back to this rank for them


class RemoteExpert(nn.Module):
    """Stands in for a routed expert that another rank owns: no parameters, no forward."""

    def __init__(self, index: int, owner: int):
        super().__init__()
        self.index, self.owner = index, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"routed expert {self.index} lives on expert-parallel rank {self.owner}, not on this "
            "rank: a sharded MoE must run through its AllToAllDispatcher (shard_experts "
            "installs it)")

    def extra_repr(self) -> str:
        return f"expert {self.index} on rank {self.owner}"


def exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group
             ) -> torch.Tensor:
    """All-to-all of rows: send_splits[j] rows of x go to rank j, in rank order; the
    result holds recv_splits[j] rows from each rank j, in rank order. No gradient."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """``exchange`` with a gradient: each received row's gradient returns to its sender."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


class AllToAllDispatcher:
    """Token dispatch over an expert-parallel group (see the module docstring, steps 2-5)."""

    def __init__(self, group, experts_per_rank: int):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.experts_per_rank = experts_per_rank
        self.last_stats: DispatchStats | None = None  # of the latest forward

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
        """flat (N, d), weights (N, K) float32, idx (N, K) -> routed output (N, d)."""
        N, d = flat.shape
        n = self.experts_per_rank
        # 2. count: one copy per (token, rank owning one of its experts), grouped by rank
        owner = idx // n  # (N, K) rank of each selected expert
        reach = torch.zeros(N, self.size, dtype=torch.bool, device=flat.device)
        reach.scatter_(1, owner, True)  # (N, E)
        dest, token = reach.T.nonzero(as_tuple=True)  # (S,) each copy's rank and token
        send = reach.sum(0)  # (E,) copies for each rank
        ones = [1] * self.size
        recv = exchange(send, ones, ones, self.group)  # (E,) copies from each rank
        send_splits, recv_splits = send.tolist(), recv.tolist()

        # 3. dispatch: activation and weights in one differentiable message; ids beside it
        message = torch.cat([flat[token], weights[token].to(flat.dtype)], dim=1)  # (S, d+K)
        ids = torch.where(owner[token] == dest[:, None], idx[token] - dest[:, None] * n, -1)
        arrived = AllToAll.apply(message, send_splits, recv_splits, self.group)  # (R, d+K)
        arrived_ids = exchange(ids, send_splits, recv_splits, self.group)  # (R, K)

        # 4. run: (copy, local expert) pairs, each local expert once on a contiguous slice
        x, w = arrived[:, :d], arrived[:, d:]
        row, slot = (arrived_ids >= 0).nonzero(as_tuple=True)
        mine = experts[self.rank * n:(self.rank + 1) * n]
        # run_experts runs every local expert, even on nothing: when nothing arrived, out is
        # still in the autograd graph, so this rank joins the backward all-to-alls the
        # others start (and its experts get zero gradients, not none).
        out = run_experts(x, row, arrived_ids[row, slot], w[row, slot], mine)

        # 5. combine: one vector per copy goes back to the rank of its token
        back = AllToAll.apply(out, recv_splits, send_splits, self.group)  # (S, d)
        routed = torch.zeros_like(flat).index_add_(0, token, back)

        copies = len(token) - send_splits[self.rank]
        self.last_stats = DispatchStats(
            ranks_reached=reach.sum(1), copies_sent=copies,
            dispatch_bytes=copies * d * message.element_size(),
            combine_bytes=copies * d * back.element_size(),
        )
        return routed


def shard_experts(model: nn.Module, group=None) -> None:
    """Keep only this rank's share of every MoE layer's routed experts; dispatch by all-to-all.

    Build the model the usual way first, with the same seed on every rank, so that the
    experts a rank keeps have the weights they have in one process. The experts of the
    other ranks become ``RemoteExpert`` placeholders: ``state_dict()`` holds the owned
    experts only, under their global names (``experts.{j}``). ``group`` is the
    expert-parallel process group (default: every process).
    """
    if not dist.is_initialized():
        raise ValueError("expert parallelism needs torch.distributed: call "
                         "dist.init_process_group first (or launch with torchrun)")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the expert-parallel group")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("the model has no MoE layer: there are no routed experts to shard")
    for moe in moes:
        n_routed = len(moe.experts)
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            raise ValueError("the experts are already sharded: call shard_experts once per model")
        if n_routed % size:
            raise ValueError(
                f"n_routed_experts={n_routed} is not divisible by the expert-parallel size "
                f"{size}: every rank must own the same number of experts; use an expert-parallel "
                f"size that divides {n_routed}")
        per_rank = n_routed // size
        for j in range(n_routed):
            if j // per_rank != rank:
                moe.experts[j] = RemoteExpert(j, j // per_rank)
        moe.dispatcher = AllToAllDispatcher(group, per_rank)


def scale_expert_gradients(model: nn.Module) -> None:
    """Divide the gradients of this rank's routed experts by the expert-parallel size E.

    Call it after backward (and all gradient-accumulation micro-batches), before
    clipping: the owner's expert gradient is then the gradient of the mean of the E
    ranks' losses, like every replicated parameter's gradient once averaged over the
    ranks (module docstring). Experts replicated over several expert-parallel groups
    are then averaged over those groups like any replicated parameter. No-op for
    experts that are not sharded.
    """
    for moe in model.modules():
        if isinstance(moe, MoE) and isinstance(moe.dispatcher, AllToAllDispatcher):
            for p in moe.experts.parameters():
                if p.grad is not None:
                    p.grad.div_(moe.dispatcher.size)


class StepTraffic:
    """What one training step's all-to-alls did, summed over its micro-batches and ranks.

    Per MoE layer (main blocks, then MTP blocks): the mean and the largest number of
    ranks a token was sent to (its fan-out, which ``topk_group`` bounds when expert
    groups map to ranks) and the bytes the dispatch and the combine moved between ranks.
    """

    def __init__(self):
        self.sums: torch.Tensor | None = None  # (L, 3): ranks reached, tokens, bytes
        self.largest: torch.Tensor | None = None  # (L,): most ranks one token reached

    def add(self, model: nn.Module) -> None:
        """Take in the stats of the forward that just ran (nothing without EP)."""
        stats = [m.dispatcher.last_stats for m in model.modules()
                 if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher)]
        if not stats:
            return
        # (MTP layers see T - k tokens per sequence, so each layer is summed on its own.)
        sums = torch.tensor([[s.ranks_reached.sum().item(), s.ranks_reached.numel(),
                              s.dispatch_bytes + s.combine_bytes] for s in stats],
                            dtype=torch.float64, device=stats[0].ranks_reached.device)
        self.sums = sums if self.sums is None else self.sums + sums
        most = torch.stack([s.ranks_reached.max() for s in stats]).double()
        self.largest = most if self.largest is None else torch.maximum(self.largest, most)

    def summary(self) -> dict[str, list[float]]:
        """Totals over every rank (a collective: all ranks call it); {} without EP."""
        if self.sums is None:
            return {}
        dist.all_reduce(self.sums)
        dist.all_reduce(self.largest, op=dist.ReduceOp.MAX)
        return {"fanout_mean": (self.sums[:, 0] / self.sums[:, 1]).tolist(),
                "fanout_max": self.largest.tolist(), "alltoall_bytes": self.sums[:, 2].tolist()}
