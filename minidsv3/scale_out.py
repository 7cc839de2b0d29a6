"""The communication and pipeline side of scaling DeepSeek-V3 out (report sec. 3.1-3.3).

``scale.py`` counts what the model *is* (parameters, FLOPs, bytes); this module plans how
the report spreads it over 2,048 H800 GPUs, 8 per node (arXiv 2412.19437):

* the all-to-all: a token is dispatched once to every *other* rank that owns one of its
  experts and the expert outputs come back the same way (``alltoall_bytes``), the one
  formula both the plan and a measured expert-parallel run use;
* fan-out: how many nodes one token's 8 experts live on, with and without node-limited
  routing (at most 4 nodes, sec. 3.2.2), and so the bytes per token and MoE layer:
  dispatch in FP8, combine in BF16 (sec. 3.3.3);
* time per MoE layer on the H800's interconnect (InfiniBand 50 GB/s per GPU, NVLink
  160 GB/s, sec. 3.2.2) and on an H100's;
* the layout: 16-way pipeline, 64-way expert and ZeRO-1 data parallelism (sec. 3.2),
  with the training state each GPU holds;
* pipeline bubbles of 1F1B, ZB1P and DualPipe (Table 2).

The fan-out model draws a token's experts uniformly at random. A trained router is not
uniform, so these are expectations of a model, not measurements; the bounds (at most
``topk_group`` nodes) hold for any router. For the released config this gives 3.63
nodes per token with node-limited routing against 5.29 without, so 68 KB against 100 KB
over InfiniBand per token and MoE layer (dispatch and combine) and 5.6 against 8.2 ms per
layer for 4,096 tokens on every GPU, InfiniBand-bound on the H800 and on the H100 alike;
26 GB of training state per GPU with DualPipe's two copies of the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .scale import ROUTED, ROUTING_BIAS, Precision, model_weights

# ---------------------------------------------------------------------------------
# The all-to-all from routing decisions
# ---------------------------------------------------------------------------------
DISPATCH_BYTES = 1  # FP8 (E4M3) activations are dispatched (sec. 3.3.3)
COMBINE_BYTES = 2  # combine stays BF16 "to preserve training precision" (sec. 3.3.3)
# The FP8 dispatch also carries one scale per 1x128 activation tile (sec. 3.3.2); DeepEP
# sends them as FP32, 4 / 128 bytes more per value. Left out unless asked for.
FP8_SCALE_BYTES = 4 / 128


def alltoall_bytes(copies: float, hidden_size: int, dtype_bytes: float) -> float:
    """Bytes one all-to-all moves: one ``hidden_size`` vector per (token, remote rank) pair.

    A token is sent once to each other rank that owns at least one of its selected
    experts, however many of them that rank owns (it hands the token to its local
    experts), and its own rank costs no communication: this is how DeepEP deduplicates
    (sec. 3.2.2 sends a token once per node over InfiniBand in the same spirit). The
    combine returns one vector per pair, each rank summing its own experts' outputs
    first, so ``copies`` serves both directions.
    """
    if copies < 0 or hidden_size <= 0 or dtype_bytes <= 0:
        raise ValueError(f"copies={copies}, hidden_size={hidden_size}, dtype_bytes="
                         f"{dtype_bytes}: copies must be >= 0 and the sizes positive")
    return copies * hidden_size * dtype_bytes


def _ranks(topk_idx: torch.Tensor, experts_per_rank: int) -> torch.Tensor:
    """The rank owning each selected expert: rank r holds experts r*E_r .. (r+1)*E_r - 1."""
    if topk_idx.dim() != 2 or topk_idx.shape[1] == 0 or topk_idx.is_floating_point():
        raise ValueError(f"topk_idx: expected integer expert indices of shape (N, K) with "
                         f"K >= 1, got dtype {topk_idx.dtype} and shape {tuple(topk_idx.shape)}")
    if experts_per_rank <= 0:
        raise ValueError(f"experts_per_rank={experts_per_rank}: must be positive")
    if topk_idx.numel() and int(topk_idx.min()) < 0:
        raise ValueError(f"topk_idx holds {int(topk_idx.min())}: expert indices are >= 0")
    return topk_idx // experts_per_rank


def ranks_reached(topk_idx: torch.Tensor, experts_per_rank: int) -> torch.Tensor:
    """(N,) how many distinct ranks hold each token's experts (contiguous expert blocks)."""
    ranks = _ranks(topk_idx, experts_per_rank).sort(dim=1).values
    return 1 + (ranks[:, 1:] != ranks[:, :-1]).sum(dim=1)


