"""DoRA's launchers over the LoRA kernels, on 2-D inputs (the op layer, fusedpeft/ops/dora.py,
computes the row norms n and owns autograd). With c = m / n (float32, N):

Without dropout (p = 0), y = c * z + b, z = x W^T + s (x A^T) B^T:
- forward: lora_forward_kernel with its DoRA epilogue (c applied before the bias, z written in
  "save" mode): one launch, the LoRA forward's (after the skinny u_s = s x A^T at large M).
- backward: the LoRA backward on g_c = c * grad_y: grad_x, grad_A, grad_B, g_c never formed at
  large M: grad_x's GEMM scales grad_y's tiles by c as it loads them, and B and grad_B take c on
  their N rows (N x r each).
  Then grad_m = sum_rows(grad_y * z) / n and grad_b = sum_rows(grad_y): with z from the output
  (the op's Z_FROM_OUTPUT) one column_dot pass over grad_y and y, (dot - b col_g) / m; with z
  saved the same pass over z, dot / n; with z recomputed dora_magnitude_grad_kernel, the GEMM
  z = x W^T + u_s B^T again with the two column sums reduced in its epilogue, z never stored
  (one more 2MNK GEMM). Only the saved z costs memory (M x N) beyond what LoRA holds.

With dropout (p > 0), peft's y = x W^T + b + (c - 1) * t + c * s u B^T, t = drop(x) W^T, needs a
GEMM with W on drop(x) besides x W^T, in the forward and in grad_x. drop(x) is formed once per
pass (x * mask, the mask the LoRA kernels draw, M x K for the length of the pass) and the GEMMs are
cuBLAS's: about 1.5x a LoRA step's GEMM work, inherent to the formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpeft.ops.dora import (Z_SAVED, adapter_delta, grad_m_from_output, output_scale_minus_one,
                                saved_for_grad_m, unpack_saved)
from fusedpeft.settings import settings

from . import configs, fast_launch, layout, lora
from .core import gemm_setup, gemm_tile, load_tile, make_desc, mma, oriented_desc, reduce_columns, split_halves, tile_start
from .gemm import NOT_PLANNED, Gemm, PersistentGemm
from .layout import block_r, column_sums, descriptor_ok, weight_operand, zero_column_sums
from .lora import dropout_mask, lora_term_piece  # noqa: F401 (dropout_mask: the backend's mask, as every backend gives it)
from .lowrank import lowrank_product, weight_grad
from .rescale import _column_dot


@triton.jit
def dora_magnitude_grad_kernel(
    x_ptr, w_ptr, u_ptr, lora_B_ptr, g_ptr, partial_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_bn, stride_br, stride_gm, stride_gn,
    SUM_G: tl.constexpr, W_KMAJOR: tl.constexpr, EVEN_R: tl.constexpr, USE_DESC: tl.constexpr,
    LR_DESC: tl.constexpr, B_RMAJOR: tl.constexpr, G_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPI_SUBTILE: tl.constexpr,
):
    """DoRA's magnitude gradient without z: per output tile z = x W^T + u_s B^T (the forward's
    GEMM without the scale or the bias; u_s [M, R] saved by the forward), then
    partial[0, pid_m, n] = sum over the tile's rows of z * g and, with SUM_G, partial[1, pid_m, n]
    = the sum of g (g = grad_y [M, N]): grad_m = sum_rows(g * z) / n and grad_b = sum_rows(g)
    once the host sums the row blocks.

    Cost: the forward's FLOPs (2MNK + 2MNr) and bytes (x, W, u_s, B) with g read in place of y
    written: as compute-bound as the base GEMM, and nothing of size M x N stored."""
    num_pid_m, num_pid_n, x_desc, w_desc = gemm_setup(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, stride_wk, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    g_desc = make_desc(g_ptr, M, N, stride_gm, BLOCK_M, EPI_N, G_DESC)
    u_desc = make_desc(u_ptr, M, R, stride_um, BLOCK_M, BLOCK_R, LR_DESC)
    b_desc = oriented_desc(lora_B_ptr, N, R, stride_bn, stride_br, EPI_N, BLOCK_R, B_RMAJOR, LR_DESC)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, off_m, off_n = tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = gemm_tile(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_xm, stride_xk, stride_wn,
                        stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
        u_s = load_tile(u_ptr, u_desc, off_m, 0, M, R, stride_um, 1, BLOCK_M, BLOCK_R, LR_DESC, EVEN_R)
        rows = off_m + tl.arange(0, BLOCK_M)
        acc0, acc1 = split_halves(acc, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            off_p = off_n + piece * EPI_N
            z, _ = lora_term_piece(acc0 if piece == 0 else acc1, u_s, lora_B_ptr, b_desc, rows, off_p, N, K, R,
                                   stride_bn, stride_br, EPI_N, BLOCK_M, BLOCK_R, EVEN_R, LR_DESC, B_RMAJOR)
            reduce_columns(z, g_ptr, g_desc, partial_ptr, off_m, off_p, pid_m, num_pid_m, M, N, stride_gm, stride_gn,
                           BLOCK_M, EPI_N, G_DESC, SUM_G)


_MAGNITUDE_GRAD = PersistentGemm(dora_magnitude_grad_kernel)


def magnitude_grad_sums(x, weight, lora_B, u_s, grad_y, want_sum: bool):
    """(sum_rows(grad_y * z), sum_rows(grad_y) if want_sum else None), float32, with z = x W^T +
    u_s B^T recomputed tile by tile and never stored (dora_magnitude_grad_kernel). x: [M, K];
    weight: [N, K]; lora_B: [N, R]; u_s: [M, R], the forward's s x A^T; grad_y: [M, N]. Where no
    tile config can hold the rank-r epilogue, z is formed by cuBLAS and reduced apart."""
    M, K = x.shape
    N, R = lora_B.shape
    if M == 0 or N == 0:
        return zero_column_sums(N, want_sum, x.device)
    w, w_kmajor, stride_wn, stride_wk = weight_operand(weight)
    tensors = (x, w, u_s, lora_B, grad_y)
    plan_key = None
    if fast_launch.enabled():
        meta = fast_launch.meta
        plan_key = (x.get_device(), meta(x), meta(w), meta(u_s), meta(lora_B), meta(grad_y), want_sum,
                    settings.generation)
        partial = _MAGNITUDE_GRAD.replay(plan_key, tensors, ())
        if partial is not NOT_PLANNED:
            return column_sums(partial, want_sum)
    b_stored, b_rmajor = lora._rmajor(lora_B)
    lr_desc = bool(settings.lowrank_tma and b_stored is not None and descriptor_ok(u_s, b_stored))
    use_desc = descriptor_ok(x, w)
    g_desc = bool(settings.rescale_tma and use_desc and descriptor_ok(grad_y))
    ints = (M, N, K, R, x.stride(0), x.stride(1), stride_wn, stride_wk, u_s.stride(0), lora_B.stride(0),
            lora_B.stride(1), grad_y.stride(0), grad_y.stride(1))
    flags = dict(SUM_G=bool(want_sum), W_KMAJOR=w_kmajor, EVEN_R=R == block_r(R), USE_DESC=use_desc, LR_DESC=lr_desc,
                 B_RMAJOR=b_rmajor, G_DESC=g_desc, BLOCK_R=block_r(R))
    try:
        partial = _MAGNITUDE_GRAD.launch(plan_key, tensors, ints, (), flags,
                                         Gemm(M, N, K, x.dtype, x.element_size(), descriptors=use_desc or lr_desc or g_desc,
                                              partial_planes=2 if want_sum else 1))
    except configs.NoConfigFits:
        z = torch.addmm(torch.mm(x, weight.T), u_s, lora_B.T)
        return _column_dot(grad_y, z, want_sum)
    return column_sums(partial, want_sum)


@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, norm_ptr,
    N, K, R, scaling,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    """norm[n] = ||W[n] + s (B A)[n]|| for one block of rows, W + s B A never stored: each
    (BLOCK_N x BLOCK_K) tile of the merged weight is formed in registers from W's tile and the
    rank-r product B[rows] A[:, k-chunk], and its squares are summed in float32. The direct sum,
    not the expansion ||W||^2 + 2 s (W A^T) . B + s^2 B (A A^T) B^T, so nothing cancels, and one
    MMA per tile (2 N K r FLOPs in all) beside W's bytes (2 N K in 16-bit types; A from L2). B and
    A enter the MMA in W's dtype with float32 accumulation (float32 W: full-precision FMAs)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    b = tl.load(b_ptr + rows[:, None] * stride_bn + r[None, :] * stride_br, mask=row_ok[:, None] & r_ok[None, :],
                other=0.0)
    squares = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :] * stride_wk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        a = tl.load(a_ptr + r[:, None] * stride_ar + k[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0)
        merged = w.to(tl.float32) + scaling * mma(b.to(w.dtype), a.to(w.dtype),
                                                  tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), IEEE)
        squares += merged * merged
    tl.store(norm_ptr + rows, tl.sqrt(tl.sum(squares, axis=1)), mask=row_ok)


