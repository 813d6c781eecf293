"""LoRA linear: y = x W^T + b + scaling * (dropout(x) A^T) B^T.

Shapes: x (*, K), W (N, K), b (N,), A (r, K), B (N, r). This file holds the float reference, the
``torch`` backend (hand-written forward/backward, any device), the backend dispatch and the op,
whose autograd Function and custom ops come from ``_autograd.autograd_op``. Faster backends
implement the same three functions on 2-D inputs and register from ``fusedpeft/backends/``:
``forward(...) -> (y, saved)``, ``backward(..., needs, saved) -> grads`` (``saved`` is the small
tensors the forward chose to keep, here u) and ``dropout_mask(seed, shape, p, device)``.

Dropout is never stored: the forward draws a seed, the mask is a pure function of (seed, shape,
p, device) and the backward regenerates it. The seed is a one-element int64 tensor on x's device
drawn with torch.randint, so it comes from torch's generator (its philox seed and offset on
CUDA): ``torch.manual_seed`` reproduces a run, and a captured CUDA graph draws a new seed, and so
new masks, at every replay. The low-rank activation u = dropout(x) A^T (M x r) is saved: M*r
values, against the M*K*r FLOPs and the pass over x it would cost to recompute.

On CUDA four backends (``fusedpeft/backends/triton.py``) compete per shape (fusedpeft/tuning.py):
``triton`` (the fused GEMM core), ``cublas`` and ``cublas_after`` (cuBLAS GEMMs with the masks
from small Triton kernels, the rank-r term written before or added after the GEMM), and, without
dropout, ``cublas_autograd`` (cublas_after's calls as torch ops, differentiated by autograd with
no Function: the op is composable, ops/_autograd.py). The first call at a shape key times a
training step of each, as the entry runs it, on its own inputs; the fastest runs from then on.
"""
from __future__ import annotations

import math
import types
from typing import Optional

import torch

from .. import backends, tuning
from . import _autograd, _common

OP = "lora_linear"


# ----------------------------------------------------------------------------- reference
def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_mask=None, dropout_p=0.0):
    """The formula, written plainly; tests run it in float64. ``dropout_mask`` (same shape as x,
    0/1) and ``dropout_p`` give dropout(x) = x * mask / (1 - p)."""
    x_lora = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    y = x @ weight.T + scaling * ((x_lora @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- torch backend
def _keep_mask(seed, shape, p: float, device) -> Optional[torch.Tensor]:
    """The bool keep-mask of ``shape`` (keep probability 1 - p, p rounded to a multiple of 2^-16),
    or None at p = 0; a pure function of its arguments, whatever the compute dtype, so forward and
    backward see the same mask. ``seed``: the op's seed tensor or an int (reading a CUDA seed
    tensor waits for the GPU: the torch backend is the reference, not a CUDA path).

    Each element takes 16 bits of a 64-bit draw (random_ over the whole int64 range, viewed as
    int16) and one compare: a quarter of the generator calls of bernoulli_, which drew one float
    per element and cost 3.5x as much on CPU (9.7 against 2.3 ms at 2048 x 896); a training
    step draws the mask twice (forward, then once for both of the backward's uses)."""
    if p == 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=gen)
    bits = words.view(torch.int16)[:numel].view(shape)  # uniform over [-2^15, 2^15)
    return bits >= min(round(p * 65536), 65535) - 32768


def _torch_dropout_mask(seed, shape, p: float, device) -> torch.Tensor:
    """The backend's mask as 0/1 float32 (what tests build the reference from)."""
    keep = _keep_mask(seed, shape, p, device)
    return torch.ones(shape, device=device) if keep is None else keep.to(torch.float32)


def _masked(x, keep: Optional[torch.Tensor]):
    """x * mask, exact in any dtype (keep: a _keep_mask, None for no dropout). The 1 / (1 - p) of
    inverted dropout is folded into the scalar that multiplies the rank-r products instead:
    rounding x / (1 - p) to bf16 element-wise would be amplified by cancellation in x A^T."""
    return x if keep is None else torch.where(keep, x, 0)


def _torch_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    u = _masked(x, _keep_mask(seed, x.shape, dropout_p, x.device)) @ lora_A.T  # (M, r), saved for grad_B
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    return y.addmm_(u, lora_B.T, alpha=scaling / (1.0 - dropout_p)), (u,)


def _torch_backward(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, needs, saved,
                    grad_dtypes=(None, None)):
    # grad_dtypes: the dtypes the caller casts grad_A and grad_B to afterwards (None: lora_A's).
    # A backend that can write them in those directly does (the Triton reductions do); the
    # products here come out in the compute dtype and are cast after.
    need_x, need_w, need_b, need_A, need_B = needs
    (u,) = saved
    s = scaling / (1.0 - dropout_p)
    g_low = grad_y @ lora_B  # (M, r): grad_y through B
    keep = _keep_mask(seed, x.shape, dropout_p, x.device) if need_x or need_A else None
    grad_x = grad_w = grad_b = grad_A = grad_B = None
    if need_x:
        # d dropout(x)/dx = mask / (1 - p): the mask applied to the low-rank gradient.
        grad_x = torch.addmm(_masked(g_low @ lora_A, keep), grad_y, weight, alpha=1.0, beta=s)
    if need_w:
        grad_w = grad_y.T @ x
    if need_b:
        grad_b = _common.sum_rows(grad_y, grad_y.dtype)
    if need_A:
        grad_A = (g_low.T @ _masked(x, keep)) * s
    if need_B:
        grad_B = (grad_y.T @ u) * s
    return grad_x, grad_w, grad_b, grad_A, grad_B


def lora_composition(x, weight, bias, lora_A, lora_B, scaling):
    """x W^T + b + scaling (x A^T) B^T as differentiable torch ops (no dropout), for autograd to
    differentiate: the adapters cast to x's dtype as autograd nodes (float32 masters get float32
    gradients); autograd keeps u = x A^T (M x r) and B for the rank-r term, as the Function keeps
    u_s. The composable path of LoRA's cublas_autograd."""
    # _common.cast: a no-op Tensor.to still costs about 2 us of argument parsing on the host
    u = x @ _common.cast(lora_A, x.dtype).T
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    return y.addmm_(u, _common.cast(lora_B, x.dtype).T, alpha=scaling)


torch_backend = types.SimpleNamespace(
    forward=_torch_forward, backward=_torch_backward, dropout_mask=_torch_dropout_mask
)


# The op's reference: registered here, first (registration index 0). The backends that run on
# Triton register in fusedpeft/backends/triton.py.
backends.register(OP, "torch", load=lambda: torch_backend, supports=lambda x, weight, forced=False: None, priority=0)


# ----------------------------------------------------------------------------- dispatch
def _tune(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, needs, through=None):
    """(shape key, bench) for backends.select: the key holds what decides the fastest path; the
    bench times one candidate's training step (forward only without gradients) on these inputs.
    ``through()``, where given (the autograd entry's own call), returns through(impl) -> step: the
    candidate's step as that entry runs it (the composition or the Function, autograd's backward),
    which the bench times instead; the key's last field keeps those picks apart from the bare ones
    of torch.compile's custom ops."""
    M, K = x.shape
    key = (tuning.rows_class(M), K, weight.shape[0], lora_A.shape[0], x.dtype, bias is not None, dropout_p > 0,
           tuple(needs), x.stride(1) == 1, weight.stride(1) == 1, "entry" if through is not None else "bare")

    def bench(impl):  # one closure per call; the step's pieces are built only when the key is measured
        return tuning.composable_bench(impl, through, tuning.step_bench(
            lambda impl: impl.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed),
            lambda impl, grad, saved: impl.backward(grad, x, weight, lora_A, lora_B, scaling, dropout_p, seed, needs,
                                                    saved),
            (M, weight.shape[0]), x, any(needs)))

    return key, bench


