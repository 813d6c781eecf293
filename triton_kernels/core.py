"""The pieces every GEMM entry kernel is built from (``@triton.jit`` helpers, inlined by Triton).

Each entry kernel (lora.py, lowrank.py, rescale.py) computes ``out[M, N] = a[M, K] @ w^T`` plus
its own extras, on the same schedule:

    for each output tile of this program (persistent grid, tile_coords' grouped order):
        acc = k_loop(...)                     the main loop: BLOCK_M x BLOCK_N x BLOCK_K MMAs
        (lowrank_k_loop adds the rank-r product lr = a @ p^T beside it)
        epilogue on acc: the method's pieces (lowrank_term, column_vector, reduce_columns), then
                         store_tile; in two BLOCK_N / 2 halves with EPI_SUBTILE (split_halves)

Operands in GEMM terms: ``a`` [M, K] the streamed input (x, or grad_y in a backward), ``w`` the
logical [N, K] weight (stored [N, K], "K-major" as nn.Linear keeps it, or [K, N]: ``W_KMAJOR``),
``p`` [R, K] the rank-r factor multiplied in the K loop, ``q`` [N, R] the one multiplied in the
epilogue, ``lr`` [M, R] the rank-r activation between them.

Schedule. One program per SM walks output tiles in grouped order (GROUP_M row blocks sweep the
columns together, so the w tiles in flight stay in L2). Loads go through device-side tensor
descriptors (TMA on Hopper) where every operand allows it (``USE_DESC``: 16-byte-aligned bases and
row strides, unit last stride), else through masked pointer loads.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .dropout import dropout_keep

# Triton's CPU interpreter (3.9) multiplies bfloat16 dot operands, and bfloat16 tensors
# elementwise, as their uint16 storage. Under the interpreter both are widened to float32 first:
# bf16 x bf16 products are exact in float32, so this reproduces the GPU's result.
_WIDEN_16BIT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr = False):
    """acc + a @ b with fp32 accumulation (tensor cores on the GPU; tf32 for fp32 inputs).

    IEEE: full fp32 for fp32 inputs (no tf32; no effect on 16-bit inputs). Used for the rank-r
    products u = x A^T and grad_y B of fp32 layers: at small r each entry of the adapter's
    gradient is scaled by one long dot product, and tf32's 10-bit inputs lose it when that sum
    cancels (an H100 test saw 23% error in grad_A at M = r = 1). They are 2MKr of the layer's
    2MNK FLOPs, so the slower non-tensor-core path costs little."""
    if _WIDEN_16BIT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M consecutive row blocks sweep the columns together."""
    num_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size)
    pid_n = (tile_id % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def load_tile(ptr, desc, r0, c0, R, C, stride_r, stride_c,
              BR: tl.constexpr, BC: tl.constexpr, USE_DESC: tl.constexpr, EVEN_C: tl.constexpr = False):
    """[BR, BC] tile at (r0, c0) of an R x C matrix; out-of-range entries read as zero. EVEN_C: the
    tile spans all C columns exactly (c0 = 0, C = BC), so only rows are masked and the pointer
    loads vectorise along a unit column stride (the rank-r tiles at R = BLOCK_R)."""
    # One return per function: Triton compiles both sides of a constexpr branch's fall-through.
    if USE_DESC:
        tile = desc.load([r0, c0])
    else:
        rows = r0 + tl.arange(0, BR)
        cols = c0 + tl.arange(0, BC)
        mask = rows[:, None] < R
        if not EVEN_C:
            mask = mask & (cols[None, :] < C)
        tile = tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    return tile


@triton.jit
def make_desc(ptr, R, C, stride_r, BR: tl.constexpr, BC: tl.constexpr, USE_DESC: tl.constexpr):
    """A tensor descriptor of an R x C matrix with unit column stride, read in [BR, BC] blocks; the
    pointer itself without USE_DESC."""
    if USE_DESC:
        desc = tl.make_tensor_descriptor(ptr, shape=[R, C], strides=[stride_r, 1], block_shape=[BR, BC])
    else:
        desc = ptr
    return desc


@triton.jit
def oriented_desc(ptr, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr, ROW_MAJOR: tl.constexpr,
                  USE_DESC: tl.constexpr):
    """The descriptor of a logical R x C matrix in its stored orientation: [R, C] with unit column
    stride (ROW_MAJOR; w "K-major" as nn.Linear keeps it, q = B as stored) or [C, R] with unit row
    stride (W^T as grad_x reads it, q = A^T), read in [BR, BC] blocks (or their transpose)."""
    if ROW_MAJOR:
        desc = make_desc(ptr, R, C, stride_r, BR, BC, USE_DESC)
    else:
        desc = make_desc(ptr, C, R, stride_c, BC, BR, USE_DESC)
    return desc


@triton.jit
def gemm_setup(a_ptr, w_ptr, M, N, K, stride_am, stride_wn, stride_wk, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr):
    """What every persistent entry kernel starts with: (num_pid_m, num_pid_n), its grid of output
    tiles, and the main loop's descriptors a ([M, K], unit column stride) and w (logical [N, K])."""
    a_desc = make_desc(a_ptr, M, K, stride_am, BLOCK_M, BLOCK_K, USE_DESC)
    w_desc = oriented_desc(w_ptr, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    return tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), a_desc, w_desc


@triton.jit
def tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n, off_m, off_n) of a persistent program's tile_id-th output tile (grouped order)."""
    pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
    return pid_m, pid_n, pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def mma_weight(acc, a, w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr,
               IEEE: tl.constexpr = False):
    """acc += a @ (w tile as [BLOCK_K, BLOCK_N]), w stored [N, K] (K-major) or [K, N]."""
    if W_KMAJOR:
        w = load_tile(w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, USE_DESC).T
    else:
        w = load_tile(w_ptr, w_desc, off_k, off_n, K, N, stride_wk, stride_wn, BLOCK_K, BLOCK_N, USE_DESC)
    return mma(a, w, acc, IEEE)


