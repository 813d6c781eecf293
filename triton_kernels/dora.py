"""DoRA's launchers over the LoRA kernels, on 2-D inputs (the op layer, fusedpeft/ops/dora.py,
computes the row norms n and owns autograd). With c = m / n (float32, N):

Without dropout (p = 0), y = c * z + b, z = x W^T + s (x A^T) B^T:
- forward: lora_forward_kernel with its DoRA epilogue (c applied before the bias, z written in
  "save" mode): one launch, the LoRA forward's (after the skinny u_s = s x A^T at large M).
- backward: the LoRA backward on g_c = c * grad_y: grad_x, grad_A, grad_B. Where K < M the scale
  goes on W and B instead (c * W: 4NK bytes in bf16 and N x K held, against 4MN and M x N for g_c).
  Then grad_m = sum_rows(grad_y * z) / n and grad_b = sum_rows(grad_y) in one column_dot pass over
  grad_y and z (z read back, or recomputed by the forward kernel without the scale in "recompute"
  mode: one more 2MNK GEMM instead of M x N saved).

With dropout (p > 0), peft's y = x W^T + b + (c - 1) * t + c * s u B^T, t = drop(x) W^T, needs a
GEMM with W on drop(x) besides x W^T, in the forward and in grad_x. drop(x) is formed once per
pass (x * mask, the mask the LoRA kernels draw, M x K for the length of the pass) and the GEMMs are
cuBLAS's: about 1.5x a LoRA step's GEMM work, inherent to the formula.
"""
from __future__ import annotations

import torch

from . import lora
from .lora import dropout_mask
from .lowrank import lowrank_product, weight_grad
from .rescale import _column_dot


def _dropped(x, dropout_p, seed):
    """drop(x) = x * mask / (1 - p), with the LoRA kernels' mask."""
    mask = dropout_mask(seed, tuple(x.shape), dropout_p, x.device)
    return x * mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))


def forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, save_z):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    c = magnitude.float() / norm.float()
    u_s = torch.empty(M, r, dtype=x.dtype, device=x.device)
    if dropout_p == 0.0:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        z = torch.empty(M, N, dtype=x.dtype, device=x.device) if save_z else None
        fused = lora.schedule(M, r) == "fused"
        if not fused:
            lowrank_product(x, lora_A, u_s, scaling)
        lora._launch_lora(lora._FORWARD, x, weight, y, lora_A, lora_B, u_s, scaling, None, 0.0, bias=bias,
                          in_loop=fused, dropout_arg=False, out_scale=c, z=z)
        return y, (z if save_z else u_s)
    lowrank_product(x, lora_A, u_s, scaling / (1.0 - dropout_p), seed, dropout_p)  # s drop(x) A^T
    z = torch.addmm(torch.mm(_dropped(x, dropout_p, seed), weight.T), u_s, lora_B.T)  # t + s u B^T
    t = z.addmm(u_s, lora_B.T, alpha=-1.0)  # the same t back: no M x N kept from the first product
    y = torch.addmm(bias, x, weight.T) if bias is not None else torch.mm(x, weight.T)
    y.addcmul_(z, c.to(x.dtype)).sub_(t)
    return y, (z if save_z else u_s)


def _recomputed_z(x, weight, lora_A, lora_B, u_s, scaling, dropout_p, seed):
    """z = drop(x) W^T + u_s B^T again (the "recompute" mode's grad of the magnitude)."""
    M, N = x.shape[0], weight.shape[0]
    if dropout_p == 0.0:
        z = torch.empty(M, N, dtype=x.dtype, device=x.device)
        return lora._launch_lora(lora._FORWARD, x, weight, z, lora_A, lora_B, u_s, scaling, None, 0.0, bias=None,
                                 in_loop=False, dropout_arg=False)
    return torch.addmm(torch.mm(_dropped(x, dropout_p, seed), weight.T), u_s, lora_B.T)


