"""IA3 / SSF kernels and launchers, on 2-D inputs: per-channel rescaling fused into the GEMM. The op
layer (fusedpeft/ops/_rescale.py) owns argument checks, reshapes, autograd and the choice between
saving and recomputing z.

Entry kernels, each over core.py's pieces:
- rescale_kernel         input scaling: out = (a * l[k]) @ w^T (+ b), the a tile scaled in
                         registers, never stored: IA3's feedforward forward (a = x), and output
                         scaling's grad_x = (g * l) W (a = g, w = W^T).
                         output scaling: z = x W^T + b, y = z * l (+ t), z written too in "save"
                         mode (+ MN bytes): the forward of IA3's output scaling and SSF.
- rescale_reduce_kernel  h = a @ w^T (+ b) with the column sums sum_rows(h * other) (and of other)
                         reduced per row block in the epilogue, h * l stored or nothing stored:
                         input scaling's backward (a = g, other = x: grad_x = h * l and
                         grad_l = sum_rows(h * x) in one launch), and output scaling's
                         "recompute" mode (a = x, other = g: grad_l = sum_rows(z * g) with
                         grad_shift = sum_rows(g), z never stored).
- column_dot_kernel      sum_rows(g * z) and sum_rows(g) from a saved z ("save" mode).
FLOPs and bytes are the base GEMM's (2MNK; a, w, out) plus K or N scale entries: the scaling is
free against the GEMM, so each should match the base linear. The partial sums ([row blocks, N]
float32) are summed on the host side in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpeft.settings import settings

from . import fast_launch, layout
from .core import (column_vector, gemm_setup, gemm_tile, k_loop, make_desc, reduce_columns, split_halves, store_tile,
                   tile_start)
from .gemm import NOT_PLANNED, Gemm, PersistentGemm
from .layout import column_sums, descriptor_ok, split_rows, weight_operand, zero_column_sums


@triton.jit
def rescale_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, scale_ptr, shift_ptr, z_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_zm,
    SCALE_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, SAVE_Z: tl.constexpr,
    W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr, Z_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EPI_SUBTILE: tl.constexpr,
):
    """SCALE_INPUT: out = (a * scale[k]) @ w^T (+ bias), the a tile scaled in registers; its loop
    form matters (configs.config_constexprs: a wgmma with a register operand, pipelined per tile
    only where Triton keeps it race-free).
    Otherwise: z = a @ w^T (+ bias), out = z * scale[n] (+ shift[n]); with SAVE_Z, z written too
    (Z_DESC: by descriptor, an asynchronous store with no per-element addresses in registers)."""
    num_pid_m, num_pid_n, a_desc, w_desc = gemm_setup(a_ptr, w_ptr, M, N, K, stride_am, stride_wn, stride_wk, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    out_desc = make_desc(out_ptr, M, N, stride_om, BLOCK_M, EPI_N, USE_DESC)
    z_desc = make_desc(z_ptr, M, N, stride_zm, BLOCK_M, EPI_N, Z_DESC)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, off_m, off_n = tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn,
                     stride_wk, scale_ptr, 0, 0.0, 1, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC,
                     SCALE_A=SCALE_INPUT)
        acc0, acc1 = split_halves(acc, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            off_p = off_n + piece * EPI_N
            cols = off_p + tl.arange(0, EPI_N)
            out = acc0 if piece == 0 else acc1
            if HAS_BIAS:
                out += column_vector(bias_ptr, cols, N)
            if not SCALE_INPUT:
                if SAVE_Z:
                    store_tile(z_ptr, z_desc, out, off_m, off_p, M, N, stride_zm, 1, BLOCK_M, EPI_N, Z_DESC)
                out = out * column_vector(scale_ptr, cols, N)
                if HAS_SHIFT:
                    out += column_vector(shift_ptr, cols, N)
            store_tile(out_ptr, out_desc, out, off_m, off_p, M, N, stride_om, 1, BLOCK_M, EPI_N, USE_DESC)


@triton.jit
def rescale_reduce_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, scale_ptr, other_ptr, partial_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_xm, stride_xn,
    HAS_BIAS: tl.constexpr, STORE_OUT: tl.constexpr, SUM_OTHER: tl.constexpr, W_KMAJOR: tl.constexpr,
    USE_DESC: tl.constexpr, OTHER_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EPI_SUBTILE: tl.constexpr,
):
    """h = a @ w^T (+ bias); partial[0, pid_m, n] = sum over the tile's rows of h * other (other
    [M, N], strides stride_xm / stride_xn) and with SUM_OTHER partial[1, pid_m, n] = sum of other;
    with STORE_OUT out = h * scale[n]."""
    num_pid_m, num_pid_n, a_desc, w_desc = gemm_setup(a_ptr, w_ptr, M, N, K, stride_am, stride_wn, stride_wk, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    out_desc = make_desc(out_ptr, M, N, stride_om, BLOCK_M, EPI_N, USE_DESC and STORE_OUT)
    other_desc = make_desc(other_ptr, M, N, stride_xm, BLOCK_M, EPI_N, OTHER_DESC)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, off_m, off_n = tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = gemm_tile(a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn,
                        stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
        acc0, acc1 = split_halves(acc, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            off_p = off_n + piece * EPI_N
            cols = off_p + tl.arange(0, EPI_N)
            h = acc0 if piece == 0 else acc1
            if HAS_BIAS:
                h += column_vector(bias_ptr, cols, N)
            reduce_columns(h, other_ptr, other_desc, partial_ptr, off_m, off_p, pid_m, num_pid_m, M, N, stride_xm,
                           stride_xn, BLOCK_M, EPI_N, OTHER_DESC, SUM_OTHER)
            if STORE_OUT:
                store_tile(out_ptr, out_desc, h * column_vector(scale_ptr, cols, N), off_m, off_p, M, N, stride_om, 1,
                           BLOCK_M, EPI_N, USE_DESC)


@triton.jit
def column_dot_kernel(
    g_ptr, z_ptr, partial_ptr, M, C, rows_per_split, stride_gm, stride_zm,
    SUM_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """partial[split, c] = sum over the split's rows of g * z, and with SUM_G
    partial[splits + split, c] = sum of g: grad_scale = sum_rows(grad_y * z) and
    grad_shift = sum_rows(grad_y) of output scaling from a saved z. Memory-bound: reads g and z
    once (4MN bytes in bf16), no FLOPs to speak of; unit column strides."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & (cols[None, :] < C)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * z, axis=0)
        if SUM_G:
            total += tl.sum(g, axis=0)
    tl.store(partial_ptr + split * C + cols, dot, mask=cols < C)
    if SUM_G:
        tl.store(partial_ptr + (splits + split) * C + cols, total, mask=cols < C)


