"""DoRA linear (weight-decomposed LoRA, peft's ``use_dora=True``): LoRA whose merged weight
W' = W + s B A gets each output row rescaled to a learned length m,

    y = (m / n) * (x W^T + s (x A^T) B^T) + b,        n = ||W + s B A||_row  (detached, as peft)

and with dropout in training, peft's formula (drop(x) = x * mask / (1 - p)):

    y = x W^T + b + (m/n - 1) * (drop(x) W^T) + (m/n) * s (drop(x) A^T) B^T

which needs a second GEMM with W (on drop(x)) in the forward and in the backward: about 1.5x the
GEMM work of a LoRA layer's step, inherent to peft's definition.

The row norms never form W' (N x K): ||W_row||^2 is fixed while W is (the caller caches it,
``weight_sq_norm``), and the rest is O(N r (K + r)):

    n^2 = ||W||^2_row + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)

Backward, with c = m / n and z = drop(x) W^T + s (drop(x) A^T) B^T (at p = 0: x W^T + LoRA term):

    grad_x = grad_y W + mask/(1-p) * (((c - 1) grad_y) W + s ((c grad_y) B) A)   (p = 0: (c grad_y) W + s ((c grad_y) B) A)
    grad_A = s ((c grad_y) B)^T drop(x),   grad_B = s (c grad_y)^T (drop(x) A^T)
    grad_m = sum_rows(grad_y * z) / n,     grad_b = sum_rows(grad_y)

grad_m needs z (M x N), found by the backward in one of three ways (``z_source``, from
``settings.output_scale_grad``; IA3's output scaling follows the same setting for the same reduction):

- Z_FROM_OUTPUT ("output", the default, at p = 0): from the layer's output y = c z + b itself,
  sum_rows(grad_y * z) / n = (sum_rows(grad_y * y) - b sum_rows(grad_y)) / m. The layer keeps
  nothing of size M x N beyond y, which its caller holds through the backward wherever the next op
  saves its input (v's attention, gate's activation, up's product, a loss) and which is freed at
  the backward otherwise: DoRA then holds what LoRA holds. The Function keeps y as an alias, not
  through save_for_backward: where the caller edited y in place by the backward (its version
  moved), z is recomputed (as Z_RECOMPUTED) instead of autograd raising. A column with m = 0 has
  c = 0 and keeps no z in y: its grad_m comes out non-finite (peft's own forward is NaN wherever
  a zero magnitude meets a zero norm, as at a zero row of W). With dropout y is not c z + b, and
  with a bias y - b loses z's low bits to cancellation where |b| >> |c z| in bf16: the op saves z
  there instead.
- Z_SAVED ("save"): z (M x N) written by the forward and saved.
- Z_RECOMPUTED ("recompute"): z formed again in the backward (one more 2MNK GEMM), from the saved
  s drop(x) A^T (M x r).

Shapes: x (*, K), W (N, K), b (N,), A (r, K), B (N, r), m (N,).
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional, Union

import torch

from .. import backends, tuning
from ..settings import settings
from . import _autograd, _common
from . import lora as lora_op
from .lora import _keep_mask, _masked, _torch_dropout_mask

OP = "dora_linear"
# Where the backward finds z for grad_m (the module docstring): the op's ``z_source`` parameter.
Z_RECOMPUTED, Z_SAVED, Z_FROM_OUTPUT = 0, 1, 2
_Z_SOURCES = {"output": Z_FROM_OUTPUT, "save": Z_SAVED, "recompute": Z_RECOMPUTED}  # by output_scale_grad


# ----------------------------------------------------------------------------- the norm
def weight_row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_row||^2 (N,) in float32 (float64 for float64): the part of DoRA's norm that is fixed
    while W is, so callers compute it once per weight."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(weight, dim=1, dtype=dt).square()


@torch.no_grad()
def dora_weight_norm(weight, lora_A, lora_B, scaling: float,
                     weight_sq_norm: Union[torch.Tensor, Callable[[], torch.Tensor], None] = None):
    """||W + s B A||_row (N,) without forming W + s B A, in float32 (float64 for float64), detached.
    W A^T runs in W's dtype (accumulated in float32), the r x r and N x r products in float32.
    weight_sq_norm: ||W_row||^2 if the caller keeps it, as a tensor or a function returning it
    (called only where the composition below needs it).

    Where the Triton kernels run (CUDA, or the interpreter with the triton backend named), one
    kernel does it all, ||W||^2 included (weight_sq_norm is then not read), except under
    torch.compile, which traces the composition. Elsewhere,
    n^2 = ||W||^2 + rowsum(B * P) with P = 2 s (W A^T) + s^2 B (A A^T): the cross term and the last
    one share their row sum, P comes from one addmm, and ||W||^2 + rowsum(B * P) from one baddbmm
    (a dot product per row), so the whole norm is seven launches beside float32 masters (a small
    layer's training step pays them on every forward): A's cast, W A^T (in float32 straight from
    cuBLAS, product_in), A A^T, P, the dots, the clamp and the square root."""
    # Under torch.compile the composition is traced (Inductor fuses it); the kernel is for eager calls.
    kernels = None if torch.compiler.is_compiling() else backends.helper_impl(OP, "triton", weight, lora_A)
    if kernels is not None:  # one launch, W read once (||W||^2 with it): triton_kernels.dora.weight_norm
        return kernels.weight_norm(weight, lora_A, lora_B, scaling)
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if weight_sq_norm is None:
        weight_sq_norm = weight_row_sq_norm(weight)
    elif callable(weight_sq_norm):
        weight_sq_norm = weight_sq_norm()
    A, B = lora_A.to(dt), lora_B.to(dt)
    cross = _common.product_in(dt, weight, lora_A.to(weight.dtype).T)  # W A^T (N x r)
    P = torch.addmm(cross, B, A @ A.T, beta=2.0 * scaling, alpha=scaling * scaling)
    n_sq = torch.baddbmm(weight_sq_norm.to(dt).reshape(-1, 1, 1), B.unsqueeze(1), P.unsqueeze(2))
    return n_sq.view(-1).clamp_min_(0).sqrt_()


# ----------------------------------------------------------------------------- reference
def dora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_mask=None, dropout_p=0.0):
    """peft's formula, written plainly (W + s B A formed); tests run it in float64.
    ``dropout_mask`` (x's shape, 0/1) and ``dropout_p`` give drop(x) = x * mask / (1 - p)."""
    norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    c = magnitude / norm
    x_d = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    base = x @ weight.T
    y = base + (c - 1) * (x_d @ weight.T) + c * scaling * ((x_d @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- torch backend
# The composition takes its keep-mask from keep_mask(seed, shape, p, device) -> bool tensor, or
# None at p = 0: the torch generator's here (any device; a CUDA seed is read on the host), the
# LoRA kernels' philox mask in the ``cublas`` backend (fusedpeft/backends/triton.py), which reads
# the seed on the GPU: no host sync, and a captured CUDA graph draws new masks at each replay.
def _parts(keep_mask, x, weight, lora_A, lora_B, scaling, dropout_p, seed):
    """(t, u_s) with t = drop(x) W^T and u_s = s drop(x) A^T (t is x W^T at p = 0)."""
    if dropout_p == 0.0:
        return torch.mm(x, weight.T), torch.mm(x, lora_A.T).mul_(scaling)
    x_d = _masked(x, keep_mask(seed, x.shape, dropout_p, x.device))  # x * mask; the 1 / (1 - p) goes into the scalars
    keep = 1.0 / (1.0 - dropout_p)
    return torch.mm(x_d, weight.T).mul_(keep), torch.mm(x_d, lora_A.T).mul_(scaling * keep)


def output_scale_minus_one(magnitude, norm, dtype):
    """c - 1 = m / n - 1 in the compute dtype. A trained m sits within a few 1e-4 of n, where bf16
    (spaced 2^-7 at 1) would round c itself to 1 and drop the magnitude's training steps; c - 1
    keeps them, so every product with c is written t c = t + t (c - 1)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (magnitude.to(acc) / norm.to(acc) - 1.0).to(dtype)


def adapter_delta(t, lora, c_minus_1):
    """(z, delta): z = t + lora and delta = c z - t = lora + (c - 1) z, the adapter's whole change
    of the output, formed on its own so that it meets the base's x W^T in one rounding (y = base +
    delta), as peft's float32 delta meets its bf16 base. Rounded piecewise (round(t + lora), then
    c times that) a trained delta, mostly under half a bf16 step of t, is lost: on a one-layer
    Llama-3-8B-shaped model after two AdamW steps at lr 2e-4, the loss fell 0.14 where float64 says 0.23."""
    z = t + lora
    return z, torch.addcmul(lora, z, c_minus_1)


def _composition_forward(keep_mask, x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed,
                         z_source):
    t, u_s = _parts(keep_mask, x, weight, lora_A, lora_B, scaling, dropout_p, seed)
    z, delta = adapter_delta(t, torch.mm(u_s, lora_B.T), output_scale_minus_one(magnitude, norm, x.dtype))
    # p = 0: y = x W^T + delta (t is x W^T). p > 0: y = x W^T + (c - 1) t + c s u B^T, the same delta on drop(x)'s t.
    y = (t if dropout_p == 0.0 else torch.mm(x, weight.T)).add_(delta)
    if bias is not None:
        y.add_(bias)
    return y, saved_for_grad_m(z_source, y, z, u_s)


def saved_for_grad_m(z_source, y, z, u_s):
    """What the forward keeps for the backward (the module docstring): (y itself, u_s), z, or u_s =
    s drop(x) A^T (M x r)."""
    return (y, u_s) if z_source == Z_FROM_OUTPUT else z if z_source == Z_SAVED else u_s


def unpack_saved(z_source, saved):
    """(y, z, u_s) from what saved_for_grad_m kept, None for each piece not kept (y also where the
    Function found it edited in place)."""
    if z_source == Z_FROM_OUTPUT:
        return saved[0], None, saved[1]
    return (None, saved, None) if z_source == Z_SAVED else (None, None, saved)


def grad_m_from_output(grad_y, y, bias, magnitude, col_g=None, dot=None):
    """sum_rows(grad_y * z) / n in float32 (float64 for float64) from the output y = c z + b, c = m / n:
    (sum_rows(grad_y * y) - b sum_rows(grad_y)) / m. dot: sum_rows(grad_y * y), and col_g:
    sum_rows(grad_y), where the caller has them (then grad_y and y are not read)."""
    if dot is None:
        acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        dot = (grad_y.to(acc) * y.to(acc)).sum(0)
    if bias is not None:
        dot = dot - bias.to(dot.dtype) * (grad_y.sum(0, dtype=dot.dtype) if col_g is None else col_g.to(dot.dtype))
    return dot / magnitude.to(dot.dtype)


def _composition_backward(keep_mask, grad_y, x, weight, bias, lora_A, lora_B, magnitude, saved, scaling, norm,
                          dropout_p, seed, z_source, needs, grad_dtypes=(None, None, None)):
    # grad_dtypes: the dtypes the caller casts grad_A, grad_B and grad_m to afterwards; grad_m, a
    # float32 column sum, is rounded to its own once, the products written in theirs by cuBLAS.
    need_x, need_w, need_b, need_A, need_B, need_m = needs
    dtype = grad_y.dtype
    c_minus_1 = output_scale_minus_one(magnitude, norm, dtype)
    g_c = torch.addcmul(grad_y, grad_y, c_minus_1)  # c grad_y
    keep_scale = 1.0 / (1.0 - dropout_p)
    mask = keep_mask(seed, x.shape, dropout_p, x.device)  # drawn once for drop(x) and grad_x
    x_d = x if mask is None else _masked(x, mask) * keep_scale  # drop(x)
    output, z, u_s = unpack_saved(z_source, saved)
    if u_s is None:
        u_s = torch.mm(x_d, lora_A.T).mul_(scaling)
    if need_m and z is None and output is None:  # formed again where neither z nor the output is at hand
        z = torch.addmm(torch.mm(x_d, weight.T), u_s, lora_B.T)
    g_B = torch.mm(g_c, lora_B).mul_(scaling)  # s (c grad_y) B, (M, r): the scaling on M x r values, not M x K
    grad_x = grad_w = grad_b = grad_A = grad_B = grad_m = None
    if need_x:  # each M x K product accumulated in place: one M x K buffer, not three
        if dropout_p == 0.0:
            grad_x = torch.mm(g_c, weight).addmm_(g_B, lora_A)
        else:
            inner = _masked(torch.mm(grad_y * c_minus_1, weight).addmm_(g_B, lora_A), mask)
            grad_x = torch.mm(grad_y, weight).add_(inner, alpha=keep_scale)
    if need_w:  # only when the user unfroze the base weight (the norm stays detached, as peft's)
        grad_w = grad_y.T @ x + ((grad_y * c_minus_1).T @ x_d)
    if need_b:
        grad_b = _common.sum_rows(grad_y, dtype)
    if need_A:  # in the masters' dtypes from the GEMMs themselves where cuBLAS can (product_in)
        grad_A = _common.product_in(grad_dtypes[0], g_B.T, x_d)
    if need_B:
        grad_B = _common.product_in(grad_dtypes[1], g_c.T, u_s)
    if need_m and z is None:
        grad_m = grad_m_from_output(grad_y, output, bias, magnitude).to(grad_dtypes[2] or dtype)
    elif need_m:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad_m = ((grad_y.to(acc) * z.to(acc)).sum(0) / norm.to(acc)).to(grad_dtypes[2] or dtype)
    return grad_x, grad_w, grad_b, grad_A, grad_B, grad_m


def composition(keep_mask, dropout_mask) -> types.SimpleNamespace:
    """DoRA as torch calls (peft's arithmetic without forming W + s B A; cuBLAS GEMMs on CUDA) with
    the masks of ``keep_mask`` (see above); ``dropout_mask`` gives the same mask as 0/1 float32."""
    return types.SimpleNamespace(forward=functools.partial(_composition_forward, keep_mask),
                                 backward=functools.partial(_composition_backward, keep_mask),
                                 dropout_mask=dropout_mask, recomputes_z_whole=True)


torch_backend = composition(_keep_mask, _torch_dropout_mask)


def _autograd_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source):
    """The composition at p = 0 as differentiable torch ops, for autograd to differentiate (the
    op's composable entry; ``cublas_autograd`` on CUDA): the adapters cast to x's dtype as autograd
    nodes (float32 masters get float32 gradients). c goes into B (N x r, c s B in float32, then
    x's dtype), so the rank-r GEMM gives c s (x A^T) B^T, and the delta c lora + (c - 1) x W^T
    takes one addcmul: two passes over M x N besides the GEMMs, as z c took. Autograd keeps x W^T
    (M x N) for grad_m, as the Function's "save" mode keeps z (``_composes``)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = magnitude.to(acc) / norm.to(acc)
    t = x @ weight.T
    lora_c = (x @ lora_A.to(x.dtype).T) @ (lora_B.to(acc) * (scaling * c)[:, None]).to(x.dtype).T
    delta = torch.addcmul(lora_c, t, (c - 1.0).to(x.dtype))  # see adapter_delta: one rounding onto x W^T
    return t + delta if bias is None else torch.add(t, delta).add_(bias)


def _composes(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source) -> bool:
    """Without dropout (with it, autograd would keep the mask), and where keeping z is what the
    Function would do (or m takes no gradient: then nothing of size M x N is kept)."""
    return dropout_p == 0.0 and (z_source == Z_SAVED or not magnitude.requires_grad)


def composed(impl) -> types.SimpleNamespace:
    """``impl`` (a composition's forward and backward: what a forced choice and the custom ops run)
    with the autograd composition beside it, a tuning candidate only where it composes."""
    return types.SimpleNamespace(forward=impl.forward, backward=impl.backward, dropout_mask=impl.dropout_mask,
                                 autograd_forward=_autograd_forward, composes=_composes, composed_only=True)

# The op's reference: registered here, first (registration index 0). On CUDA the same composition
# with the LoRA kernels' masks competes with the Triton backend (``cublas``, backends/triton.py).
backends.register(OP, "torch", load=lambda: torch_backend, supports=lambda x, weight, forced=False: None, priority=0)


# ----------------------------------------------------------------------------- dispatch
def _tune(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source, needs, through=None):
    M, K = x.shape
    key = (tuning.rows_class(M), K, weight.shape[0], lora_A.shape[0], x.dtype, bias is not None, dropout_p > 0,
           z_source, tuple(needs), x.stride(1) == 1, weight.stride(1) == 1, "entry" if through is not None else "bare")

    def bench(impl):  # built into a step only when the key is measured, as lora's (through: see there)
        if z_source == Z_RECOMPUTED and needs[5] and dropout_p == 0.0 and getattr(impl, "recomputes_z_whole", False):
            return tuning.LAST_RESORT  # "recompute" keeps z out of memory where the Triton kernel can
        return tuning.composable_bench(impl, through, tuning.step_bench(
            lambda impl: impl.forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed,
                                      z_source),
            lambda impl, grad, saved: impl.backward(grad, x, weight, bias, lora_A, lora_B, magnitude, saved, scaling,
                                                    norm, dropout_p, seed, z_source, needs),
            (M, weight.shape[0]), x, any(needs)))

    return key, bench


def _select(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source, needs, index=-1,
            record=True, through=None):
    tune = (_tune(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source, needs, through)
            if tuning.measures(x) and index < 0 else None)
    return backends.select_index(OP, x, weight, tune=tune, index=index, record=record)


def _forward_impl(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source,
                  needs=(False,) * 6, index=-1):
    index, impl = _select(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source, needs,
                          index)
    y, saved = impl.forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source)
    return y, saved, index


def _backward_impl(grad_y, x, weight, bias, lora_A, lora_B, magnitude, saved, index, scaling, norm, dropout_p, seed,
                   z_source, needs, grad_dtypes=(None, None, None)):
    impl = backends.impl_at(OP, index)
    return impl.backward(grad_y.contiguous(), x, weight, bias, lora_A, lora_B, magnitude, saved, scaling, norm,
                         dropout_p, seed, z_source, tuple(needs), grad_dtypes)


def _saved_shape(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source):
    return (x.shape[0], lora_A.shape[0]) if z_source == Z_RECOMPUTED else (x.shape[0], weight.shape[0])


# The eager autograd Function and the custom ops (ops/_autograd.py). They save x, the frozen weight,
# A, B (in x's dtype), m (in its own) and z (M x N, Z_SAVED) or s drop(x) A^T (M x r, Z_RECOMPUTED);
# with Z_FROM_OUTPUT the Function keeps its output (the custom ops, whose outputs may not alias, are
# given Z_SAVED instead).
_OP = _autograd.autograd_op(
    "dora_linear", adapters="Tensor lora_A, Tensor lora_B, Tensor magnitude",
    params="float scaling, Tensor norm, float dropout_p, Tensor? seed, int z_source",
    forward=_forward_impl, backward=_backward_impl, select=_select, saved_shape=_saved_shape, composable=True,
    kept_dtype=("magnitude",))


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_norm: Optional[torch.Tensor] = None,
    weight_sq_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA over any leading shape of x (see the module docstring). magnitude: (out_features,).
    weight_norm: ||W + s B A||_row if the caller has it (a layer in eval caches it), else it is
    computed here, from weight_sq_norm = ||W_row||^2 when given (fixed while W is). Dropout
    applies only when ``training``. Adapter tensors in another float dtype are cast to the
    compute dtype, as lora_linear's."""
    _common.check_lora_inputs(OP, x, weight, bias, lora_A, lora_B, dropout_p)
    n = weight.shape[0]
    _common.check_adapter_tensor(OP, "magnitude", magnitude, (n,), weight)
    if weight_norm is None:
        weight_norm = dora_weight_norm(_common.cast(weight, _common.compute_dtype(x, weight)), lora_A, lora_B,
                                       scaling, weight_sq_norm)
    elif tuple(weight_norm.shape) != (n,):
        raise ValueError(f"{OP}: weight_norm must have shape ({n},), got {tuple(weight_norm.shape)}")
    p = float(dropout_p) if training else 0.0
    seed = lora_op._new_seed(x.device) if p > 0.0 else None  # LoRA's seed source: one generator draw
    # (checked above: the norm needs valid inputs before the op's plan is looked up)
    return _OP.call(OP, x, weight, bias, lora_A, lora_B, magnitude, float(scaling), weight_norm.detach(), p, seed,
                    z_source(magnitude, bias, p))


def z_source(magnitude, bias, dropout_p) -> int:
    """Where this call's backward finds z for grad_m (the module docstring), from
    ``settings.output_scale_grad``: the output only without dropout and bias, and never for the
    custom ops of a compiled graph; nothing where m takes no gradient."""
    if not (magnitude.requires_grad and torch.is_grad_enabled()):
        return Z_RECOMPUTED  # no grad_m: the forward keeps only u_s, M x r
    mode = settings.values().output_scale_grad
    if mode == "output" and (dropout_p > 0.0 or bias is not None or torch.compiler.is_compiling()):
        mode = "save"
    return _Z_SOURCES[mode]