def remote_copies(topk_idx: torch.Tensor, experts_per_rank: int, own_rank: int) -> int:
    """(token, rank) pairs a dispatch from ``own_rank`` sends: ranks reached, own one excluded."""
    if own_rank < 0:
        raise ValueError(f"own_rank={own_rank}: must be >= 0")
    at_home = (_ranks(topk_idx, experts_per_rank) == own_rank).any(dim=1)
    return int((ranks_reached(topk_idx, experts_per_rank) - at_home.long()).sum())


# ---------------------------------------------------------------------------------
# The report's layout (sec. 3.1, 3.2)
# ---------------------------------------------------------------------------------
PARAMETER_COPIES = {"1f1b": 1, "zb1p": 1, "dualpipe": 2}  # Table 2, "Parameter" column


@dataclass(frozen=True)
class Layout:
    """How the training run places the model on GPUs; defaults: the report's.

    The report states 16-way PP, 64-way EP spanning 8 nodes and ZeRO-1 DP on 2,048
    GPUs. Every GPU runs attention on its own tokens, so EP is not a third grid axis: it
    is carved out of DP, as in Megatron. Each pipeline stage has 2048 / 16 = 128 GPUs,
    all holding that stage's attention, dense FFNs and shared experts (DP = 128); they
    form 128 / 64 = 2 expert-parallel groups, so each routed expert has 2 replicas.
    """

    gpus: int = 2048
    gpus_per_node: int = 8
    pp: int = 16  # pipeline stages
    ep: int = 64  # expert-parallel ranks: the routed experts are split over them
    schedule: str = "dualpipe"

    def __post_init__(self):
        if min(self.gpus, self.gpus_per_node, self.pp, self.ep) <= 0:
            raise ValueError(f"{self}: all sizes must be positive")
        if self.schedule not in PARAMETER_COPIES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {list(PARAMETER_COPIES)}")
        per_node = f"whole {self.gpus_per_node}-GPU nodes"
        for remainder, problem in [
                (self.gpus % self.gpus_per_node, f"gpus={self.gpus} do not fill {per_node}"),
                (self.gpus % self.pp, f"gpus={self.gpus} is not divisible by pp={self.pp}"),
                (self.dp % self.ep, f"ep={self.ep} does not divide the {self.dp} GPUs of a stage"),
                (self.ep % self.gpus_per_node, f"ep={self.ep} does not span {per_node}")]:
            if remainder:
                raise ValueError(f"{self}: {problem}")
        if self.schedule == "dualpipe" and self.pp % 2:
            raise ValueError(f"pp={self.pp}: DualPipe needs an even number of stages (sec. 3.2.1)")

    @property
    def dp(self) -> int:
        """Replicas of each non-expert weight: the GPUs of one pipeline stage."""
        return self.gpus // self.pp

    @property
    def expert_dp(self) -> int:
        """Replicas of each routed expert: the expert-parallel groups in a stage."""
        return self.dp // self.ep

    @property
    def ep_nodes(self) -> int:
        """Nodes one expert-parallel group spans (8 in the report)."""
        return self.ep // self.gpus_per_node


# ---------------------------------------------------------------------------------
# Fan-out and traffic per token and MoE layer (sec. 3.2.2, 3.3.3)
# ---------------------------------------------------------------------------------
def expected_ranks_reached(n_experts: int, k: int, experts_per_rank: int,
                           ranks_allowed: int | None = None) -> float:
    """Expected distinct ranks a token's ``k`` experts live on, under a uniform router.

    The token picks ``k`` distinct experts uniformly among those of ``ranks_allowed``
    ranks (all of them by default; with node-limited routing, ``topk_group`` nodes that
    are themselves a uniform pick). By linearity of expectation each allowed rank counts
    with the probability it is hit, one minus the hypergeometric chance that all ``k``
    draws miss its ``experts_per_rank`` experts: m (1 - C(pool - e, k) / C(pool, k)).
    """
    if experts_per_rank <= 0 or n_experts % experts_per_rank:
        raise ValueError(f"experts_per_rank={experts_per_rank}: must divide n_experts={n_experts}")
    m = n_experts // experts_per_rank if ranks_allowed is None else ranks_allowed
    pool = m * experts_per_rank
    if not 1 <= m <= n_experts // experts_per_rank or not 1 <= k <= pool:
        raise ValueError(f"ranks_allowed={ranks_allowed}, k={k}: need 1 <= ranks_allowed <= "
                         f"{n_experts // experts_per_rank} and 1 <= k <= their {pool} experts")
    return m * (1 - math.comb(pool - experts_per_rank, k) / math.comb(pool, k))


