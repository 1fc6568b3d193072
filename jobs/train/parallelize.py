"""How the model is spread over the ranks: FSDP2, activation checkpointing, compile.

Every transformer block (image and text towers) is its own FSDP2 unit, then the
root (small models: the root only); parameters are sharded over all ranks, gathered per block for forward and
backward. With a 2-D mesh (replicas, shards) it is HSDP instead: each node's ranks shard
one copy of the model and the copies are replicated across nodes (FSDP2 reduce-scatters
gradients within the shard group, then all-reduces them across replicas), so the per-layer
all-gathers stay inside a node. open_clip's `logit_scale` is a 0-dim parameter, which FSDP2 refuses to
shard: it stays an ordinary replicated parameter (`ignored_params`) whose
gradient `sync_replicated_grads` averages across ranks; its name and shape are
unchanged, so checkpoints still load into a stock open_clip model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of both towers (open_clip's `resblocks` lists)."""
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(getattr(module, "resblocks", None), nn.ModuleList):
            blocks.extend(module.resblocks)
    return blocks


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP2 cannot shard (0-dim, e.g. logit_scale)."""
    return [p for p in model.parameters() if p.ndim == 0]


# Below this size one FSDP unit (the whole model) is cheaper: fewer, larger
# collectives, and gathering all weights at once costs little memory.
BLOCK_UNITS_MIN_PARAMS = 50_000_000


def parallelize(model: nn.Module, device: torch.device, world_size: int, bf16: bool,
                grad_checkpointing: bool, compile_blocks: bool, units: str = "auto",
                mesh_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 to `model` in place; returns it.

    `mesh_shape`: (world_size,) (the default) for FSDP, (replicas, shards) for HSDP
    (spec.mesh_shape chooses it).

    `units`: "block" (one FSDP unit per transformer block, then the root: the
    memory-saving layout for large models), "model" (one unit), or "auto"
    (block from BLOCK_UNITS_MIN_PARAMS parameters up).
    """
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    blocks = transformer_blocks(model)
    if compile_blocks:
        for block in blocks:
            block.compile()
    if units == "auto":
        units = "block" if sum(p.numel() for p in model.parameters()) >= BLOCK_UNITS_MIN_PARAMS else "model"
    mesh_shape = tuple(mesh_shape or (world_size,))
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh(device.type, mesh_shape, mesh_dim_names=names)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in blocks if units == "block" else []:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=set(replicated_params(model)))
    return model


def sync_replicated_grads(model: nn.Module, world_size: int) -> None:
    """Average the gradients of the replicated (unsharded) parameters across ranks."""
    if world_size == 1:
        return
    for p in replicated_params(model):
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)