def weight_norm(weight, lora_A, lora_B, scaling: float):
    """||W + s B A||_row (N,) float32 in one launch (dora_norm_kernel), for the op's
    dora_weight_norm. Bytes: W once (2 N K in 16-bit types), A once per program from L2, B once;
    FLOPs 2 N K r. The seven-launch composition it replaces costs 84-88 us on an H200 at any N
    (launch-bound)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    norm = torch.empty(N, dtype=torch.float32, device=weight.device)
    if N == 0:
        return norm
    interp = layout.interpreting()
    # Rows per program: enough programs to stream W at N = 1024 (k/v projections), 32 above.
    BLOCK_N = 16 if interp or N <= 2048 else 32
    fast_launch.cached_launch(
        dora_norm_kernel, (triton.cdiv(N, BLOCK_N),),
        (weight, lora_A, lora_B, norm, N, K, R, float(scaling),
         weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1)),
        dict(BLOCK_N=BLOCK_N, BLOCK_K=32 if interp else 128, BLOCK_R=block_r(R), IEEE=weight.dtype == torch.float32),
        num_warps=4, num_stages=1 if interp else 3)
    return norm


def forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, dropout_p, seed, z_source):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    c = magnitude.float() / norm.float()
    u_s = torch.empty(M, r, dtype=x.dtype, device=x.device)
    if dropout_p == 0.0:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        z = torch.empty(M, N, dtype=x.dtype, device=x.device) if z_source == Z_SAVED else None
        fused = lora.schedule(M, r) == "fused"
        if not fused:
            lowrank_product(x, lora_A, u_s, scaling)
        lora._launch_lora(lora._FORWARD, x, weight, y, lora_A, lora_B, u_s, scaling, None, 0.0, bias=bias,
                          in_loop=fused, dropout_arg=False, out_scale=c, z=z)
        return y, saved_for_grad_m(z_source, y, z, u_s)
    lowrank_product(x, lora_A, u_s, scaling / (1.0 - dropout_p), seed, dropout_p)  # s drop(x) A^T
    # y = x W^T + delta, delta = (c - 1) t + c s u B^T with t = drop(x) W^T: the composition's
    # single-rounding delta (fusedpeft.ops.dora.adapter_delta)
    t = torch.mm(lora.dropped(x, seed, dropout_p), weight.T)
    z, delta = adapter_delta(t, torch.mm(u_s, lora_B.T), output_scale_minus_one(magnitude, norm, x.dtype))
    y = torch.addmm(bias, x, weight.T) if bias is not None else torch.mm(x, weight.T)
    y.add_(delta)
    return y, saved_for_grad_m(z_source, y, z, u_s)


def _recomputed_z(x, weight, lora_B, u_s, dropout_p, seed):
    """z = drop(x) W^T + u_s B^T again: the "recompute" mode's grad of the magnitude with dropout
    (without it, magnitude_grad_sums never forms z)."""
    return torch.addmm(torch.mm(lora.dropped(x, seed, dropout_p), weight.T), u_s, lora_B.T)


def _lora_backward_scaled(grad_y, x, weight, lora_A, lora_B, c, c_minus_1, scaling, u_s, needs, grad_dtypes):
    """The LoRA backward on g_c = c * grad_y (c scales output columns), p = 0, with nothing of size
    M x N or N x K formed where the split schedule runs (large M): grad_x's GEMM scales grad_y's
    tiles by c (float32, N) as it loads them (lora.backward's grad_x_scale), g_s = s grad_y (c B)
    and grad_B = c * (grad_y^T u_s). At the fused schedule's few rows g_c itself is formed (M x N,
    small there) as grad_y + grad_y (c - 1), c_minus_1 (N) in grad_y's dtype."""
    need_x, need_A, need_B = needs
    lora_needs = (need_x, False, False, need_A, need_B)
    if c is None:
        return lora.backward(torch.addcmul(grad_y, grad_y, c_minus_1[None, :]), x, weight, lora_A, lora_B, scaling,
                             0.0, None, lora_needs, (u_s,), grad_dtypes)
    lora_B_c = torch.mul(lora_B, c[:, None], out=torch.empty_like(lora_B))  # one rounding of B c
    grad_x, _, _, grad_A, grad_B = lora.backward(grad_y, x, weight, lora_A, lora_B_c, scaling, 0.0, None, lora_needs,
                                                 (u_s,), grad_dtypes, grad_x_scale=c if need_x else None)
    if grad_B is not None:  # grad_y^T u_s from unscaled grad_y: c on its rows
        grad_B.mul_(c[:, None])
    return grad_x, None, None, grad_A, grad_B