def _select(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, needs, index=-1, record=True, through=None):
    tune = (_tune(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, needs, through)
            if tuning.measures(x) and index < 0 else None)
    return backends.select_index(OP, x, weight, tune=tune, index=index, record=record)


def _forward_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, needs=(False,) * 5, index=-1):
    # The saved low-rank activation u is kept in the layer's dtype, as peft's autograd keeps
    # lora_A's output (the triton backend keeps it pre-scaled: each backend reads back what it saved).
    index, impl = _select(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, needs, index)
    y, (u,) = impl.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return y, (u if u.dtype == x.dtype else u.to(x.dtype)), index


def _backward_impl(grad_y, x, weight, bias, lora_A, lora_B, u, index: int, scaling, dropout_p, seed, needs,
                   grad_dtypes=(None, None)):
    impl = backends.impl_at(OP, index)
    # u stays in its saved dtype: backends read it as they need.
    return impl.backward(grad_y.contiguous(), x, weight, lora_A, lora_B, scaling, dropout_p, seed,
                         tuple(needs), (u,), grad_dtypes)


# The eager autograd Function and the custom ops for torch.compile (ops/_autograd.py). They save
# x, the frozen weight, A, B (in x's dtype) and u (M x r): nothing of size M x N.
_OP = _autograd.autograd_op(
    "lora_linear", adapters="Tensor lora_A, Tensor lora_B", params="float scaling, float dropout_p, Tensor? seed",
    forward=_forward_impl, backward=_backward_impl, select=_select,
    saved_shape=lambda x, weight, bias, lora_A, *_: (x.shape[0], lora_A.shape[0]), composable=True,
    check=lambda x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed: _common.check_lora_inputs(
        OP, x, weight, bias, lora_A, lora_B, dropout_p))
_lora_fwd = _OP.forward_op
_call = _OP.call


def _new_seed(device) -> torch.Tensor:
    """Dropout seed: a one-element int64 tensor on ``device`` from torch's generator (on CUDA its
    philox state, which a CUDA graph advances at every replay). A tensor, so torch.compile keeps
    it in the graph and the kernels read it on the device: no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """x W^T + b + scaling * (dropout(x) A^T) B^T over any leading shape of x.

    weight: (N, K) frozen base; lora_A: (r, K); lora_B: (N, r). Dropout applies to the LoRA
    input only, and only when ``training``. Adapter tensors in another float dtype (float32
    master weights beside a bf16 base) are cast to the compute dtype.
    """
    if not 0.0 <= dropout_p < 1.0:  # (the op's checks see the p in force: 0 outside training)
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    # The adapter weights keep their dtype here: the autograd Function casts them.
    p = float(dropout_p) if training else 0.0
    seed = _new_seed(x.device) if p > 0.0 else None
    return _call(OP, x, weight, bias, lora_A, lora_B, float(scaling), p, seed)