@triton.jit
def k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
           scale_ptr, seed, dropout_p, mask_ld,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KMAJOR: tl.constexpr,
           USE_DESC: tl.constexpr, SCALE_A: tl.constexpr = False, MASK_A: tl.constexpr = False,
           IEEE: tl.constexpr = False):
    """acc + a[off_m:, :] @ w[off_n:, :]^T over the whole K, one BLOCK_K step at a time. Two
    optional prologues on each a tile, applied in registers and never stored:
    SCALE_A   a[:, k] * scale[k] (IA3's input scaling; grad_y * l in output scaling's grad_x);
    MASK_A    a * dropout keep-mask at [m, k] (row length mask_ld): the skinny u = drop(x) A^T."""
    for ki in range(tl.cdiv(K, BLOCK_K)):
        off_k = ki * BLOCK_K
        a = load_tile(a_ptr, a_desc, off_m, off_k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_DESC)
        if SCALE_A:
            # a * scale[k] in a's dtype (mul.bf16x2 on Hopper): the exact product of two 16-bit
            # floats fits float32, so one rounding gives what the unfused (x * l) gives.
            # By pointer (cp.async): a 1-D descriptor (TMA) was 7-13% slower (benchmarks/RESULTS.md).
            cols_k = off_k + tl.arange(0, BLOCK_K)
            s = tl.load(scale_ptr + cols_k, mask=cols_k < K, other=0.0)
            if _WIDEN_16BIT:
                a = (a.to(tl.float32) * s[None, :].to(tl.float32)).to(a.dtype)
            else:
                a = a * s[None, :].to(a.dtype)
        if MASK_A:
            rows = off_m + tl.arange(0, BLOCK_M)
            cols_k = off_k + tl.arange(0, BLOCK_K)
            a = tl.where(dropout_keep(seed, rows, cols_k, mask_ld, dropout_p), a, 0.0)
        acc = mma_weight(acc, a, w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk,
                         BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC, IEEE)
    return acc


