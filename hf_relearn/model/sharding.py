"""Parameters split across processes: FSDP2's DTensor shards and DeepSpeed ZeRO-3's partitions.

A reset must write whole tensors and draw them as an unsharded model would; a fingerprint must hash, and a count
count, whole tensors; a tied-weight check must see two names of one sharded tensor as one. This module gives surgery,
block maps and results these, and is a no-op for a model that is not sharded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def is_fsdp_shard(t: torch.Tensor) -> bool:
    """An FSDP2 parameter: a DTensor, each rank holding a shard."""
    return hasattr(t, "full_tensor")


def is_zero3_partition(t: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: outside a gather its local data is empty, its whole size in ``ds_numel``."""
    return hasattr(t, "ds_id")


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


@contextmanager
def gathered(params: list[torch.Tensor]):
    """DeepSpeed ZeRO-3 keeps only a shard of each parameter on a rank: gather the full tensors while we write
    them (every rank computes the same reset from the same seed; rank 0's copy is what is kept). A no-op elsewhere.
    """
    partitioned = list({id(p): p for p in params if is_zero3_partition(p)}.values())  # a tied tensor once
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def numel(p: torch.Tensor) -> int:
    """Elements of the whole tensor (a ZeRO-3 partition's local data is empty; a DTensor counts its whole already)."""
    return getattr(p, "ds_numel", None) or p.numel()


@contextmanager
def whole_tensor(t: torch.Tensor):
    """The whole of one tensor for reading: an FSDP2 DTensor's full tensor; a ZeRO-3 partition gathered (unless a
    surrounding gather has done so; outside one, its local data is empty); any other tensor as it is."""
    if is_fsdp_shard(t):
        yield t.full_tensor()
    elif is_zero3_partition(t) and t.numel() != numel(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            yield t.data
    else:
        yield t


def reshard_fsdp(model: nn.Module) -> None:
    """Put FSDP2 units back in their sharded state (an evaluation leaves the root unit gathered, and then the
    model's parameters are temporary whole copies, not the shards a write must reach). A no-op elsewhere."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


@contextmanager
def whole_shards(model: nn.Module, names: list[str], params: dict[str, torch.Tensor]):
    """FSDP2 shards every parameter across ranks (a DTensor). Drawn into the shards, a reset would give each rank
    the same local random numbers (every shard a copy of the first). So while we write, the named sharded
    parameters are swapped, under every name they have (tied weights too), for whole plain copies: every rank draws
    the same reset from the same seed, and on exit rank 0's values are scattered back into the shards. Yields the
    parameters by name as they are inside. A no-op without DTensors; call ``reshard_fsdp`` first."""
    sharded = {id(params[n]): params[n] for n in names if is_fsdp_shard(params[n])}
    if not sharded:
        yield params
        return
    from torch.distributed.tensor import distribute_tensor

    whole = {
        i: nn.Parameter(t.full_tensor().detach().clone(), requires_grad=t.requires_grad) for i, t in sharded.items()
    }
    swapped = {n: id(t) for n, t in params.items() if id(t) in whole}
    for name, i in swapped.items():
        _set_parameter(model, name, whole[i])
    try:
        yield {**params, **{n: whole[i] for n, i in swapped.items()}}
    finally:
        with torch.no_grad():
            for i, shards in sharded.items():
                shards.copy_(distribute_tensor(whole[i].detach(), shards.device_mesh, shards.placements))
            for name, i in swapped.items():
                _set_parameter(model, name, sharded[i])


def storage_key(p: torch.Tensor) -> tuple | None:
    """What two names of one tensor share. A sharded parameter (an FSDP2 DTensor, whose data_ptr is 0 for every
    parameter; a DeepSpeed ZeRO-3 partition, whose local data is empty) is tied by being the same object, as
    transformers ties weights; a plain tensor by where its data starts. None: nothing to share."""
    if is_fsdp_shard(p) or is_zero3_partition(p):
        return ("parameter", id(p))
    return ("storage", p.data_ptr()) if p.numel() else None


def sharded_class_origin(model: nn.Module) -> type | None:
    """The model's own class when FSDP2's ``fully_shard`` has replaced it by a subclass of its making, else None."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None or not isinstance(model, fsdp_module):
        return None
    return next(c for c in type(model).__mro__ if not issubclass(c, fsdp_module))


def owner(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The path of the module that holds the parameter or buffer ``name``, and the module."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    return path, model.get_submodule(path)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Register ``value`` as the parameter ``name`` on its module, bypassing the sharding wrapper's bookkeeping."""
    owner(model, name)[1]._parameters[name.rsplit(".", 1)[-1]] = value
