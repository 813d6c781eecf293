"""LoRA's fused kernels and their launchers, on 2-D inputs: the forward and grad_x, each the base
GEMM with the rank-r term in its epilogue. The op layer (fusedpeft/ops/lora.py) owns argument
checks, reshapes and autograd; the rank-r pieces that run apart (the skinny products, the weight
gradients) are in lowrank.py.

With s = scaling / (1 - p) and mask the 0/1 dropout keep-mask at [m, k] of x (the 1 / (1 - p)
folded into s):

    forward   y = x W^T + b + u_s B^T,           u_s = s (x * mask) A^T    (M x r, saved)
    grad_x    grad_x = grad_y W + mask * (g_s A),  g_s = s grad_y B          (M x r)
    grad_A    = g_s^T (x * mask),   grad_B = grad_y^T u_s,   grad_b = column sums of grad_y

u_s and g_s are kept scaled and in the layer's dtype, so the epilogue feeds them to the tensor
cores straight from their TMA tiles and the weight gradients need no scale; nothing of size M x N
or M x K is stored. Two schedules (schedule()):
- 'fused': one launch; u_s (or g_s) is computed beside the main loop (core.lowrank_k_loop) and
  written from the tiles of column block 0.
- 'split': u_s (or g_s) as its own skinny GEMM first (lowrank.lowrank_product: one more read of x,
  2MK bytes), then the GEMM with the rank-r epilogue reading it.

Cost of the forward: 2MNK + 2MKr + 2MNr FLOPs; bytes x (MK) + W (NK) + y (MN) + A, B, u (Mr): the
low-rank path adds under 1% of the bytes at r <= 64 and K, N >= 4096, so the kernel is as
compute-bound as the base GEMM (2MNK / bytes ~ 1000 FLOP/B at 4096^3, over the H200's ~200 FLOP/B
ridge). grad_x is the same GEMM on grad_y; grad_A and grad_B reduce over M (memory-bound passes
over x and grad_y, 2MK + 2MN bytes in bf16) and cannot share grad_x's tiles without atomics across
programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpeft.settings import settings

from . import configs, fast_launch
from .core import (column_vector, gemm_setup, k_loop, load_q, load_tile, lowrank_k_loop, lowrank_term, make_desc,
                   oriented_desc, save_lr, split_halves, store_tile, tile_start)
from .dropout import dropout_mask_kernel, dropped_kernel, load_seed
from .gemm import NOT_PLANNED, Gemm, PersistentGemm
from .layout import block_r, cdiv, descriptor_ok, weight_operand
from .lowrank import lowrank_into, lowrank_product, weight_grad


@triton.jit
def _tile_with_lowrank(acc, lr, a_ptr, a_desc, w_ptr, w_desc, p_ptr, lr_ptr, lr_desc, off_m, off_n, pid_m, pid_n,
                       prev_m, M, N, K, R, stride_am, stride_ak, stride_wn, stride_wk, stride_pr, stride_pk,
                       stride_lm, lr_scale, seed, dropout_p, scale_ptr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr, LR_IN_LOOP: tl.constexpr,
                       DROPOUT_IN: tl.constexpr, EVEN_R: tl.constexpr, LR_DESC: tl.constexpr,
                       SCALE_A: tl.constexpr = False):
    """One output tile's main loop and its scaled rank-r activation (acc, lr, lr_s). LR_IN_LOOP:
    lr = (a * mask) @ p^T is computed beside the main loop when the tile's row block differs from
    the program's previous tile's (lr depends on the row block only: the extra MMA is paid once per
    row block run, not per tile), and lr_scale * lr written to lr_ptr from the tiles of column
    block 0. Otherwise lr_s is read from lr_ptr, where lowrank_product wrote it scaled, and with
    SCALE_A the main loop's a tiles are scaled by scale[k] first (core.k_loop's prologue)."""
    rows = off_m + tl.arange(0, BLOCK_M)
    if LR_IN_LOOP:
        if pid_m != prev_m:
            acc, lr = lowrank_k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, p_ptr, off_m, off_n, M, N, K, R,
                                     stride_am, stride_ak, stride_wn, stride_wk, stride_pr, stride_pk, seed,
                                     dropout_p, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, W_KMAJOR, USE_DESC, DROPOUT_IN)
        else:
            acc = k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn,
                         stride_wk, a_ptr, seed, dropout_p, K, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
        if pid_n == 0:
            save_lr(lr_ptr, lr * lr_scale, rows, M, R, stride_lm, BLOCK_R)
        lr_s = lr * lr_scale
    else:
        acc = k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn,
                     stride_wk, scale_ptr, seed, dropout_p, K, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC,
                     SCALE_A)
        lr_s = load_tile(lr_ptr, lr_desc, off_m, 0, M, R, stride_lm, 1, BLOCK_M, BLOCK_R, LR_DESC, EVEN_R)
    return acc, lr, lr_s


@triton.jit
def lora_term_piece(acc, u_s, lora_B_ptr, b_desc, rows, off_p, N, K, R, stride_bn, stride_br,
                    EPI_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_R: tl.constexpr,
                    LR_DESC: tl.constexpr, B_RMAJOR: tl.constexpr):
    """(acc + u_s B^T, cols) over the epilogue piece of EPI_N columns at off_p: z, the forward's
    output before any scale or bias (u_s [BLOCK_M, BLOCK_R] scaled; B stored [N, R] or [R, N])."""
    cols = off_p + tl.arange(0, EPI_N)
    b = load_q(lora_B_ptr, b_desc, off_p, N, R, stride_bn, stride_br, EPI_N, BLOCK_R, EVEN_R, LR_DESC, B_RMAJOR)
    return lowrank_term(acc, u_s.to(b.dtype), b, rows, cols, 0, 0.0, K, False, BLOCK_M, EPI_N), cols


@triton.jit
def lora_forward_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, lora_A_ptr, lora_B_ptr, u_ptr, scale_ptr, z_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_ar, stride_ak, stride_bn, stride_br, stride_um,
    stride_zm,
    u_scale, dropout_p,
    HAS_BIAS: tl.constexpr, W_KMAJOR: tl.constexpr, U_IN_LOOP: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_R: tl.constexpr, USE_DESC: tl.constexpr, LR_DESC: tl.constexpr, B_RMAJOR: tl.constexpr,
    OUT_SCALE: tl.constexpr, SAVE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPI_SUBTILE: tl.constexpr,
):
    """y[M, N] = x[M, K] W^T + b + u_s B^T, u_s = u_scale * (x * mask) A^T [M, R] (mask at [m, k]).

    U_IN_LOOP ('fused'): u_s computed beside the main loop and written to u_ptr; otherwise read
    from u_ptr ('split'). W stored [N, K] (W_KMAJOR, nn.Linear) or [K, N]; B stored [N, R]
    (B_RMAJOR) or [R, N]. LR_DESC: u and B tiles through tensor descriptors.
    DoRA's epilogue: with OUT_SCALE, y = scale[n] * z + b, where z = x W^T + u_s B^T (the bias
    after the scale); SAVE_Z also writes z (its backward's grad of the magnitude reads it)."""
    seed = load_seed(seed_ptr, DROPOUT)
    num_pid_m, num_pid_n, x_desc, w_desc = gemm_setup(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, stride_wk, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    y_desc = make_desc(y_ptr, M, N, stride_ym, BLOCK_M, EPI_N, USE_DESC)
    z_desc = make_desc(z_ptr, M, N, stride_zm, BLOCK_M, EPI_N, USE_DESC and SAVE_Z)
    u_desc = make_desc(u_ptr, M, R, stride_um, BLOCK_M, BLOCK_R, LR_DESC)
    b_desc = oriented_desc(lora_B_ptr, N, R, stride_bn, stride_br, EPI_N, BLOCK_R, B_RMAJOR, LR_DESC)
    prev_m = -1
    if U_IN_LOOP:  # carried across tiles: recomputed when the row block changes
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    else:
        u = 0.0  # a placeholder: u_s is read from memory
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, off_m, off_n = tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc, u, u_s = _tile_with_lowrank(acc, u, x_ptr, x_desc, w_ptr, w_desc, lora_A_ptr, u_ptr, u_desc, off_m, off_n,
                                         pid_m, pid_n, prev_m, M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk,
                                         stride_ar, stride_ak, stride_um, u_scale, seed, dropout_p, x_ptr, BLOCK_M,
                                         BLOCK_N, BLOCK_K, BLOCK_R, W_KMAJOR, USE_DESC, U_IN_LOOP, DROPOUT, EVEN_R,
                                         LR_DESC)
        if U_IN_LOOP:
            prev_m = pid_m
        rows = off_m + tl.arange(0, BLOCK_M)
        acc0, acc1 = split_halves(acc, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            off_p = off_n + piece * EPI_N
            out, cols = lora_term_piece(acc0 if piece == 0 else acc1, u_s, lora_B_ptr, b_desc, rows, off_p, N, K, R,
                                        stride_bn, stride_br, EPI_N, BLOCK_M, BLOCK_R, EVEN_R, LR_DESC, B_RMAJOR)
            if SAVE_Z:
                store_tile(z_ptr, z_desc, out, off_m, off_p, M, N, stride_zm, 1, BLOCK_M, EPI_N, USE_DESC)
            if OUT_SCALE:
                out = out * column_vector(scale_ptr, cols, N)
            if HAS_BIAS:
                out += column_vector(bias_ptr, cols, N)
            store_tile(y_ptr, y_desc, out, off_m, off_p, M, N, stride_ym, 1, BLOCK_M, EPI_N, USE_DESC)


@triton.jit
def lora_grad_x_kernel(
    grad_y_ptr, w_ptr, grad_x_ptr, lora_B_ptr, lora_A_ptr, g_ptr, seed_ptr, scale_ptr,
    M, N, K, R,
    stride_gym, stride_gyk, stride_wn, stride_wk, stride_gxm, stride_bk, stride_br, stride_an, stride_ar, stride_gm,
    g_scale, dropout_p,
    W_KMAJOR: tl.constexpr, G_IN_LOOP: tl.constexpr, DROPOUT: tl.constexpr, EVEN_R: tl.constexpr,
    USE_DESC: tl.constexpr, LR_DESC: tl.constexpr, A_RMAJOR: tl.constexpr, SCALE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPI_SUBTILE: tl.constexpr,
):
    """grad_x[M, N] = grad_y[M, K] w^T + mask * (g_s A^T^T), g_s = g_scale * grad_y B [M, R].

    In this kernel's GEMM letters N is the layer's in_features and K its out_features: w is the
    logical [N, K] = W^T (W stored [out, in]: not W_KMAJOR), B is [K, R] (its strides stride_bk,
    stride_br), A^T is the [N, R] factor of the epilogue (A stored [R, N]: not A_RMAJOR). mask: the
    forward's keep-mask at [m, n] of x (row length N), on the rank-r term only.
    G_IN_LOOP ('fused'): g_s computed beside the main loop and written to g_ptr; otherwise read.
    SCALE_G (read g_s only): grad_y's columns scaled by scale[k] in the main loop's prologue, DoRA's
    (c grad_y) W with c = m / n, where the caller's g_s is already s (c grad_y) B: no M x N or
    N x K temporary, the scale a register multiply per grad_y tile."""
    seed = load_seed(seed_ptr, DROPOUT)
    num_pid_m, num_pid_n, gy_desc, w_desc = gemm_setup(grad_y_ptr, w_ptr, M, N, K, stride_gym, stride_wn, stride_wk,
                                                       BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    gx_desc = make_desc(grad_x_ptr, M, N, stride_gxm, BLOCK_M, EPI_N, USE_DESC)
    g_desc = make_desc(g_ptr, M, R, stride_gm, BLOCK_M, BLOCK_R, LR_DESC)
    a_desc = oriented_desc(lora_A_ptr, N, R, stride_an, stride_ar, EPI_N, BLOCK_R, A_RMAJOR, LR_DESC)
    prev_m = -1
    if G_IN_LOOP:  # carried across tiles: recomputed when the row block changes
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    else:
        g = 0.0  # a placeholder: g_s is read from memory
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, off_m, off_n = tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # B^T is the in-loop factor p ([R, K]): B's strides swapped, no copy.
        acc, g, g_s = _tile_with_lowrank(acc, g, grad_y_ptr, gy_desc, w_ptr, w_desc, lora_B_ptr, g_ptr, g_desc, off_m,
                                         off_n, pid_m, pid_n, prev_m, M, N, K, R, stride_gym, stride_gyk, stride_wn,
                                         stride_wk, stride_br, stride_bk, stride_gm, g_scale, seed, dropout_p, scale_ptr,
                                         BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, W_KMAJOR, USE_DESC, G_IN_LOOP, False,
                                         EVEN_R, LR_DESC, SCALE_G)
        if G_IN_LOOP:
            prev_m = pid_m
        rows = off_m + tl.arange(0, BLOCK_M)
        acc0, acc1 = split_halves(acc, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            off_p = off_n + piece * EPI_N
            a = load_q(lora_A_ptr, a_desc, off_p, N, R, stride_an, stride_ar, EPI_N, BLOCK_R, EVEN_R, LR_DESC, A_RMAJOR)
            out = lowrank_term(acc0 if piece == 0 else acc1, g_s.to(a.dtype), a, rows, off_p + tl.arange(0, EPI_N),
                               seed, dropout_p, N, DROPOUT, BLOCK_M, EPI_N)
            store_tile(grad_x_ptr, gx_desc, out, off_m, off_p, M, N, stride_gxm, 1, BLOCK_M, EPI_N, USE_DESC)


_FORWARD = PersistentGemm(lora_forward_kernel)
_GRAD_X = PersistentGemm(lora_grad_x_kernel)


def schedule(M: int, r: int) -> str:
    """'fused' (one launch: the rank-r product inside the GEMM's K loop) or 'split' (the rank-r
    product as its own skinny GEMM first, then the base GEMM with a rank-r epilogue).
    settings.lora_schedule ("fused" or "split"; FUSEDPEFT_LORA_SCHEDULE) overrides. The rule comes
    from the H100 measurements in benchmarks/RESULTS.md: at M <= 64 the layer is bound by reading
    W and the in-loop product is free, while one more launch is not; at large M the in-loop MMA
    (N = r) stalls the tensor-core pipeline more than a separate pass over x (2MK bytes) costs.
    Above r = 64 the in-loop product keeps a [BLOCK_R, BLOCK_K] slice of A per pipeline stage
    (64 KB and more at the small-M tiles' BLOCK_K of 128-256), which the small-M configs cannot
    hold beside their own: split."""
    forced = settings.lora_schedule
    if forced in ("fused", "split"):
        return forced
    return "fused" if M <= 64 and r <= 64 else "split"


def _rmajor(q):
    """(q in the orientation its descriptor reads, R-major): q ([C, R] logical) as stored with a
    unit stride, or None when neither stride is 1 (then only pointer loads take it)."""
    if q.stride(1) == 1:
        return q, True
    if q.stride(0) == 1:
        return q.T, False
    return None, False


def _launch_lora(gemm, a, w_mat, out, p, q, lr, lr_scale, seed, dropout_p, *, bias, in_loop, dropout_arg,
                 out_scale=None, z=None, a_scale=None):
    """One launch of lora_forward_kernel or lora_grad_x_kernel: out = a @ w_mat^T (+ bias) + the
    rank-r term (see each kernel; p: [R, K] for the in-loop product, q: [N, R] for the epilogue,
    lr: [M, R] written or read). The forward's DoRA epilogue: out_scale [N] (float32) scales the
    result before the bias, and z [M, N] receives it unscaled. grad_x's a_scale [K] (read lr
    only): a's columns scaled by it in the main loop's prologue. When no tile config can hold the
    rank-r epilogue, the GEMM runs alone and the update follows (_lowrank_apart)."""
    M, K = a.shape
    N, R = q.shape
    w, w_kmajor, stride_wn, stride_wk = weight_operand(w_mat)
    dropout = dropout_p > 0
    forward = gemm is _FORWARD
    tensors = ((a, w, out, a if bias is None else bias, p, q, lr, a if out_scale is None else out_scale,
                a if z is None else z, seed if dropout else a) if forward
               else (a, w, out, p.T, q.T, lr, seed if dropout else a, a if a_scale is None else a_scale))
    scalars = (float(lr_scale), float(dropout_p))
    plan_key = None
    if fast_launch.enabled():
        meta = fast_launch.meta
        plan_key = (a.get_device(), meta(a), meta(w), meta(out), meta(bias), meta(p), meta(q), meta(lr),
                    meta(out_scale), meta(z), meta(a_scale), in_loop, dropout, settings.generation)
        if gemm.replay(plan_key, tensors, scalars) is not NOT_PLANNED:
            return out
    dora_epilogue = out_scale is not None or z is not None
    if a_scale is not None and in_loop:
        raise ValueError("_launch_lora: a_scale scales the main loop's a tiles only where lr is read (not in_loop)")
    if settings.separate_lowrank and not in_loop and not dora_epilogue and a_scale is None:
        return _lowrank_apart(a, w_mat, out, bias, q, lr, seed, dropout_p, dropout_arg)
    q_stored, q_rmajor = _rmajor(q)
    lr_desc = bool(settings.lowrank_tma and not in_loop and q_stored is not None and descriptor_ok(lr, q_stored))
    use_desc = descriptor_ok(a, w, out)
    # The forward takes A as p ([R, K]); grad_x takes B ([K, R]) for p = B^T: p's strides swapped.
    p_strides = (p.stride(0), p.stride(1)) if forward else (p.stride(1), p.stride(0))
    ints = (M, N, K, R, a.stride(0), a.stride(1), stride_wn, stride_wk, out.stride(0), *p_strides,
            q.stride(0), q.stride(1), lr.stride(0))
    if forward:
        ints = (*ints, 0 if z is None else z.stride(0))
    flags = dict(W_KMAJOR=w_kmajor, DROPOUT=dropout, EVEN_R=R == block_r(R), USE_DESC=use_desc, LR_DESC=lr_desc,
                 BLOCK_R=block_r(R))
    if forward:
        flags.update(HAS_BIAS=bias is not None, U_IN_LOOP=in_loop, B_RMAJOR=q_rmajor, OUT_SCALE=out_scale is not None,
                     SAVE_Z=z is not None)
    else:
        flags.update(G_IN_LOOP=in_loop, A_RMAJOR=q_rmajor, SCALE_G=a_scale is not None)
    try:
        gemm.launch(plan_key, tensors, ints, scalars, flags,
                    Gemm(M, N, K, a.dtype, a.element_size(), descriptors=use_desc or lr_desc, in_loop=in_loop,
                         scales_a=a_scale is not None))
    except configs.NoConfigFits:
        if in_loop:
            raise
        if dora_epilogue:
            return _dora_apart(a, w_mat, out, bias, q, lr, out_scale, z)
        if a_scale is not None:  # the scaled a formed whole (M x K), then the unscaled fallback
            a = torch.mul(a, a_scale.to(a.dtype))
        return _lowrank_apart(a, w_mat, out, bias, q, lr, seed, dropout_p, dropout_arg)
    return out


def _lowrank_apart(a, w_mat, out, bias, q, lr, seed, dropout_p, mask_on_term):
    """out = a @ w^T + bias by cuBLAS, then out += mask * (lr @ q^T) (lr carries its scale; the
    mask at output positions when ``mask_on_term``): the fallback for ranks whose epilogue tiles no
    config can hold beside the main loop (r = 256 in bf16 and r >= 100 in fp32 at large M on the
    H100). It costs one more read and write of out (4MN bytes in bf16)."""
    torch.addmm(bias, a, w_mat.T, out=out) if bias is not None else torch.mm(a, w_mat.T, out=out)
    return lowrank_into(out, lr, q, 1.0, seed, dropout_p if mask_on_term else 0.0)


def _dora_apart(a, w_mat, out, bias, q, lr, out_scale, z):
    """The DoRA epilogue's fallback for ranks no config holds: z = a @ w^T + lr @ q^T by cuBLAS and
    the rank-r update, then out = out_scale * z + bias."""
    z_full = _lowrank_apart(a, w_mat, torch.empty_like(out) if z is None else z, None, q, lr, None, 0.0, False)
    scale = out_scale.to(out.dtype) if out_scale is not None else 1.0
    torch.mul(z_full, scale, out=out)
    return out if bias is None else out.add_(bias)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    u_s = torch.empty(M, r, dtype=x.dtype, device=x.device)  # s * drop(x) A^T
    s = scaling / (1.0 - dropout_p)
    fused = schedule(M, r) == "fused"
    if not fused:
        lowrank_product(x, lora_A, u_s, s, seed, dropout_p)
    _launch_lora(_FORWARD, x, weight, y, lora_A, lora_B, u_s, s, seed, dropout_p if fused else 0.0, bias=bias,
                 in_loop=fused, dropout_arg=False)
    return y, (u_s,)


def backward(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, needs, saved, grad_dtypes=(None, None),
             grad_x_scale=None):
    """grad_x_scale [N] (float32): grad_x from (grad_y * grad_x_scale) W, the scale applied to grad_y's
    tiles as grad_x's GEMM loads them (DoRA's c = m / n, whose caller passes B scaled alike: g_s =
    s (c grad_y) B = s grad_y (c B)); it takes the split schedule."""
    need_x, need_w, need_b, need_A, need_B = needs
    (u_s,) = saved  # s * drop(x) A^T
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    s = scaling / (1.0 - dropout_p)
    grad_x = grad_w = grad_b = grad_A = grad_B = None
    if need_x or need_A:
        g_s = torch.empty(M, r, dtype=grad_y.dtype, device=x.device)  # s * grad_y B
        fused = need_x and schedule(M, r) == "fused" and grad_x_scale is None
        if not fused:
            lowrank_product(grad_y, lora_B.T, g_s, s)
        if need_x:  # without it (a frozen input: the first layer over frozen embeddings) g_s alone
            grad_x = torch.empty(M, K, dtype=x.dtype, device=x.device)
            _launch_lora(_GRAD_X, grad_y, weight.T, grad_x, lora_B.T, lora_A.T, g_s, s, seed, dropout_p, bias=None,
                         in_loop=fused, dropout_arg=True, a_scale=grad_x_scale)
    if need_A:  # grad_A = s g^T drop(x) = g_s^T drop(x)
        # In the caller's dtype for it (float32 masters): the reduction stores in out's dtype.
        grad_A = torch.empty(r, K, dtype=grad_dtypes[0] or lora_A.dtype, device=x.device)
        weight_grad(x, g_s, grad_A, scale=1.0, transpose_out=True, seed=seed, dropout_p=dropout_p)
    if need_B or need_b:  # grad_B = s grad_y^T u = grad_y^T u_s
        grad_B = torch.empty(N, r, dtype=grad_dtypes[1] or lora_B.dtype, device=x.device)
        grad_b = torch.empty(N, dtype=grad_y.dtype, device=x.device) if need_b else None
        weight_grad(grad_y, u_s, grad_B, scale=1.0, transpose_out=False, colsum=grad_b)
        if not need_B:
            grad_B = None
    if need_w:  # only when the user unfroze the base weight: one plain GEMM
        grad_w = grad_y.T @ x
    return grad_x, grad_w, grad_b, grad_A, grad_B


def dropped(x, seed, p):
    """drop(x) = x * mask / (1 - p) in x's dtype (2-D x), with the mask the kernels draw for (seed,
    x's shape, p), in one pass over x."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, C = x.shape
    out = torch.empty(M, C, dtype=x.dtype, device=x.device)
    if M and C:
        seed = torch.as_tensor(seed, dtype=torch.int64, device=x.device).reshape(1)
        BLOCK_M, BLOCK_C = 16, 128  # 2048 elements a program; BLOCK_C a multiple of dropout_keep's 8
        fast_launch.cached_launch(dropped_kernel, (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)),
                                  (x, out, M, C, x.stride(0), out.stride(0), seed, float(p), 1.0 / (1.0 - p)),
                                  dict(BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C), num_warps=4, num_stages=3)
    return out


def dropout_mask(seed, shape, p, device):
    """The 0/1 keep-mask (float32) the kernels draw for (seed, shape, p); seed: the op's seed
    tensor (or an int)."""
    M, C = shape
    out = torch.empty(M, C, dtype=torch.float32, device=device)
    if M and C:
        BLOCK = 64
        seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
        dropout_mask_kernel[(M, cdiv(C, BLOCK))](out, M, C, seed, float(p), BLOCK=BLOCK)
    return out
