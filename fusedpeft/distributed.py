"""fusedpeft under torch.distributed: what DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``)
need from the adapter files and state dicts, and nothing else.

Training needs nothing here. Under DDP every rank holds whole parameters. Under FSDP2 the
parameters a module holds between steps are DTensor shards, but FSDP2's pre-forward hook puts
the all-gathered (unsharded) plain tensors on the module before its ``forward`` runs, and its
pre-backward hook gathers them again before the backward: the fused ops receive full plain
tensors (with a ``MixedPrecisionPolicy``, already in its ``param_dtype``) and their gradients
are reduce-scattered by FSDP2 (tests/test_distributed.py checks both).

What this module adds is for the code that reads or writes the adapter outside forward/backward:

- ``full_tensors``: the sharded (DTensor) values of a state dict gathered into full tensors; a
  collective, so every rank of the mesh must call it, in the same order (the callers iterate the
  model's state dict, whose order every rank shares).
- ``copy_into``: a full tensor copied into a parameter, into its shard where it is a DTensor
  (rank 0's value is scattered, so every rank ends with the same adapter).
- ``agree``: an error raised on one rank raised on every rank (a check that failed on one rank
  must not leave the others waiting in the next collective).

None of it imports or costs anything while no process group is initialized: ``initialized()``
is checked first, and DTensor's module is imported only after it.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import nn


def initialized() -> bool:
    """Whether a default process group is initialized (torch.distributed's own check)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def is_main_process() -> bool:
    """Rank 0 of the default group, or True without one."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module that DistributedDataParallel (state dict keys ``module.``) and torch.compile
    (an OptimizedModule, keys ``_orig_mod.``) wrappers hold, either around the other; the model
    itself otherwise. FSDP2 wraps nothing: the sharded model is the user's module."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a parameter that FSDP2 sharded)."""
    if not initialized():
        return False
    dtensor = _dtensor_type()
    return any(isinstance(t, dtensor) for t in tensors)


def model_is_sharded(model: nn.Module) -> bool:
    return is_sharded(model.parameters())


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor replaced by its full (all-gathered) value, detached; other
    tensors as they are. A collective where there are DTensors: call it on every rank."""
    if not initialized():
        return dict(tensors)
    dtensor = _dtensor_type()
    return {k: (v.detach().full_tensor() if isinstance(v, dtensor) else v) for k, v in tensors.items()}


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` without autograd, where ``target`` may be a DTensor shard of a
    tensor of ``value``'s (full) shape: rank 0's ``value`` is scattered into the shards (every rank
    must call it, in the same order). ``value`` is cast to the target's dtype and device."""
    with torch.no_grad():
        if initialized() and isinstance(target, _dtensor_type()):
            from torch.distributed.tensor import distribute_tensor

            local = target.to_local()
            full = value.to(device=local.device, dtype=target.dtype)
            target.copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=0))
        else:
            target.copy_(value)


def original_class(model: nn.Module) -> type:
    """The model's class as the user built it: fully_shard swaps a module's class for a subclass
    named FSDP<class> (``torch.distributed.fsdp.FSDPModule``); the class below it is returned."""
    cls = type(model)
    if initialized():
        from torch.distributed.fsdp import FSDPModule

        if issubclass(cls, FSDPModule):
            return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def agree(error: Optional[BaseException], what: str) -> None:
    """Call on every rank with the error this rank met (or None): a rank that met one raises it,
    the others raise a RuntimeError naming the ranks that failed and why. Without a process group
    the error (if any) is raised as it is."""
    if initialized():
        errors: list = [None] * torch.distributed.get_world_size()
        mine = None if error is None else f"{type(error).__name__}: {error}"
        torch.distributed.all_gather_object(errors, mine)
        if error is None:
            failed = [(r, e) for r, e in enumerate(errors) if e is not None]
            if failed:
                lines = "; ".join(f"rank {r}: {e}" for r, e in failed)
                raise RuntimeError(f"{what} failed on rank(s) {[r for r, _ in failed]} ({lines}); nothing was changed")
    if error is not None:
        raise error
