"""IA3 / SSF launchers over the shared GEMM core (fused_linear_kernel), on 2-D inputs. The op layer
(fusedpeft/ops/_rescale.py) owns argument checks, reshapes, autograd and the choice between
saving and recomputing z.

Forward, one launch each:
- input scaling:  y = (x * l) W^T + b      l applied to the x tile in registers (SCALE_A; a per-tile
                  K loop for 16-bit 128-row tiles, the serialised flattened loop otherwise:
                  configs.config_constexprs says why)
- output scaling: y = (x W^T + b) * l (+ t) in the epilogue (SCALE_OUT, SHIFT_OUT); in "save"
  mode the same epilogue also writes z = x W^T + b (SAVE_AUX: + MN bytes written).
FLOPs and bytes are the base GEMM's (2MNK; x, W, y) plus K or N scale entries: the scaling is free
against the GEMM, so the forward should match the base linear.

Backward, with g = grad_y:
- input scaling, one launch: h = g W with the epilogue reducing sum_rows(h * x) per row block
  (REDUCE_AUX with aux = x) and storing grad_x = h * l (SCALE_OUT). The partial sums
  ([row blocks, K] float32) are summed in a fixed order: deterministic, no atomics.
- output scaling: grad_x = (g * l) W, l applied to the g tile (SCALE_A), one launch. grad_l
  (and grad_shift = sum_rows(g)) from z:
    "save":      column_dot_kernel over g and the saved z, a memory-bound pass (4MN bytes);
    "recompute": z = x W^T + b recomputed by the core with the reduction in its epilogue and no
                 store (REDUCE_AUX with aux = g): one more 2MNK GEMM, no M x N memory.
"""
from __future__ import annotations

import torch

from . import fast_launch, layout
from .fused_linear import column_dot_kernel
from .gemm import Rescale, launch_gemm
from .layout import column_sums, split_rows, zero_column_sums


def forward(x, weight, bias, scale, shift, input_scale, save_unscaled):
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if input_scale:
        launch_gemm(x, weight, y, bias=bias, rescale=Rescale(scale, scale_a=True))
        return y, None
    z = torch.empty(M, N, dtype=x.dtype, device=x.device) if save_unscaled else None
    launch_gemm(x, weight, y, bias=bias, rescale=Rescale(scale, shift=shift, aux=z, save_aux=save_unscaled))
    return y, z


def _column_dot(g, z, want_sum):
    """(sum_rows(g * z), sum_rows(g) or None) as float32, from split-M partials summed in order."""
    M, C = g.shape
    if M == 0 or C == 0:
        return zero_column_sums(C, want_sum, g.device)
    interp = layout.interpreting()
    # 64 x 128 tiles, 4 warps, 3 stages, ~4 programs per SM: 2.1-2.2 TB/s on the H100 against
    # 1.35-1.4 for 32 x 128 (tools/diag_rescale.py --kernels).
    BLOCK_C, BLOCK_M = (16, 16) if interp else (128, 64)
    col_blocks, splits, rows_per_split = split_rows(M, C, BLOCK_M, BLOCK_C, g.device)
    partial = torch.empty(2 if want_sum else 1, splits, C, dtype=torch.float32, device=g.device)
    fast_launch.cached_launch(
        column_dot_kernel, (col_blocks, splits),
        (g, z, partial, M, C, rows_per_split, g.stride(0), z.stride(0)),
        dict(SUM_G=bool(want_sum), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C),
        num_warps=4, num_stages=1 if interp else 3,
    )
    return column_sums(partial, want_sum)


def backward(grad_y, x, weight, bias, scale, shift, input_scale, z, needs):
    need_x, need_w, need_b, need_scale, need_shift = needs
    grad_x = grad_w = grad_b = grad_scale = grad_shift = None
    M, K = x.shape
    dtype = grad_y.dtype
    if input_scale:
        if need_x or need_scale:
            grad_x = torch.empty(M, K, dtype=x.dtype, device=x.device) if need_x else None
            res = launch_gemm(grad_y, weight.T, grad_x, rescale=Rescale(scale, aux=x, reduce_aux=need_scale))
            if need_scale:
                grad_scale = res[0].to(dtype)
        if need_b:
            grad_b = grad_y.sum(0, dtype=torch.float32).to(dtype)
        if need_w:
            grad_w = grad_y.T @ (x * scale)
        return grad_x, grad_w, grad_b, grad_scale, grad_shift

    if need_x:
        grad_x = torch.empty(M, K, dtype=x.dtype, device=x.device)
        launch_gemm(grad_y, weight.T, grad_x, rescale=Rescale(scale, scale_a=True))
    want_sum = need_shift or need_b
    col_g = None
    if need_scale:
        if z is not None:
            dot, col_g = _column_dot(grad_y, z, want_sum)
        else:
            dot, col_g = launch_gemm(x, weight, None, bias=bias,
                                     rescale=Rescale(aux=grad_y, reduce_aux=True, reduce_sum=want_sum))
        grad_scale = dot.to(dtype)
    elif want_sum:
        col_g = grad_y.sum(0, dtype=torch.float32)
    if need_shift:
        grad_shift = col_g.to(dtype)
    if need_b:  # sum_rows(g * l) = l * sum_rows(g)
        grad_b = (col_g * scale.float()).to(dtype)
    if need_w:
        grad_w = (grad_y * scale).T @ x
    return grad_x, grad_w, grad_b, grad_scale, grad_shift