_RESCALE = PersistentGemm(rescale_kernel)
_REDUCE = PersistentGemm(rescale_reduce_kernel)


def _plan_key(*tensors, flags=()):
    if not fast_launch.enabled():
        return None
    meta = fast_launch.meta
    return (tensors[0].get_device(), *(meta(t) for t in tensors), *flags, settings.generation)


def _rescaled(a, w_mat, out, bias, scale, *, input_scale, shift=None, z=None):
    """rescale_kernel: out = (a * scale) @ w_mat^T (+ bias) with ``input_scale``, else
    out = (a @ w_mat^T + bias) * scale (+ shift) and z = the unscaled result when given."""
    M, K = a.shape
    N = w_mat.shape[0]
    w, w_kmajor, stride_wn, stride_wk = weight_operand(w_mat)
    tensors = (a, w, out, a if bias is None else bias, scale, a if shift is None else shift, a if z is None else z)
    plan_key = _plan_key(a, w, out, bias, scale, shift, z, flags=(input_scale,))
    if plan_key is not None and _RESCALE.replay(plan_key, tensors, ()) is not NOT_PLANNED:
        return out
    use_desc = descriptor_ok(a, w, out)
    z_desc = bool(settings.rescale_tma and use_desc and z is not None and descriptor_ok(z))
    ints = (M, N, K, a.stride(0), a.stride(1), stride_wn, stride_wk, out.stride(0), 0 if z is None else z.stride(0))
    flags = dict(SCALE_INPUT=bool(input_scale), HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None,
                 SAVE_Z=z is not None, W_KMAJOR=w_kmajor, USE_DESC=use_desc, Z_DESC=z_desc)
    _RESCALE.launch(plan_key, tensors, ints, (), flags,
                    Gemm(M, N, K, a.dtype, a.element_size(), descriptors=use_desc or z_desc, scales_a=bool(input_scale)))
    return out


