"""DoRA as a variant of LoRA (peft's ``use_dora=True``): the same LoraLinear, whose adapter also
holds a magnitude m (out_features,) and runs through ``fusedpeft.ops.dora_linear``.

State layout is peft's: ``lora_magnitude_vector.<adapter>`` is a small module whose ``weight`` is
m (so parameter names, state dicts and peft's file key ``lora_magnitude_vector`` carry over), and
m starts as the row norms of W + s B A (the layer's output unchanged by the adapter at start).

What the layer keeps, none of it in the state dict: ||W_row||^2 per base weight (fixed while W is:
recomputed when W's storage or version changes), the norm ||W + s B A||_row per adapter while the
layer is in eval mode (recomputed when W, A or B change), and, while merged, the norm the merge
divided by (unmerge needs it back, as peft keeps it). The first two are not kept while a
torch.distributed process group is initialized (see ``_cache_ok``)."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..ops.dora import dora_linear, dora_weight_norm, weight_row_sq_norm
from .lora import LoraVariant


class DoraMagnitude(nn.Module):
    """m of one adapter, as ``.weight`` (peft's DoraLinearLayer keeps it the same way)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def _version(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.dtype, tuple(t.shape)


def _cache(module) -> dict:
    cache = module.__dict__.get("_dora_cache")
    if cache is None:
        cache = module.__dict__["_dora_cache"] = {}
    return cache


def _cache_ok() -> bool:
    """Whether a value may be kept by (storage, version) of the tensors it came from. Not under
    torch.distributed: FSDP2 all-gathers a sharded parameter into the same storage at every
    forward and keeps its version counter, so a changed adapter can look unchanged."""
    return not distributed.initialized()


def weight_sq_norm(module) -> torch.Tensor:
    """||W_row||^2 of the layer's base weight, kept while the weight is unchanged."""
    w = module.base_weight()
    if not _cache_ok():
        return weight_row_sq_norm(w.detach())
    key, value = _cache(module).get("wsq", (None, None))
    if key != _version(w):
        value = weight_row_sq_norm(w.detach())
        _cache(module)["wsq"] = (_version(w), value)
    return value


def norm(module, adapter_name: str) -> torch.Tensor:
    """||W + s B A||_row of one adapter (detached, float32). In eval mode the value is kept until
    W, A or B change; in training A and B change every step."""
    w = module.base_weight()
    A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
    if torch.compiler.is_compiling():  # no storage pointers or versions in a traced graph: computed in it
        return dora_weight_norm(w.detach(), A.detach(), B.detach(), module.scaling[adapter_name])
    slot = f"norm-{adapter_name}"
    keep = not module.training and _cache_ok()
    if keep:
        key = (_version(w), _version(A), _version(B))
        hit = _cache(module).get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
    # ||W||^2 as a function: the one-launch kernel computes it itself, only the composition reads it.
    value = dora_weight_norm(w.detach(), A.detach(), B.detach(), module.scaling[adapter_name],
                             lambda: weight_sq_norm(module))
    if keep:
        _cache(module)[slot] = (key, value)
    else:
        _cache(module).pop(slot, None)
    return value


class DoraVariant(LoraVariant):
    """DoRA's hooks on a LoraLinear (see LoraVariant for what each is)."""

    @staticmethod
    def init(module, adapter_name: str) -> None:
        w = module.base_weight()
        A = module.lora_A[adapter_name].weight
        with torch.no_grad():
            m = dora_weight_norm(w.detach(), A, module.lora_B[adapter_name].weight, module.scaling[adapter_name])
        module.lora_magnitude_vector[adapter_name] = DoraMagnitude(m.to(A.dtype))

    @staticmethod
    def forward(module, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias, lora_A, lora_B, dropout_p = module.adapter_operands(adapter_name)
        return dora_linear(
            x, weight, bias, lora_A, lora_B, module.scaling[adapter_name],
            module.lora_magnitude_vector[adapter_name].weight, dropout_p, module.training,
            weight_norm=norm(module, adapter_name),
        )

    @staticmethod
    def update(module, adapter_name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus this adapter's DoRA part relative to the base: (c - 1) drop(x) W^T + c s lora."""
        lora_A, lora_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
        dtype = lora_A.weight.dtype
        x_n = module.lora_dropout[adapter_name](x.to(dtype))
        c = module.lora_magnitude_vector[adapter_name].weight / norm(module, adapter_name).to(dtype)
        t = x_n @ module.base_weight().to(dtype).T
        return y + ((c - 1) * t + c * module.scaling[adapter_name] * lora_B(lora_A(x_n))).to(y.dtype)

    @staticmethod
    def merge(module, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """(m / n) (W + s B A), n the norm of the weight as it is now; n is kept for unmerge."""
        delta = module.delta_weight(adapter_name, weight.dtype)
        n = torch.linalg.vector_norm(weight + delta, dim=1)
        _cache(module)[f"merged-{adapter_name}"] = n
        c = module.lora_magnitude_vector[adapter_name].weight.detach().to(weight.dtype) / n
        return c[:, None] * (weight + delta)

    @staticmethod
    def unmerge(module, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        n = _cache(module).pop(f"merged-{adapter_name}")
        c = module.lora_magnitude_vector[adapter_name].weight.detach().to(weight.dtype) / n.to(weight.dtype)
        return weight / c[:, None] - module.delta_weight(adapter_name, weight.dtype)
