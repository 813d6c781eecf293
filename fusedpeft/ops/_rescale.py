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
  (Reading z back from y itself would keep nothing more, as DoRA's "output" mode does (ops/dora.py:
  the Function keeps y and answers an in-place edit of it by recomputing), but a zero scale leaves
  no z in its column and SSF's shift cancels in bf16: here "output" is "save".)
- input scaling:  h = g W, grad_x = h * scale, grad_scale = sum_rows(h * x), grad_b = sum_rows(g).

The method files (ia3.py, ssf.py) hold their references and public functions; this file holds the
torch backend, the dispatch and the op (autograd Function and custom ops from
``_autograd.autograd_op``) they share. Backends implement
``forward(x, weight, bias, scale, shift, input_scale, save_unscaled) -> (y, z or None)`` and
``backward(grad_y, x, weight, bias, scale, shift, input_scale, z, needs, grad_dtypes) -> 5 grads`` on 2-D
x (grad_scale and grad_shift in grad_dtypes where given: the scale's own dtype), and
register from ``fusedpeft/backends/``.
"""
from __future__ import annotations

import types

import torch

from .. import backends, tuning
from ..settings import settings
from . import _autograd, _common


def output_grad_mode() -> str:
    """'save' or 'recompute' (see the module docstring): ``settings.output_scale_grad``
    (FUSEDPEFT_OUTPUT_SCALE_GRAD), whose "output" (DoRA's z read back from its output) is "save" here."""
    mode = settings.values().output_scale_grad  # values(): dynamo traces it (see backends._forced)
    return "save" if mode == "output" else mode


# ----------------------------------------------------------------------------- torch backend
def _linear(x, weight, bias):
    return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T


def _torch_forward(x, weight, bias, scale, shift, input_scale, save_unscaled):
    if input_scale:
        return _linear(x * scale, weight, bias), None
    z = _linear(x, weight, bias)
    y = z * scale if shift is None else torch.addcmul(shift, z, scale)
    return y, (z if save_unscaled else None)


def _torch_backward(grad_y, x, weight, bias, scale, shift, input_scale, z, needs, grad_dtypes=(None, None)):
    # grad_dtypes: the dtypes the caller casts grad_scale and grad_shift to afterwards (float32
    # masters beside a bf16 layer): the float32 column sums are rounded to those directly.
    need_x, need_w, need_b, need_scale, need_shift = needs
    grad_x = grad_w = grad_b = grad_scale = grad_shift = None
    dtype = grad_y.dtype
    scale_dtype, shift_dtype = (d or dtype for d in grad_dtypes)
    if input_scale:
        h = grad_y @ weight  # gradient w.r.t. the scaled input x * scale
        if need_x:
            grad_x = h * scale
        if need_scale:
            grad_scale = _common.sum_rows(h * x, scale_dtype)
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
        grad_scale = _common.sum_rows(grad_y * z, scale_dtype)
    if need_shift:
        grad_shift = _common.sum_rows(grad_y, shift_dtype)
    if need_w:
        grad_w = g_scaled.T @ x
    if need_b:
        grad_b = _common.sum_rows(g_scaled, dtype)
    return grad_x, grad_w, grad_b, grad_scale, grad_shift


def _torch_autograd_forward(x, weight, bias, scale, shift, input_scale, save_unscaled, op):
    """The torch backend as differentiable torch ops, for autograd to differentiate (the op's
    ``composable`` path): peft's arithmetic, the rescaling in the dtype that x and the scale
    promote to (float32 for float32 masters beside a bf16 layer), the result rounded once to x's
    dtype, so the scale's and shift's gradients are float32 sums as the Function's are. It keeps
    what the Function keeps: the unscaled output z for grad_scale ("save" mode), x for input
    scaling (``_torch_composes``)."""
    if input_scale:
        return _linear(_common.cast(x * scale, x.dtype), weight, bias)
    z = _linear(x, weight, bias)
    y = z * scale if shift is None else torch.addcmul(shift, z, scale)
    return _common.cast(y, x.dtype)  # a no-op Tensor.to costs about 2 us on the host


def _torch_composes(x, weight, bias, scale, shift, input_scale, save_unscaled, op) -> bool:
    """In "recompute" mode (z not to be kept) the composition, which would keep z, declines."""
    return input_scale or save_unscaled or not scale.requires_grad


# recomputes_z_whole: in "recompute" mode its backward forms z (M x N) whole, where the Triton
# backend reduces it tile by tile: the tuner then keeps it as a last resort (tuning.LAST_RESORT).
torch_backend = types.SimpleNamespace(forward=_torch_forward, backward=_torch_backward,
                                      autograd_forward=_torch_autograd_forward, composes=_torch_composes,
                                      recomputes_z_whole=True)


def register_reference(op: str):
    """Register the torch backend as ``op``'s reference (registration index 0; the Triton backend
    registers in fusedpeft/backends/triton.py). On CUDA it is tunable: it is the plain composition
    of cuBLAS calls (and peft's own arithmetic), and where it beats the fused kernels at a shape it
    runs there."""
    backends.register(op, "torch", load=lambda: torch_backend, supports=lambda x, w, forced=False: None, priority=0,
                      tunable=True)


# ----------------------------------------------------------------------------- dispatch
# IA3 and SSF share one implementation and one custom-op pair; ``op`` (the method's op name, a
# parameter of the pair) says whose backends and shape keys a call uses.
def _tune(x, weight, bias, scale, shift, input_scale, save_unscaled, needs, through=None):
    """(shape key, bench) for backends.select, as lora's: one candidate's step on these inputs.
    ``through()``, where given (the autograd entry's own call), returns through(impl) -> step:
    the candidate's step as that entry runs it, which the bench then times instead."""
    M, K = x.shape
    N = weight.shape[0]
    # The last field: measured through the eager entry (composition or Function) or bare (the custom
    # ops of torch.compile, which run no composition): each keeps its own winner.
    key = (tuning.rows_class(M), K, N, x.dtype, bias is not None, shift is not None, input_scale, save_unscaled,
           tuple(needs), x.stride(1) == 1, weight.stride(1) == 1, "entry" if through is not None else "bare")

    def bench(impl):  # built into a step only when the key is measured, as lora's
        if not save_unscaled and not input_scale and needs[3] and getattr(impl, "recomputes_z_whole", False):
            return tuning.LAST_RESORT  # "recompute" was asked for to keep z out of memory
        return tuning.composable_bench(impl, through, tuning.step_bench(
            lambda impl: impl.forward(x, weight, bias, scale, shift, input_scale, save_unscaled),
            lambda impl, grad, z: impl.backward(grad, x, weight, bias, scale, shift, input_scale, z, tuple(needs)),
            (M, N), x, any(needs)))

    return key, bench


def _select(x, weight, bias, scale, shift, input_scale, save_unscaled, op, needs, index=-1, record=True, through=None):
    tune = (_tune(x, weight, bias, scale, shift, input_scale, save_unscaled, needs, through)
            if tuning.measures(x) and index < 0 else None)
    return backends.select_index(op, x, weight, tune=tune, index=index, record=record)


def _forward_impl(x, weight, bias, scale, shift, input_scale, save_unscaled, op, needs=(False,) * 5, index=-1):
    index, impl = _select(x, weight, bias, scale, shift, input_scale, save_unscaled, op, needs, index)
    y, z = impl.forward(x, weight, bias, scale, shift, input_scale, save_unscaled)
    return y, z, index


def _backward_impl(grad_y, x, weight, bias, scale, shift, z, index, input_scale, save_unscaled, op, needs,
                   grad_dtypes=(None, None)):
    impl = backends.impl_at(op, index)
    return impl.backward(grad_y.contiguous(), x, weight, bias, scale, shift, input_scale, z, tuple(needs),
                         grad_dtypes)


def _saved_shape(x, weight, bias, scale, shift, input_scale, save_unscaled, op):
    return (x.shape[0], weight.shape[0]) if save_unscaled and not input_scale else (0,)


def _check(x, weight, bias, scale, shift, input_scale, save_unscaled, op):
    """The op's checks (``_autograd.autograd_op``): the linear inputs, the scale (K,) for input
    scaling or (N,), the shift (N,), named as the method names them (ia3_scale, ssf_shift)."""
    _common.check_linear_inputs(op, x, weight, bias)
    method = op.split("_")[0]
    N, K = weight.shape
    _common.check_adapter_tensor(op, f"{method}_scale", scale, (K if input_scale else N,), weight)
    if shift is not None:
        _common.check_adapter_tensor(op, f"{method}_shift", shift, (N,), weight)


# The eager autograd Function and the custom ops for torch.compile (ops/_autograd.py). They save x,
# the frozen weight, bias, scale, shift (in x's dtype), and z in "save" mode.
_OP = _autograd.autograd_op(
    "rescaled_linear", adapters="Tensor scale, Tensor? shift", params="bool input_scale, bool save_unscaled, str op",
    forward=_forward_impl, backward=_backward_impl, select=_select, saved_shape=_saved_shape, composable=True,
    check=_check)
_rescaled_fwd = _OP.forward_op


def rescaled_linear(op: str, x, weight, bias, scale, shift, input_scale: bool) -> torch.Tensor:
    """The entry point of ia3_linear / ssf_linear, ``scale`` already 1-D; the op checks the call."""
    # The scale and shift keep their dtype here: the autograd Function casts them.
    # z is needed only when grad_scale will be asked for.
    save = not input_scale and scale.requires_grad and torch.is_grad_enabled() and output_grad_mode() == "save"
    return _OP.call(op, x, weight, bias, scale, shift, bool(input_scale), save, op)