@triton.jit
def gemm_tile(a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KMAJOR: tl.constexpr,
              USE_DESC: tl.constexpr):
    """The float32 output tile a[off_m:, :] @ w[off_n:, :]^T, no prologue: k_loop from zero."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
                  a_ptr, 0, 0.0, 1, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)


@triton.jit
def lowrank_k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, p_ptr, off_m, off_n, M, N, K, R,
                   stride_am, stride_ak, stride_wn, stride_wk, stride_pr, stride_pk, seed, dropout_p,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr, DROPOUT: tl.constexpr):
    """(acc + a @ w^T, lr) with lr = (a * mask) @ p^T computed from the same a tiles: the rank-r
    product rides along the main loop (BLOCK_M x R x BLOCK_K more MMA per step, R / BLOCK_N of the
    base's work). p ([R, K], a few KB) is read by pointer with any strides, so B^T needs no copy.
    DROPOUT masks a (at [m, k], row length K) for the rank-r product only. fp32 inputs take the
    rank-r product in full fp32 (mma's IEEE)."""
    lr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    rows = off_m + tl.arange(0, BLOCK_M)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        off_k = ki * BLOCK_K
        a = load_tile(a_ptr, a_desc, off_m, off_k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_DESC)
        acc = mma_weight(acc, a, w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk,
                         BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
        p = load_tile(p_ptr, p_ptr, 0, off_k, R, K, stride_pr, stride_pk, BLOCK_R, BLOCK_K, False)
        if DROPOUT:
            cols_k = off_k + tl.arange(0, BLOCK_K)
            a = tl.where(dropout_keep(seed, rows, cols_k, K, dropout_p), a, 0.0)
        lr = mma(a, p.T, lr, a_ptr.dtype.element_ty == tl.float32)
    return acc, lr


@triton.jit
def load_q(q_ptr, q_desc, off_n, N, R, stride_qn, stride_qr, QBN: tl.constexpr, BLOCK_R: tl.constexpr,
           EVEN_R: tl.constexpr, LR_DESC: tl.constexpr, Q_RMAJOR: tl.constexpr):
    """The [QBN, BLOCK_R] tile of q at row off_n, out-of-range entries zero. By descriptor q is
    read in its stored orientation; by pointer with any strides (grad_x's q = A^T, no copy)."""
    if LR_DESC and not Q_RMAJOR:
        q = q_desc.load([0, off_n]).T
    else:
        q = load_tile(q_ptr, q_desc, off_n, 0, N, R, stride_qn, stride_qr, QBN, BLOCK_R, LR_DESC, EVEN_R)
    return q


@triton.jit
def lowrank_term(acc, lr_s, q, rows, cols_n, seed, dropout_p, mask_ld,
                 DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + lr_s @ q^T, the LoRA term of one output tile (lr_s: [BLOCK_M, BLOCK_R], scaled, in
    q's dtype; q: [BLOCK_N, BLOCK_R]): one BLOCK_M x BLOCK_N x R MMA. With DROPOUT the term is
    masked by the keep-mask at [rows, cols_n] (row length mask_ld), which needs it apart from acc;
    otherwise it accumulates straight into acc."""
    if DROPOUT:
        low = mma(lr_s, q.T, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        acc += tl.where(dropout_keep(seed, rows, cols_n, mask_ld, dropout_p), low, 0.0)
    else:
        acc = mma(lr_s, q.T, acc)
    return acc


@triton.jit
def save_lr(lr_ptr, lr, rows, M, R, stride_lm, BLOCK_R: tl.constexpr):
    """lr ([BLOCK_M, BLOCK_R], already scaled) to lr_ptr's rows, in lr_ptr's dtype."""
    r_idx = tl.arange(0, BLOCK_R)
    tl.store(lr_ptr + rows[:, None] * stride_lm + r_idx[None, :], lr.to(lr_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (r_idx[None, :] < R))


@triton.jit
def split_halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_SUBTILE: tl.constexpr):
    """The epilogue's pieces: acc's two [BLOCK_M, BLOCK_N / 2] column halves with EPI_SUBTILE (the
    epilogue's shared memory, its store tile and the q tile, halves: what lets the 128 x 256 x 64,
    3-stage main loop fit beside a rank-64 epilogue in 227 KB), else acc twice (one piece)."""
    if EPI_SUBTILE:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    else:
        acc0 = acc
        acc1 = acc
    return acc0, acc1


@triton.jit
def column_vector(ptr, cols_n, N):
    """[1, BN] float32 row of a per-column vector (bias, scale, shift); zero past N."""
    v = tl.load(ptr + cols_n, mask=cols_n < N, other=0.0)
    return v[None, :].to(tl.float32)


@triton.jit
def store_tile(out_ptr, out_desc, acc, off_m, off_n, M, N, stride_om, stride_on,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr):
    """acc in out's dtype to out[off_m:, off_n:] (by descriptor: an asynchronous TMA store)."""
    out = acc.to(out_ptr.dtype.element_ty)
    if USE_DESC:
        out_desc.store([off_m, off_n], out)
    else:
        rows = off_m + tl.arange(0, BLOCK_M)
        cols_n = off_n + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + rows[:, None] * stride_om + cols_n[None, :] * stride_on, out,
                 mask=(rows[:, None] < M) & (cols_n[None, :] < N))


@triton.jit
def reduce_columns(acc, other_ptr, other_desc, partial_ptr, off_m, off_n, pid_m, num_pid_m, M, N,
                   stride_om, stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   OTHER_DESC: tl.constexpr, SUM_OTHER: tl.constexpr):
    """partial[0, pid_m, n] = sum over the tile's rows of acc * other, and with SUM_OTHER
    partial[1, pid_m, n] = the sum of other. Rows past M read other as 0, so they add nothing. One
    tile per (pid_m, columns): each partial entry is written exactly once, no atomics; the host
    sums the row blocks in order (deterministic)."""
    other = load_tile(other_ptr, other_desc, off_m, off_n, M, N, stride_om, stride_on, BLOCK_M, BLOCK_N,
                      OTHER_DESC).to(tl.float32)
    cols_n = off_n + tl.arange(0, BLOCK_N)
    col_mask = cols_n < N
    tl.store(partial_ptr + pid_m * N + cols_n, tl.sum(acc * other, axis=0), mask=col_mask)
    if SUM_OTHER:
        tl.store(partial_ptr + (num_pid_m + pid_m) * N + cols_n, tl.sum(other, axis=0), mask=col_mask)