def _reduce_against(a, w_mat, other, *, bias=None, out=None, scale=None, sum_other=False):
    """(sum_rows(h * other), sum_rows(other) if sum_other else None) as float32 for h = a @ w_mat^T
    (+ bias), and out = h * scale when out is given: rescale_reduce_kernel."""
    M, K = a.shape
    N = w_mat.shape[0]
    if M == 0 or N == 0:
        return zero_column_sums(N, sum_other, a.device)
    w, w_kmajor, stride_wn, stride_wk = weight_operand(w_mat)
    tensors = (a, w, a if out is None else out, a if bias is None else bias, a if scale is None else scale, other)
    plan_key = _plan_key(a, w, out, bias, scale, other, flags=(sum_other,))
    if plan_key is not None:
        partial = _REDUCE.replay(plan_key, tensors, ())
        if partial is not NOT_PLANNED:
            return column_sums(partial, sum_other)
    use_desc = descriptor_ok(a, w, out)
    other_desc = bool(settings.rescale_tma and use_desc and descriptor_ok(other))
    ints = (M, N, K, a.stride(0), a.stride(1), stride_wn, stride_wk, 0 if out is None else out.stride(0),
            other.stride(0), other.stride(1))
    flags = dict(HAS_BIAS=bias is not None, STORE_OUT=out is not None, SUM_OTHER=bool(sum_other),
                 W_KMAJOR=w_kmajor, USE_DESC=use_desc, OTHER_DESC=other_desc)
    partial = _REDUCE.launch(plan_key, tensors, ints, (), flags,
                             Gemm(M, N, K, a.dtype, a.element_size(), descriptors=use_desc or other_desc,
                                  partial_planes=2 if sum_other else 1))
    return column_sums(partial, sum_other)


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


def forward(x, weight, bias, scale, shift, input_scale, save_unscaled):
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, (torch.empty_like(y) if save_unscaled and not input_scale else None)
    if input_scale:
        return _rescaled(x, weight, y, bias, scale, input_scale=True), None
    z = torch.empty(M, N, dtype=x.dtype, device=x.device) if save_unscaled else None
    return _rescaled(x, weight, y, bias, scale, input_scale=False, shift=shift, z=z), z


def backward(grad_y, x, weight, bias, scale, shift, input_scale, z, needs, grad_dtypes=(None, None)):
    need_x, need_w, need_b, need_scale, need_shift = needs
    grad_x = grad_w = grad_b = grad_scale = grad_shift = None
    M, K = x.shape
    dtype = grad_y.dtype
    # The scale's and shift's gradients are float32 column sums: rounded once, to the dtype the
    # caller keeps them in (float32 masters: not at all).
    scale_dtype, shift_dtype = (d or dtype for d in grad_dtypes)
    if input_scale:
        if need_x or need_scale:
            grad_x = torch.empty(M, K, dtype=x.dtype, device=x.device) if need_x else None
            if need_scale:  # h = g W: grad_x = h * l and grad_l = sum_rows(h * x) in one launch
                grad_scale = _reduce_against(grad_y, weight.T, x, out=grad_x, scale=scale)[0].to(scale_dtype)
            elif M and K:
                _rescaled(grad_y, weight.T, grad_x, None, scale, input_scale=False)
        if need_b:
            grad_b = grad_y.sum(0, dtype=torch.float32).to(dtype)
        if need_w:
            grad_w = grad_y.T @ (x * scale)
        return grad_x, grad_w, grad_b, grad_scale, grad_shift

    if need_x:
        grad_x = torch.empty(M, K, dtype=x.dtype, device=x.device)
        if M and K:
            _rescaled(grad_y, weight.T, grad_x, None, scale, input_scale=True)
    want_sum = need_shift or need_b
    col_g = None
    if need_scale:
        if z is not None:
            dot, col_g = _column_dot(grad_y, z, want_sum)
        else:
            dot, col_g = _reduce_against(x, weight, grad_y, bias=bias, sum_other=want_sum)
        grad_scale = dot.to(scale_dtype)
    elif want_sum:
        col_g = grad_y.sum(0, dtype=torch.float32)
    if need_shift:
        grad_shift = col_g.to(shift_dtype)
    if need_b:  # sum_rows(g * l) = l * sum_rows(g)
        grad_b = (col_g * scale.float()).to(dtype)
    if need_w:
        grad_w = (grad_y * scale).T @ x
    return grad_x, grad_w, grad_b, grad_scale, grad_shift