def backward(grad_y, x, weight, bias, lora_A, lora_B, magnitude, saved, scaling, norm, dropout_p, seed, z_source, needs,
             grad_dtypes=(None, None, None)):
    """grad_dtypes: the dtypes grad_A, grad_B and grad_m are kept in (float32 masters): the
    reductions write them in those directly."""
    need_x, need_w, need_b, need_A, need_B, need_m = needs
    dtype_A, dtype_B, dtype_m = (d or t.dtype for d, t in zip(grad_dtypes, (lora_A, lora_B, magnitude)))
    M, r = x.shape[0], lora_A.shape[0]
    keep = 1.0 / (1.0 - dropout_p)
    # c = m / n (float32) where the LoRA backward's split schedule scales operands by it (grad_x's
    # GEMM the split schedule; without grad_x it is split); elsewhere each t * c is formed as
    # t + t (c - 1) in t's dtype (output_scale_minus_one)
    split = not need_x or lora.schedule(M, r) == "split"
    c = magnitude.float() / norm.float() if dropout_p == 0.0 and split else None
    c_minus_1 = None
    if c is None or need_w:
        c_minus_1 = output_scale_minus_one(magnitude, norm, torch.float32).to(grad_y.dtype)
    # g_c = c * grad_y (M x N) only where a product needs it whole (dropout's)
    g_c = torch.addcmul(grad_y, grad_y, c_minus_1) if dropout_p > 0.0 else None
    output, z, u_s = unpack_saved(z_source, saved)
    if u_s is None:
        u_s = torch.empty(M, r, dtype=x.dtype, device=x.device)
        lowrank_product(x, lora_A, u_s, scaling * keep, seed, dropout_p)
    if need_m and z is None and output is None and dropout_p > 0.0:
        # (without dropout the magnitude's sums come from the GEMM's epilogue, z never formed)
        z = _recomputed_z(x, weight, lora_B, u_s, dropout_p, seed)
    grad_x = grad_w = grad_b = grad_A = grad_B = grad_m = None
    if dropout_p == 0.0:
        grad_x, _, _, grad_A, grad_B = _lora_backward_scaled(grad_y, x, weight, lora_A, lora_B, c, c_minus_1, scaling,
                                                             u_s, (need_x, need_A, need_B), (dtype_A, dtype_B))
    else:
        g_B = g_c @ lora_B
        if need_x:  # grad_y W + mask/(1-p) * ((g_c - grad_y) W + s g_B A)
            inner = torch.addmm(torch.mm(g_B, lora_A), grad_y * c_minus_1, weight, alpha=1.0, beta=scaling)
            grad_x = torch.addmm(lora.dropped(inner, seed, dropout_p), grad_y, weight)
        if need_A:  # s g_B^T drop(x): the masked reduction reads x once
            grad_A = torch.empty_like(lora_A, dtype=dtype_A)
            weight_grad(x, g_B, grad_A, scale=scaling * keep, transpose_out=True, seed=seed, dropout_p=dropout_p)
        if need_B:
            grad_B = torch.empty_like(lora_B, dtype=dtype_B)
            weight_grad(g_c, u_s, grad_B, scale=1.0, transpose_out=False)
    if need_m or need_b:
        if need_m and output is not None:
            dot, col_g = _column_dot(grad_y, output, need_b or bias is not None)
            grad_m = grad_m_from_output(None, None, bias, magnitude, col_g, dot=dot).to(dtype_m)
        elif need_m and z is None:
            dot, col_g = magnitude_grad_sums(x, weight, lora_B, u_s, grad_y, need_b)
            grad_m = (dot / norm.float()).to(dtype_m)
        elif need_m:
            dot, col_g = _column_dot(grad_y, z, need_b)
            grad_m = (dot / norm.float()).to(dtype_m)
        else:
            col_g = grad_y.sum(0, dtype=torch.float32)
        if need_b:
            grad_b = col_g.to(grad_y.dtype)
    if need_w:  # only when the user unfroze the base weight
        x_d = x if dropout_p == 0.0 else lora.dropped(x, seed, dropout_p)
        grad_w = grad_y.T @ x + (grad_y * c_minus_1).T @ x_d
    return grad_x, grad_w, grad_b, grad_A, grad_B, grad_m