@dataclass(frozen=True)
class FanOut:
    """Where one token's routed experts live (expected values, uniform router)."""

    nodes: float  # distinct nodes, the token's own included
    max_nodes: int  # the bound: min(K, nodes allowed)
    remote_nodes: float  # nodes other than its own: the InfiniBand copies of a dispatch
    gpus: float  # distinct GPUs
    nvlink_copies: float  # GPU copies forwarded over NVLink inside the target nodes


def fan_out(cfg: ModelConfig, layout: Layout = Layout(), node_limited: bool = True) -> FanOut:
    """Fan-out of one token over one expert-parallel group of ``layout``.

    The report's dispatch (sec. 3.2.2) sends a token over InfiniBand once to each target
    node, to the GPU with the same in-node index as its own; that GPU forwards it over
    NVLink to each other GPU of the node holding one of its experts. The token's origin
    does not depend on its routing, so a fraction (G - 1) / G of its nodes are remote and
    (g - 1) / g of its GPUs (G nodes, g GPUs per node) are reached over NVLink.
    """
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    G, g = layout.ep_nodes, layout.gpus_per_node
    if E % layout.ep:
        raise ValueError(f"n_routed_experts={E} is not divisible by ep={layout.ep}")
    if node_limited and cfg.n_group != G:
        raise ValueError(f"n_group={cfg.n_group} expert groups but ep={layout.ep} spans {G} "
                         "nodes: node-limited routing needs one group per node")
    allowed = cfg.topk_group if node_limited else G
    nodes = expected_ranks_reached(E, K, E // G, allowed)
    gpus = expected_ranks_reached(E, K, E // layout.ep, allowed * g)
    return FanOut(nodes, min(K, allowed), nodes * (G - 1) / G, gpus, gpus * (g - 1) / g)


@dataclass(frozen=True)
class Traffic:
    """Bytes one token sends in one MoE layer's forward all-to-all, per link."""

    ib_dispatch: float
    ib_combine: float
    nvlink_dispatch: float
    nvlink_combine: float

    @property
    def ib(self) -> float:
        return self.ib_dispatch + self.ib_combine


def token_traffic(cfg: ModelConfig, layout: Layout = Layout(), node_limited: bool = True,
                  fp8_scales: bool = False) -> Traffic:
    """Dispatch (FP8: 1 byte x hidden per copy) and combine (BF16: 2 bytes) of one token.

    ``fp8_scales`` adds the dispatch's FP32 scale per 128 values (3 % more).
    """
    f, d = fan_out(cfg, layout, node_limited), cfg.hidden_size
    fp8 = DISPATCH_BYTES + (FP8_SCALE_BYTES if fp8_scales else 0)
    return Traffic(alltoall_bytes(f.remote_nodes, d, fp8),
                   alltoall_bytes(f.remote_nodes, d, COMBINE_BYTES),
                   alltoall_bytes(f.nvlink_copies, d, fp8),
                   alltoall_bytes(f.nvlink_copies, d, COMBINE_BYTES))


def moe_layers(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """MoE blocks a token passes through: 58 in the released main model, 59 with MTP."""
    blocks = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return sum(cfg.is_moe_layer(i) for i in range(blocks))


@dataclass(frozen=True)
class Interconnect:
    """Bandwidth per GPU and direction, in bytes/s."""

    name: str
    nvlink: float  # to the other GPUs of its node
    ib: float  # to other nodes: one 400 Gb/s InfiniBand NIC per GPU

    @property
    def nvlink_per_ib(self) -> float:
        """NVLink forwards that keep pace with one InfiniBand copy: on the H800 a token can
        reach 3.2 GPUs per node at no extra cost, so up to 4 x 3.2 = 13 experts (sec. 3.2.2)."""
        return self.nvlink / self.ib


# The H800 is an H100 whose NVLink was cut from 900 to 400 GB/s (both directions
# together) for US export control (DeepSeek, "Insights into DeepSeek-V3", ISCA 2025,
# sec. 4.1): 200 GB/s per direction, of which the V3 report gets 160 GB/s; InfiniBand
# 50 GB/s (sec. 3.2.2). The H100's 450 GB/s per direction is the datasheet figure (at
# the H800's 80 % it would be about 360).
H800 = Interconnect("H800", nvlink=160e9, ib=50e9)
H100 = Interconnect("H100", nvlink=450e9, ib=50e9)


def alltoall_seconds(traffic: Traffic, tokens: int, link: Interconnect = H800) -> float:
    """One MoE layer's forward dispatch then combine when every GPU sends ``tokens`` tokens.

    In each, the InfiniBand and NVLink legs run at once (sec. 3.2.2: "fully overlapped"),
    so it takes as long as the slower leg; every GPU receives as much as it sends.
    """
    if tokens < 0:
        raise ValueError(f"tokens={tokens}: must be >= 0")
    dispatch = max(traffic.ib_dispatch / link.ib, traffic.nvlink_dispatch / link.nvlink)
    combine = max(traffic.ib_combine / link.ib, traffic.nvlink_combine / link.nvlink)
    return tokens * (dispatch + combine)


# ---------------------------------------------------------------------------------
# Pipeline bubbles (Table 2)
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTimes:
    """Execution times of one pipeline chunk, in any one unit."""

    forward: float  # F
    backward: float  # B: the full backward, for inputs and for weights
    weights: float  # W: its "backward for weights" part (zero-bubble schedules defer it)
    overlapped: float | None = None  # F&B: a forward and a backward chunk run together;
    #                                  None: F + B (the overlap hides communication only)

    def __post_init__(self):
        if min(self.forward, self.backward, self.weights, self.overlapped or 0) < 0:
            raise ValueError(f"{self}: times must be >= 0")
        if self.weights > self.backward:
            raise ValueError(f"weights={self.weights} > backward={self.backward}: W is part of B")


@dataclass(frozen=True)
class PipelineCost:
    """One row of Table 2."""

    bubble: float  # idle time, in the unit of the chunk times
    parameter_copies: int  # parameters per device, relative to 1/PP of the model
    activations: int  # peak activation memory, relative: PP, or PP + 1 for DualPipe


def pipeline_cost(schedule: str, pp: int, t: ChunkTimes) -> PipelineCost:
    """Table 2: 1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe (PP/2-1)(F&B+B-3W).

    DualPipe feeds micro-batches from both ends, so each device holds two stages' weights
    (2x) and one more micro-batch of activations (sec. 3.2.1).
    """
    if schedule not in PARAMETER_COPIES:
        raise ValueError(f"schedule={schedule!r}: choose one of {list(PARAMETER_COPIES)}")
    if pp < 1 or (schedule == "dualpipe" and pp % 2):
        raise ValueError(f"pp={pp}: must be >= 1, and even for DualPipe (sec. 3.2.1)")
    F, B, W = t.forward, t.backward, t.weights
    if schedule == "1f1b":
        bubble = (pp - 1) * (F + B)
    elif schedule == "zb1p":
        bubble = (pp - 1) * (F + B - 2 * W)
    else:
        overlapped = F + B if t.overlapped is None else t.overlapped
        bubble = (pp // 2 - 1) * (overlapped + B - 3 * W)
    activations = pp + 1 if schedule == "dualpipe" else pp
    return PipelineCost(bubble, PARAMETER_COPIES[schedule], activations)


# ---------------------------------------------------------------------------------
# Training state per GPU (sec. 3.2, 3.3.3)
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuMemory:
    """Training state on one GPU, in bytes (activations come on top)."""

    parameters: float  # how many parameters it holds
    weights: float  # working copy (BF16), plus the FP32 routing biases
    grads: float  # FP32 gradients: ZeRO-1 leaves them whole
    optimizer: float  # FP32 master weights and AdamW's moments: ZeRO-1 shards them over DP

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


REPORT_PRECISION = Precision()  # scale.py's defaults are the report's (sec. 3.3.3)


def memory_per_gpu(cfg: ModelConfig, layout: Layout = Layout(),
                   precision: Precision = REPORT_PRECISION, include_mtp: bool = True) -> GpuMemory:
    """Weights, gradients and optimizer state of the average GPU of ``layout``.

    Assumptions: the stages split the parameters evenly (the real split differs: with
    DualPipe the embedding, head and MTP module share a rank, sec. 3.2.3); the routed
    experts are split over EP and everything else is replicated over DP; ZeRO-1 shards
    each DualPipe copy's optimizer state over its own replicas (also sharding across the
    two copies would halve that line). Activations, held for PP or PP + 1 micro-batches
    (Table 2), depend on the micro-batch size, which the report does not give.
    """
    if cfg.n_routed_experts % layout.ep:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by "
                         f"ep={layout.ep}")
    ws = [w for w in model_weights(cfg) if include_mtp or not w.mtp]
    routed = sum(w.total for w in ws if w.part == ROUTED)
    biases = sum(w.total for w in ws if w.part == ROUTING_BIAS)
    replicated = sum(w.total for w in ws) - routed - biases
    share = PARAMETER_COPIES[layout.schedule] / layout.pp  # of the model, on one GPU
    params = share * (replicated + routed / layout.ep)
    sharded = share * (replicated / layout.dp + routed / (layout.ep * layout.expert_dp))
    return GpuMemory(params, params * precision.weights + share * biases * 4,
                     params * precision.grads,
                     sharded * (precision.master + 2 * precision.moments))
