"""Sharded data parallelism on PyTorch's own engine: FSDP2 over a DeviceMesh.

With N processes, every rank trains on its own slice of each batch. Instead of keeping
a full copy of the model, its parameters, gradients and AdamW moments on every rank
(plain data parallelism), ``torch.distributed.fsdp.fully_shard`` keeps 1/N of each on
each rank (ZeRO-3): before a block runs, its parameters are all-gathered; after the
backward, its gradients are reduce-scattered (averaged), each rank keeping the shard it
owns, and each rank's optimizer updates only that shard. The arithmetic is that of one
process training on the whole batch -- which is what the tests check.

With ``--ep E`` the routed experts are not sharded this way but split between groups
of E ranks (expert parallelism, ``parallel.py``): FSDP leaves them alone, the
all-to-all carries tokens to them, and this module averages their gradients and
gathers them for checkpoints (``Meshes`` says which ranks do what).

DeepSeek-V3 itself uses ZeRO-1 (only optimizer states sharded) across its data-parallel
groups, plus pipeline and expert parallelism (report sec. 3.2); ZeRO-3 is FSDP's
default and the simplest way to show sharding on a CPU.

Checkpoints must not depend on the number of processes, so this module also turns the
sharded model and optimizer into *full* state dicts keyed by parameter name, gathered
to rank 0 (``torch.distributed.checkpoint.state_dict``), and loads such an optimizer
dict back into a model sharded any way (or not at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from . import parallel
from .model import DeepSeekV3
from .moe import MoE


@dataclass
class Meshes:
    """How ``world`` ranks share the model: ``world // ep`` data-parallel groups of ``ep``.

    Every rank shards the dense parameters with FSDP2 (the "fsdp" mesh of all ranks).
    The routed experts are split by expert parallelism instead: each run of ``ep``
    consecutive ranks (an "ep" group) shares out the experts of every MoE layer, and
    the ranks at the same position in different groups (a "dp" group) hold the same
    experts and average their gradients.
    """

    world: int
    ep: int
    fsdp: DeviceMesh  # 1-D, every rank
    grid: DeviceMesh | None  # 2-D ("dp", "ep"); None without expert parallelism

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def ep_group(self):
        return self.grid.get_group("ep")

    @property
    def dp_group(self):
        return self.grid.get_group("dp")


def make_meshes(world: int, ep: int, device: torch.device) -> Meshes:
    """The meshes of ``world`` ranks with expert-parallel groups of ``ep`` (1 = none)."""
    if ep < 1 or world % ep:
        raise ValueError(f"--ep {ep} must divide the number of processes ({world}): the ranks "
                         "split into equal expert-parallel groups")
    fsdp = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    grid = (init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
            if ep > 1 else None)
    return Meshes(world, ep, fsdp, grid)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' parameters this rank holds (all of them without EP)."""
    return [p for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()]


def shard_model(model: DeepSeekV3, meshes: Meshes) -> DeepSeekV3:
    """Split the experts (with ``meshes.ep`` > 1), then wrap each decoder block (main and
    MTP) and the whole model with FSDP2.

    One FSDP unit per block means one all-gather per block: only one block's full
    parameters exist at a time. The root unit holds the rest (embedding, final norm,
    head, MTP projections). Buffers (routing biases, the RoPE table) are not sharded:
    every rank keeps them whole, and the trainer keeps the biases identical. Split
    experts differ from rank to rank, so FSDP must leave them alone (``ignored_params``);
    ``reduce_expert_gradients`` averages them instead.
    """
    ignored = None
    if meshes.ep > 1:
        parallel.shard_experts(model, meshes.ep_group)
        ignored = set(expert_parameters(model))
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=meshes.fsdp, ignored_params=ignored)
    fully_shard(model, mesh=meshes.fsdp, ignored_params=ignored)
    return model


def reduce_expert_gradients(model: nn.Module, meshes: Meshes) -> None:
    """Make split experts' gradients those of the mean loss over all ranks.

    The all-to-all backward summed the ``ep`` ranks' contributions on the owner
    (``parallel.scale_expert_gradients`` divides by ``ep``); the ``dp`` copies of each
    expert then average theirs, as FSDP does for every other parameter.
    """
    if meshes.ep == 1:
        return
    parallel.scale_expert_gradients(model)
    if meshes.dp > 1:
        grads = [p.grad for p in expert_parameters(model)]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=meshes.dp_group)
        flat /= meshes.dp
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


