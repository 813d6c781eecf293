"""What IA3 and SSF share: a frozen linear layer with a learned per-channel rescaling, as one op.

    output scaling (IA3, SSF):   z = x W^T + b,   y = z * scale (+ shift)     scale, shift: (N,)
    input scaling (IA3 feedforward):              y = (x * scale) W^T + b     scale: (K,)

Backward, with g = grad_y:
- output scaling: grad_x = (g * scale) W, grad_scale = sum_rows(g * z), grad_shift = sum_rows(g),
  grad_b = sum_rows(g * scale). grad_scale needs the unscaled output z (M x N). Two ways, picked
  per call by ``output_grad_mode()`` (benchmarks/RESULTS.md has the measurements):
    "save":      the forward also writes z and saves it: + M*N activations, no extra FLOPs;
    "recompute": the backward recomputes z = x W^T + b (one more 2MNK GEMM) and reduces g * z in
                 that GEMM's epilogue: no memory beyond x, +50% of the layer's training FLOPs.
  (Saving y itself and dividing by scale would cost nothing, but loses z wherever scale is zero
  and breaks on in-place edits of y: not done.)
- input scaling:  h = g W, grad_x = h * scale, grad_scale = sum_rows(h * x), grad_b = sum_rows(g).

The method files (ia3.py, ssf.py) hold their references and public functions; this file holds the
torch backend, the autograd Function / custom ops and the dispatch they share. Backends implement
``forward(x, weight, bias, scale, shift, input_scale, save_unscaled) -> (y, z or None)`` and
``backward(grad_y, x, weight, bias, scale, shift, input_scale, z, needs) -> 5 grads`` on 2-D x.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from .. import backends, tuning
from ..settings import settings
from . import _common

def output_grad_mode() -> str:
    """'save' or 'recompute' (see the module docstring): ``settings.output_scale_grad``
    (FUSEDPEFT_OUTPUT_SCALE_GRAD)."""
    return settings.output_scale_grad


# ----------------------------------------------------------------------------- torch backend
def _linear(x, weight, bias):
    return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T


def _torch_forward(x, weight, bias, scale, shift, input_scale, save_unscaled):
    if input_scale:
        return _linear(x * scale, weight, bias), None
    z = _linear(x, weight, bias)
    y = z * scale if shift is None else torch.addcmul(shift, z, scale)
    return y, (z if save_unscaled else None)


def _torch_backward(grad_y, x, weight, bias, scale, shift, input_scale, z, needs):
    need_x, need_w, need_b, need_scale, need_shift = needs
    grad_x = grad_w = grad_b = grad_scale = grad_shift = None
    dtype = grad_y.dtype
    if input_scale:
        h = grad_y @ weight  # gradient w.r.t. the scaled input x * scale
        if need_x:
            grad_x = h * scale
        if need_scale:
            grad_scale = _common.sum_rows(h * x, dtype)
        if need_w:
            grad_w = grad_y.T @ (x * scale)
        if need_b:
            grad_b = _common.sum_rows(grad_y, dtype)
        return grad_x, grad_w, grad_b, grad_scale, grad_shift
    g_scaled = grad_y * scale
    if need_x:
        grad_x = g_scaled @ weight
    if need_scale:
        if z is None:
            z = _linear(x, weight, bias)
        grad_scale = _common.sum_rows(grad_y * z, dtype)
    if need_shift:
        grad_shift = _common.sum_rows(grad_y, dtype)
    if need_w:
        grad_w = g_scaled.T @ x
    if need_b:
        grad_b = _common.sum_rows(g_scaled, dtype)
    return grad_x, grad_w, grad_b, grad_scale, grad_shift


torch_backend = types.SimpleNamespace(forward=_torch_forward, backward=_torch_backward)


def _load_triton():
    from .._kernels import triton_kernels

    return triton_kernels.rescale


def _triton_supports(x, weight, forced=False):
    from .._kernels import triton_usable

    return triton_usable(x, weight, forced)


def register_backends(op: str):
    """Both methods run on the same implementations, registered in the same order. On CUDA both
    are tunable: the torch backend is the plain composition of cuBLAS calls (and peft's own
    arithmetic), and where it beats the fused kernels at a shape it runs there."""
    backends.register(op, "torch", load=lambda: torch_backend, supports=lambda x, w, forced=False: None, priority=0,
                      tunable=True)
    backends.register(op, "triton", load=_load_triton, supports=_triton_supports, priority=10, tunable=True)


# ----------------------------------------------------------------------------- autograd
# As for LoRA: an autograd.Function in eager mode, two custom ops tied by register_autograd under
# torch.compile. The backward runs the forward's backend, found by its registration index.
def _tune(x, weight, bias, scale, shift, input_scale, save_unscaled, needs):
    """(shape key, bench) for backends.select, as lora's: one candidate's step on these inputs."""
    M, K = x.shape
    N = weight.shape[0]
    key = (tuning.rows_class(M), K, N, x.dtype, bias is not None, shift is not None, input_scale, save_unscaled,
           tuple(needs), x.stride(1) == 1, weight.stride(1) == 1)
    bench = tuning.step_bench(
        lambda impl: impl.forward(x, weight, bias, scale, shift, input_scale, save_unscaled),
        lambda impl, grad, z: impl.backward(grad, x, weight, bias, scale, shift, input_scale, z, tuple(needs)),
        (M, N), x, any(needs))
    return key, bench


def _select(op, x, weight, bias, scale, shift, input_scale, save_unscaled, needs, index=-1, record=True):
    tune = (_tune(x, weight, bias, scale, shift, input_scale, save_unscaled, needs) if x.is_cuda and index < 0
            else None)
    return backends.select_index(op, x, weight, tune=tune, index=index, record=record)


def _forward_impl(op, x, weight, bias, scale, shift, input_scale, save_unscaled, needs=(False,) * 5, index=-1):
    index, impl = _select(op, x, weight, bias, scale, shift, input_scale, save_unscaled, needs, index)
    y, z = impl.forward(x, weight, bias, scale, shift, input_scale, save_unscaled)
    return y, z, index


def _backward_impl(op, grad_y, x, weight, bias, scale, shift, z, index, input_scale, needs):
    impl = backends.impl_at(op, index)
    return impl.backward(grad_y.contiguous(), x, weight, bias, scale, shift, input_scale, z, tuple(needs))


def _needs(ctx, has_bias, has_shift):
    need_x, need_w, need_b, need_scale, need_shift = ctx.needs_input_grad[:5]
    return [need_x, need_w, need_b and has_bias, need_scale, need_shift and has_shift]


class RescaledLinearFunction(torch.autograd.Function):
    """Eager path: saves x, the frozen weight, bias, scale, shift (in x's dtype), and z in "save"
    mode. The scale and shift are cast to x's dtype here and their gradients back to their own
    (float32 masters beside a bf16 base), with no autograd node for the casts, as in LoRA's."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, input_scale: bool, save_unscaled: bool, op: str):
        ctx.adapter_dtypes = (scale.dtype, None if shift is None else shift.dtype)
        scale, shift = _common.cast(scale, x.dtype), _common.cast(shift, x.dtype)
        y, z, index = _forward_impl(op, x, weight, bias, scale, shift, input_scale, save_unscaled,
                                    _needs(ctx, bias is not None, shift is not None))
        ctx.save_for_backward(x, weight, bias, scale, shift, z)
        ctx.op, ctx.index, ctx.input_scale = op, index, input_scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, scale, shift, z = ctx.saved_tensors
        needs = _needs(ctx, bias is not None, shift is not None)
        grad_x, grad_w, grad_b, grad_scale, grad_shift = _backward_impl(
            ctx.op, grad_y, x, weight, bias, scale, shift, z, ctx.index, ctx.input_scale, needs)
        dtype_scale, dtype_shift = ctx.adapter_dtypes
        return (grad_x, grad_w, grad_b, _common.cast(grad_scale, dtype_scale), _common.cast(grad_shift, dtype_shift),
                None, None, None)


# As for LoRA: under torch.compile the backend travels as an int (backends.forced_index, -1: chosen
# per call by the shape key, which the backward looks up again). Shape keys first met inside a
# custom op are tuned as training.
def _train_needs(bias, shift):
    return (True, False, bias is not None, True, shift is not None)


@torch.library.custom_op("fusedpeft::rescaled_linear_fwd", mutates_args=())
def _rescaled_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
    shift: Optional[torch.Tensor], input_scale: bool, save_unscaled: bool, op: str, backend: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, z, _ = _forward_impl(op, x, weight, bias, scale, shift, input_scale, save_unscaled,
                            _train_needs(bias, shift), backend)
    # Custom ops return tensors: an empty z stands for "not saved".
    return y, (z if z is not None else x.new_empty(0))


@_rescaled_fwd.register_fake
def _(x, weight, bias, scale, shift, input_scale, save_unscaled, op, backend):
    M, N = x.shape[0], weight.shape[0]
    z = x.new_empty(M, N) if save_unscaled and not input_scale else x.new_empty(0)
    return x.new_empty(M, N), z


@torch.library.custom_op("fusedpeft::rescaled_linear_bwd", mutates_args=())
def _rescaled_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    scale: torch.Tensor, shift: Optional[torch.Tensor], z: torch.Tensor, backend: int,
    input_scale: bool, save_unscaled: bool, op: str, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend < 0:
        backend, _ = _select(op, x, weight, bias, scale, shift, input_scale, save_unscaled,
                             _train_needs(bias, shift), record=False)
    grads = _backward_impl(op, grad_y, x, weight, bias, scale, shift, z if z.dim() == 2 else None,
                           backend, input_scale, needs)
    return _common.grads_to_tensors(grads, x)


@_rescaled_bwd.register_fake
def _(grad_y, x, weight, bias, scale, shift, z, backend, input_scale, save_unscaled, op, needs):
    return _common.fake_grads(x, (x.shape, weight.shape, weight.shape[:1], scale.shape, scale.shape), needs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, input_scale, save_unscaled, op, backend = inputs
    _, z = output
    ctx.save_for_backward(x, weight, bias, scale, shift, z)
    ctx.input_scale, ctx.save_unscaled, ctx.op, ctx.backend = input_scale, save_unscaled, op, backend
    ctx.mark_non_differentiable(z)


def _op_backward(ctx, grad_y, grad_z):
    x, weight, bias, scale, shift, z = ctx.saved_tensors
    needs = _needs(ctx, bias is not None, shift is not None)
    grads = _rescaled_bwd(grad_y, x, weight, bias, scale, shift, z, ctx.backend, ctx.input_scale,
                          ctx.save_unscaled, ctx.op, needs)
    return (*_common.grads_from_tensors(grads, needs), None, None, None, None)


_rescaled_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def _apply(x2, weight, bias, scale, shift, input_scale, save_unscaled, op):
    compiling = torch.compiler.is_compiling()
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias, scale, shift))
    if compiling or not training:  # the autograd Function casts them itself
        scale, shift = _common.cast(scale, x2.dtype), _common.cast(shift, x2.dtype)
    if compiling:
        return _rescaled_fwd(x2, weight, bias, scale, shift, input_scale, save_unscaled, op,
                             backends.forced_index(op, x2, weight))[0]
    if not training:
        return _forward_impl(op, x2, weight, bias, scale, shift, input_scale, False)[0]  # inference
    return RescaledLinearFunction.apply(x2, weight, bias, scale, shift, input_scale, save_unscaled, op)


def rescaled_linear(op: str, x, weight, bias, scale, shift, input_scale: bool) -> torch.Tensor:
    """The checked entry point of ia3_linear / ssf_linear: ``scale`` already (K,) or (N,)."""
    dtype = _common.compute_dtype(x, weight)
    # The scale and shift keep their dtype here: _apply casts them (inside the autograd Function).
    x, weight, bias = (_common.cast(t, dtype) for t in (x, weight, bias))
    # z is needed only when grad_scale will be asked for.
    save = not input_scale and scale.requires_grad and torch.is_grad_enabled() and output_grad_mode() == "save"
    x2 = _common.flatten_rows(x)
    y = _common.outside_autocast(x.device.type, _apply, x2, weight, bias, scale, shift, bool(input_scale), save, op)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