def _lora_backward_scaled(grad_y, x, weight, lora_A, lora_B, c, scaling, u_s, needs, grad_dtypes):
    """The LoRA backward on g_c = c * grad_y (c scales output columns), p = 0. Where K < M the scale
    goes on the operands instead of grad_y: g_c W = grad_y (c * W), g_c B = grad_y (c * B) and
    g_c^T u_s = c * (grad_y^T u_s), so the temporary is c * W (N x K) rather than g_c (M x N)."""
    need_x, need_A, need_B = needs
    M, K = x.shape
    c_ = c.to(grad_y.dtype)[:, None]
    if K >= M:
        return lora.backward(grad_y * c_.T, x, weight, lora_A, lora_B, scaling, 0.0, None,
                             (need_x, False, False, need_A, need_B), (u_s,), grad_dtypes)
    weight_c = weight * c_ if need_x else weight
    grad_x, _, _, grad_A, grad_B = lora.backward(grad_y, x, weight_c, lora_A, lora_B * c_, scaling, 0.0, None,
                                                 (need_x, False, False, need_A, need_B), (u_s,), grad_dtypes)
    if grad_B is not None:
        grad_B = grad_B.mul_(c_)
    return grad_x, None, None, grad_A, grad_B


def backward(grad_y, x, weight, bias, lora_A, lora_B, magnitude, saved, scaling, norm, dropout_p, seed, save_z, needs,
             grad_dtypes=(None, None, None)):
    """grad_dtypes: the dtypes grad_A, grad_B and grad_m are kept in (float32 masters): the
    reductions write them in those directly."""
    need_x, need_w, need_b, need_A, need_B, need_m = needs
    dtype_A, dtype_B, dtype_m = (d or t.dtype for d, t in zip(grad_dtypes, (lora_A, lora_B, magnitude)))
    c = magnitude.float() / norm.float()
    # g_c = c * grad_y (M x N) only where a product needs it whole (dropout's and grad_w's)
    g_c = grad_y * c.to(grad_y.dtype) if (dropout_p > 0.0 or need_w) else None
    M, r = x.shape[0], lora_A.shape[0]
    keep = 1.0 / (1.0 - dropout_p)
    if save_z:
        z = saved
        u_s = torch.empty(M, r, dtype=x.dtype, device=x.device)
        lowrank_product(x, lora_A, u_s, scaling * keep, seed, dropout_p)
    else:
        u_s = saved
        z = _recomputed_z(x, weight, lora_A, lora_B, u_s, scaling, dropout_p, seed) if need_m else None
    grad_x = grad_w = grad_b = grad_A = grad_B = grad_m = None
    if dropout_p == 0.0:
        grad_x, _, _, grad_A, grad_B = _lora_backward_scaled(grad_y, x, weight, lora_A, lora_B, c, scaling, u_s,
                                                             (need_x, need_A, need_B), (dtype_A, dtype_B))
    else:
        g_B = g_c @ lora_B
        if need_x:  # grad_y W + mask/(1-p) * ((g_c - grad_y) W + s g_B A)
            inner = torch.addmm(torch.mm(g_B, lora_A), g_c - grad_y, weight, alpha=1.0, beta=scaling)
            grad_x = torch.addmm(_dropped(inner, dropout_p, seed), grad_y, weight)
        if need_A:  # s g_B^T drop(x): the masked reduction reads x once
            grad_A = torch.empty_like(lora_A, dtype=dtype_A)
            weight_grad(x, g_B, grad_A, scale=scaling * keep, transpose_out=True, seed=seed, dropout_p=dropout_p)
        if need_B:
            grad_B = torch.empty_like(lora_B, dtype=dtype_B)
            weight_grad(g_c, u_s, grad_B, scale=1.0, transpose_out=False)
    if need_m or need_b:
        if need_m:
            dot, col_g = _column_dot(grad_y, z, need_b)
            grad_m = (dot / norm.float()).to(dtype_m)
        else:
            col_g = grad_y.sum(0, dtype=torch.float32)
        if need_b:
            grad_b = col_g.to(grad_y.dtype)
    if need_w:  # only when the user unfroze the base weight
        x_d = x if dropout_p == 0.0 else _dropped(x, dropout_p, seed)
        grad_w = grad_y.T @ x + (g_c - grad_y).T @ x_d
    return grad_x, grad_w, grad_b, grad_A, grad_B, grad_m
