"""Sharded data parallelism on PyTorch's own engine: FSDP2 over a DeviceMesh.

With N processes, every rank trains on its own slice of each batch. Instead of keeping
a full copy of the model, its parameters, gradients and AdamW moments on every rank
(plain data parallelism), ``torch.distributed.fsdp.fully_shard`` keeps 1/N of each on
each rank (ZeRO-3): before a block runs, its parameters are all-gathered; after the
backward, its gradients are reduce-scattered (averaged), each rank keeping the shard it
owns, and each rank's optimizer updates only that shard. The arithmetic is that of one
process training on the whole batch -- which is what the tests check.

DeepSeek-V3 itself uses ZeRO-1 (only optimizer states sharded) across its data-parallel
groups, plus pipeline and expert parallelism (report sec. 3.2); ZeRO-3 is FSDP's
default and the simplest way to show sharding on a CPU.

Checkpoints must not depend on the number of processes, so this module also turns the
sharded model and optimizer into *full* state dicts keyed by parameter name, gathered
to rank 0 (``torch.distributed.checkpoint.state_dict``), and loads such an optimizer
dict back into a model sharded any way (or not at all).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .model import DeepSeekV3


def data_parallel_mesh(world: int, device: torch.device) -> DeviceMesh:
    """A 1-D mesh of every rank: the "dp" dimension parameters are sharded over."""
    return init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))


def shard_model(model: DeepSeekV3, mesh: DeviceMesh) -> DeepSeekV3:
    """Wrap each decoder block (main and MTP) and then the whole model with FSDP2.

    One FSDP unit per block means one all-gather per block: only one block's full
    parameters exist at a time. The root unit holds the rest (embedding, final norm,
    head, MTP projections). Buffers (routing biases, the RoPE table) are not sharded:
    every rank keeps them whole, and the trainer keeps the biases identical.
    """
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


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
    return model_state, optim_state


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
        if [names[id(params[i])] for i in index_group["params"]] != list(group["params"]):
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
