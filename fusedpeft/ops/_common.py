"""Argument checks and dtype handling shared by every op (one place, so every method reports bad
input the same way)."""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in: the base layer's, or autocast's when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _linear_inputs_ok(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    # Every check of check_linear_inputs as one expression: the common, valid call pays for this
    # alone (a small layer's step is bound by host time); the checks below only name the problem.
    device = weight.device
    return (weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.device == device
            and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.device == device
                                  and bias.dtype in FLOAT_DTYPES))
            and (x.dtype == weight.dtype or torch.is_autocast_enabled(device.type)))


def check_linear_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    if _linear_inputs_ok(x, weight, bias):
        return
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: x has last dimension {x.shape[-1]} but the layer takes in_features={in_features} "
            f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
        raise TypeError(
            f"{op}: x is {x.dtype} but the base weight is {weight.dtype}; cast x (or run under "
            f"torch.autocast) so both share one dtype"
        )


def check_adapter_tensor(op: str, name: str, t: torch.Tensor, shape: tuple, weight: torch.Tensor):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != weight.device:
        raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")


def check_lora_inputs(op: str, x, weight, bias, lora_A, lora_B, dropout_p: float):
    """The checks of a LoRA-shaped op (lora_linear, dora_linear): the linear inputs, A (r, K) with
    r >= 1, B (N, r), dropout_p in [0, 1)."""
    if (_linear_inputs_ok(x, weight, bias) and lora_A.dim() == 2 and lora_B.dim() == 2 and lora_A.shape[0] >= 1
            and lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0]
            and lora_B.shape[1] == lora_A.shape[0] and lora_A.dtype in FLOAT_DTYPES and lora_B.dtype in FLOAT_DTYPES
            and lora_A.device == weight.device and lora_B.device == weight.device and 0.0 <= dropout_p < 1.0):
        return  # the valid call (see _linear_inputs_ok); the checks below name what is wrong
    check_linear_inputs(op, x, weight, bias)
    if lora_A.dim() != 2:
        raise ValueError(f"{op}: lora_A must be 2-D (r, in_features), got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"{op}: LoRA rank must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    check_adapter_tensor(op, "lora_A", lora_A, (r, weight.shape[1]), weight)
    check_adapter_tensor(op, "lora_B", lora_B, (weight.shape[0], r), weight)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # Adapter weights are often kept in float32 beside a bf16 base (peft's default): they are cast
    # to the compute dtype here, outside the autograd Function, so their gradients come back in
    # their own dtype through autograd's cast.
    return t if t is None or t.dtype == dtype else t.to(dtype)


# cuBLAS writes the float32 product of 16-bit operands itself (mm / addmm with out_dtype, CUDA
# only; the device's torch 2.11 has them): the gradient of a float32 adapter master beside a 16-bit layer then
# takes one launch, not a product and a cast of it; a small layer's step is bound by its launches.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


def product_in(dtype: Optional[torch.dtype], a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0,
               shape_like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * (a @ b) in ``dtype`` (None: a's dtype); a and b 2-D of one dtype. ``shape_like``, a
    tensor of the product's shape in a's dtype, is needed where alpha != 1: addmm's input, whose
    values beta = 0 never reads (alpha applied inside the GEMM, not by a launch of its own)."""
    if alpha != 1.0 and shape_like is None:
        raise ValueError("product_in: alpha != 1 needs shape_like, a tensor of the product's shape")
    direct = dtype is None or dtype == a.dtype
    if not direct and not (_MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32
                           and a.dtype in (torch.float16, torch.bfloat16)):
        return product_in(None, a, b, alpha, shape_like).to(dtype)
    out = {} if direct else {"out_dtype": dtype}
    if alpha == 1.0:
        return torch.mm(a, b, **out)
    return torch.addmm(shape_like, a, b, beta=0, alpha=alpha, **out)


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """(*, K) -> (M, K) without a copy when the layout allows it (K = 0 included, where -1 would
    be ambiguous)."""
    if x.dim() == 2:
        return x
    K = x.shape[-1]
    return x.reshape(-1, K) if K else x.reshape(x.shape[:-1].numel(), 0)


def sum_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Column sums (gradients of bias / per-channel scales) accumulated in float32 at least.
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(0, dtype=acc).to(dtype)


def apply_linear(fn, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *rest) -> torch.Tensor:
    """fn(x as (M, K), weight, bias, *rest) -> (M, N), returned in x's leading shape: the inputs in
    the compute dtype (``compute_dtype``) and autocast off inside fn. Without autocast (the
    common call, whose inputs share a dtype: the checks saw to it) nothing is cast or entered."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y = fn(flatten_rows(cast(x, dtype)), cast(weight, dtype), cast(bias, dtype), *rest)
    else:
        y = fn(flatten_rows(x), weight, bias, *rest)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# Custom ops return tensors, never None: the backward ops of every method stand for a gradient
# that is not needed by an empty tensor, and turn it back into None for autograd.
def grads_to_tensors(grads, like: torch.Tensor) -> tuple:
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def fake_grads(like: torch.Tensor, shapes, needs) -> tuple:
    """register_fake of a backward op: each needed gradient with its input's shape."""
    return tuple(like.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def grads_from_tensors(grads, needs) -> list:
    return [g if need else None for g, need in zip(grads, needs)]
