"""IA3 linear: learned per-channel rescaling of a frozen linear layer, exactly as peft scales.

- output scaling (ordinary targets):      y = (x W^T + b) * l,   l: (N,)
- input scaling (feedforward targets):    y = (x * l) W^T + b,   l: (K,)

Backward (torch backend), with z = x W^T + b:
- output: grad_x = (g * l) W,  grad_l = sum_rows(g * z),  grad_b = sum_rows(g * l).
  z is recomputed from the saved x (one extra GEMM) instead of saving the M x N output.
- input:  h = g W,  grad_x = h * l,  grad_l = sum_rows(h * x),  grad_b = sum_rows(g).
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from .. import backends
from . import _common

OP = "ia3_linear"


def ia3_linear_reference(x, weight, bias, ia3_scale, feedforward: bool):
    """The formula, written plainly; tests run it in float64."""
    if feedforward:
        y = (x * ia3_scale) @ weight.T
        return y if bias is None else y + bias
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y * ia3_scale


def _linear(x, weight, bias):
    return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T


def _torch_forward(x, weight, bias, scale, feedforward):
    if feedforward:
        return _linear(x * scale, weight, bias)
    return _linear(x, weight, bias).mul_(scale)


def _torch_backward(grad_y, x, weight, bias, scale, feedforward, needs):
    need_x, need_w, need_b, need_l = needs
    grad_x = grad_w = grad_b = grad_l = None
    dtype = grad_y.dtype
    if feedforward:
        h = grad_y @ weight  # gradient w.r.t. the scaled input x * l
        if need_x:
            grad_x = h * scale
        if need_l:
            grad_l = _common.sum_rows(h * x, dtype)
        if need_w:
            grad_w = grad_y.T @ (x * scale)
        if need_b:
            grad_b = _common.sum_rows(grad_y, dtype)
        return grad_x, grad_w, grad_b, grad_l
    g_scaled = grad_y * scale
    if need_x:
        grad_x = g_scaled @ weight
    if need_l:
        grad_l = _common.sum_rows(grad_y * _linear(x, weight, bias), dtype)
    if need_w:
        grad_w = g_scaled.T @ x
    if need_b:
        grad_b = _common.sum_rows(g_scaled, dtype)
    return grad_x, grad_w, grad_b, grad_l


torch_backend = types.SimpleNamespace(forward=_torch_forward, backward=_torch_backward)

backends.register(OP, "torch", load=lambda: torch_backend, supports=lambda x, w, forced=False: None, priority=0)


class IA3LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward: bool):
        _, impl = backends.select(OP, x, weight)
        y = impl.forward(_common.flatten_rows(x), weight, bias, scale, feedforward)
        ctx.save_for_backward(x, weight, bias, scale)
        ctx.impl, ctx.feedforward = impl, feedforward
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
        needs = (need_x, need_w, need_b and bias is not None, need_l)
        gx, gw, gb, gl = ctx.impl.backward(
            _common.flatten_rows(grad_out.contiguous()),
            _common.flatten_rows(x),
            weight,
            bias,
            scale,
            ctx.feedforward,
            needs,
        )
        if gx is not None:
            gx = gx.reshape(x.shape)
        return gx, gw, gb, gl, None


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_scale: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """IA3 over any leading shape of x. ``ia3_scale`` has in_features entries when ``feedforward``
    (input scaling) and out_features otherwise (output scaling, bias included); peft's (N, 1) and
    (1, K) parameter shapes are accepted as they are."""
    _common.check_linear_inputs(OP, x, weight, bias)
    n, k = weight.shape
    size = k if feedforward else n
    if ia3_scale.numel() != size or ia3_scale.dim() > 2 or max(ia3_scale.shape, default=1) != size:
        kind = "in_features (feedforward: input scaling)" if feedforward else "out_features (output scaling)"
        raise ValueError(f"{OP}: ia3_scale must have {size} entries, one per {kind}; got shape {tuple(ia3_scale.shape)}")
    scale = ia3_scale.reshape(size)
    _common.check_adapter_tensor(OP, "ia3_scale", scale, (size,), weight)
    dtype = _common.compute_dtype(x, weight)
    args = [_common.cast(t, dtype) for t in (x, weight, bias, scale)]
    return _common.outside_autocast(x.device.type, IA3LinearFunction.apply, *args, bool(feedforward))