def clip_grad_norm(model: nn.Module, max_norm: float, meshes: Meshes | None) -> torch.Tensor:
    """Clip all gradients to a total norm of ``max_norm``; return the norm before clipping.

    FSDP's sharded gradients know their global norm; split experts' gradients are plain
    tensors, each held by one rank of an "ep" group, so their squares are summed over
    that group (once: the "dp" copies are equal after ``reduce_expert_gradients``).
    """
    if meshes is None or meshes.ep == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    experts = {id(p) for p in expert_parameters(model)}
    dense = [p.grad for p in model.parameters() if id(p) not in experts]
    dense_sq = torch.nn.utils.get_total_norm(dense).full_tensor() ** 2
    expert_sq = sum((p.grad.float() ** 2).sum() for p in expert_parameters(model))
    expert_sq = torch.as_tensor(expert_sq, dtype=torch.float32)
    dist.all_reduce(expert_sq, group=meshes.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    scale = min(1.0, max_norm / (total.item() + 1e-6))  # as clip_grad_norm_ does
    for p in model.parameters():
        p.grad.mul_(scale)
    return total


# -- state dicts that do not depend on the world size ----------------------------------
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model and optimizer state as one process would hold them, keyed by parameter name.

    Sharded models are gathered: the dicts are complete on rank 0 and empty elsewhere.
    Every rank must call this (it is a collective when the model is sharded).
    """
    model_state = get_model_state_dict(model, options=FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    if _experts_are_split(model):
        _gather_split_experts(model, model_state, optimizer, optim_state)
    return model_state, optim_state


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights alone, gathered the same way (e.g. for ``hf.save_pretrained``)."""
    model_state = get_model_state_dict(model, options=FULL)
    if _experts_are_split(model):
        _gather_split_experts(model, model_state)
    return model_state


def _experts_are_split(model: nn.Module) -> bool:
    return any(isinstance(m, MoE) and isinstance(m.dispatcher, parallel.AllToAllDispatcher)
               for m in model.modules())


def _gather_split_experts(model: nn.Module, model_state: dict[str, torch.Tensor],
                          optimizer: torch.optim.Optimizer | None = None,
                          optim_state: dict[str, Any] | None = None) -> None:
    """Rank 0 adds the experts other ranks hold (with their AdamW moments) to the dicts.

    FSDP gathers only what it shards; each split expert lives on one rank of every
    "ep" group, so its weights, moments and optimizer group travel to rank 0 as objects.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups)
                for p in group["params"]} if optimizer else {}
    held = {names[id(p)]: (group_of.get(id(p)), p.detach().cpu(),
                           {k: v.cpu() if isinstance(v, torch.Tensor) else v
                            for k, v in optimizer.state.get(p, {}).items()} if optimizer else {})
            for p in expert_parameters(model)}
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(held, everyone, dst=0)
    if everyone is None:
        return
    for rank_held in everyone:
        for name, (group, weight, moments) in rank_held.items():
            if name in model_state:  # rank 0's own experts, or another copy of an expert
                continue
            model_state[name] = weight
            if optim_state is not None:
                if moments:
                    optim_state["state"][name] = moments
                optim_state["param_groups"][group]["params"].append(name)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              optim_state: dict[str, Any]) -> None:
    """Load ``full_state``'s optimizer dict (read by every rank) whatever the sharding.

    Each saved moment is keyed by its parameter's name; a sharded parameter takes the
    slice of it that this rank owns (``distribute_tensor`` with the parameter's own
    placements), an unsharded one the whole tensor. The group hyperparameters (the
    learning rate the scheduler last set, betas, ...) come back too. The weights need no
    counterpart: the trainer loads them into the whole model before sharding it.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    saved_state, saved_groups = optim_state["state"], optim_state["param_groups"]
    native = optimizer.state_dict()  # the layout load_state_dict wants: parameters by index
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if names[id(p)] in saved_state:  # parameters never stepped have no state yet
            native["state"][i] = {key: _shard_like(p, value)
                                  for key, value in saved_state[names[id(p)]].items()}
    for group, index_group in zip(saved_groups, native["param_groups"]):
        # Under expert parallelism a rank holds only its share of each group.
        if not {names[id(params[i])] for i in index_group["params"]} <= set(group["params"]):
            raise ValueError("the checkpoint's optimizer groups hold other parameters than "
                             "this model's: it was saved by a different model or grouping")
        index_group.update({k: v for k, v in group.items() if k != "params"})
    optimizer.load_state_dict(native)


def _shard_like(param: torch.Tensor, value: Any) -> Any:
    """A full moment tensor shaped like ``param`` -> this rank's shard of it (else as is)."""
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) \
            and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value
