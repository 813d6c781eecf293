"""Per-row adapters from a bank of slots (serving), on 2-D inputs: the Triton backends of
fusedpeft.ops.multi_lora_linear / multi_ia3_linear (the op layer checks the arguments).

LoRA, y[m] = x[m] W^T + b + s[i] (x[m] A[i]^T) B[i]^T, i = idx[m] (-1: none); the bank is A (S, R, K),
B (S, N, R), zero past each slot's rank, whose loads are masked off (a rank-8 slot reads rank-8
bytes beside rank-64 ones). The schedules, each a backend of the op, so that which runs at a shape
is measured (fusedpeft.tuning):

- decode (few rows, each its own adapter), ``bgmv``: cuBLAS's base GEMM, then ``bgmv_shrink_kernel``
  (u[m] = s[i] x[m] A[i]^T: one program per (row, rank chunk) reads the row and A[i]'s chunk, r K
  bytes) and ``bgmv_expand_kernel`` (y[m, n] += u[m] B[i][n]^T: per (row, column block)), the
  shrink-and-expand baseline vLLM runs. Memory-bound: the base reads W (2NK bytes in bf16) once for
  all rows; the adapters add, per distinct slot in the batch, 2rK + 2Nr bytes (from L2 for rows
  sharing a slot) and y is read and written once more (4MN). ``bgmv_one``: the same bytes with the
  shrink and the expand in one launch (``bgmv_one_kernel``), each column chunk of a row computing
  the row's u itself.
- prefill (many rows per adapter), ``sgmv_cublas``: the shrink and the expand around cuBLAS's base
  GEMM (``lora_grouped``, below).
- prefill, ``triton``: ``sgmv_kernel``, the base GEMM with the shrink and the expand fused, y
  written once. Rows are grouped by slot on the GPU (a stable sort of idx, counts, the
  row-tile table: no host sync, so it can be captured in a CUDA graph), each row tile holds rows of
  one slot, and a tile's K loop runs the base MMA and the rank-R one on the same gathered x tile;
  the epilogue adds s[i] lr B[i]^T and scatters the rows back to their places. The rank-R MMA is
  R / BLOCK_N of the base's tensor-core work; the bytes are the base's plus A[i] per tile.

IA3, per-row scales L (S, N) after the GEMM (output scaling) or (S, K) on the x tile before it
(input scaling): ``multi_ia3_kernel``, the base GEMM with the row's scale gathered in the prologue
or the epilogue, one launch, nothing materialised.
"""
from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from fusedpeft.ops.multi_lora import stacked_weight

from . import fast_launch, layout
from .core import mma
from .layout import block_r, cdiv

# ----------------------------------------------------------------------------- decode: BGMV


@triton.jit
def row_shrink(x_ptr, a_ptr, m, i, r_idx, r_ok, K, stride_xm, stride_as, stride_ar,
               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """x[m] A[i, r_idx]^T in float32 over all of K (the ranks past r_ok masked off): one row's
    shrink on CUDA cores, BLOCK_K columns of x and of A's rows a step."""
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + i * stride_as + r_idx[:, None] * stride_ar + k[None, :],
                    mask=r_ok[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    return acc


@triton.jit
def bgmv_shrink_kernel(
    x_ptr, a_ptr, u_ptr, idx_ptr, scale_ptr, rank_ptr,
    K, R, stride_xm, stride_as, stride_ar, stride_um,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u[m, r0:r0 + BLOCK_R] = scale[i] * x[m] A[i, r0:r0 + BLOCK_R]^T (float32), i = idx[m]; a row
    without an adapter, or a chunk past the slot's rank, writes zeros."""
    m = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1) * BLOCK_R
    i = tl.load(idx_ptr + m).to(tl.int64)
    r_idx = r0 + tl.arange(0, BLOCK_R)
    rank = tl.load(rank_ptr + tl.maximum(i, 0))
    live = (i >= 0) & (r0 < rank)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if live:
        acc = row_shrink(x_ptr, a_ptr, m, i, r_idx, r_idx < rank, K, stride_xm, stride_as, stride_ar, BLOCK_K, BLOCK_R)
        acc = acc * tl.load(scale_ptr + i)
    tl.store(u_ptr + m * stride_um + r_idx, acc, mask=r_idx < R)


@triton.jit
def bgmv_expand_kernel(
    y_ptr, u_ptr, b_ptr, idx_ptr, rank_ptr,
    N, stride_ym, stride_um, stride_bs, stride_bn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, n] += sum_{r < rank[i]} u[m, r] B[i, n, r] over one block of columns, i = idx[m]."""
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.load(idx_ptr + m).to(tl.int64)
    if i >= 0:
        rank = tl.load(rank_ptr + i)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(u_ptr + m * stride_um + r, mask=r < rank, other=0.0)
            b = tl.load(b_ptr + i * stride_bs + n[:, None] * stride_bn + r[None, :],
                        mask=(n[:, None] < N) & (r[None, :] < rank), other=0.0).to(tl.float32)
            acc += tl.sum(b * u[None, :], axis=1)
        here = y_ptr + m * stride_ym + n
        y = tl.load(here, mask=n < N, other=0.0).to(tl.float32)
        tl.store(here, (y + acc).to(y_ptr.dtype.element_ty), mask=n < N)


def _bgmv(y, x, lora_A, lora_B, scalings, ranks, idx):
    """y += s[i] (x A[i]^T) B[i]^T row by row, in place (the decode schedule's adapter part)."""
    M, K = x.shape
    N, R = y.shape[1], lora_A.shape[1]
    interp = layout.interpreting()
    BLOCK_R = 16
    u = torch.empty(M, cdiv(R, BLOCK_R) * BLOCK_R, dtype=torch.float32, device=x.device)
    fast_launch.cached_launch(
        bgmv_shrink_kernel, (M, cdiv(R, BLOCK_R)),
        (x, lora_A, u, idx, scalings, ranks, K, R, x.stride(0), lora_A.stride(0), lora_A.stride(1), u.stride(0)),
        dict(BLOCK_K=32 if interp else 256, BLOCK_R=BLOCK_R), num_warps=4, num_stages=3)
    BLOCK_N = 32 if interp else 128
    fast_launch.cached_launch(
        bgmv_expand_kernel, (M, cdiv(N, BLOCK_N)),
        (y, u, lora_B, idx, ranks, N, y.stride(0), u.stride(0), lora_B.stride(0), lora_B.stride(1)),
        dict(BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R), num_warps=4, num_stages=3)
    return y


@triton.jit
def bgmv_one_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, idx_ptr, scale_ptr, rank_ptr,
    K, N, n_chunk,
    stride_ym, stride_xm, stride_as, stride_ar, stride_bs, stride_bn,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, chunk] += s[i] (x[m] A[i]^T) B[i][chunk]^T for row m and one chunk of n_chunk columns, i =
    idx[m] (nothing for -1): the shrink and the expand in one launch. Each of a row's column chunks
    computes the row's u itself (K r multiply-adds on CUDA cores), re-reading A[i] from L2, so u
    never goes to memory and no program waits on another."""
    m = tl.program_id(0).to(tl.int64)
    n_lo = tl.program_id(1) * n_chunk
    i = tl.load(idx_ptr + m).to(tl.int64)
    rank = tl.load(rank_ptr + tl.maximum(i, 0)) * (i >= 0)
    if rank > 0:
        r_idx = tl.arange(0, BLOCK_R)
        r_ok = r_idx < rank
        u = row_shrink(x_ptr, a_ptr, m, i, r_idx, r_ok, K, stride_xm, stride_as, stride_ar, BLOCK_K, BLOCK_R)
        u = u * tl.load(scale_ptr + i)
        n_hi = tl.minimum(n_lo + n_chunk, N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < n_hi
            b = tl.load(b_ptr + i * stride_bs + n[:, None] * stride_bn + r_idx[None, :],
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            here = y_ptr + m * stride_ym + n
            y = tl.load(here, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(here, (y + tl.sum(b * u[None, :], axis=1)).to(y_ptr.dtype.element_ty), mask=n_ok)


def lora_bgmv_one(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """The decode schedule in two launches: cuBLAS's base GEMM, then bgmv_one_kernel adding each
    row's rank-r term. Bytes past the base: per distinct slot in the batch A[i] and B[i] (2 r (K +
    N) in 16-bit types) from HBM once, then from L2 for every further row and column chunk; y read
    and written once more (4 M N). The columns are cut into chunks so that about two programs per
    SM run; each chunk re-reads its row's A[i] from L2 (at 64 rows of a 4096 x 4096 layer, r = 16:
    5 chunks, 40 MiB of L2 reads against 4.5 MiB from HBM)."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    M, K = x.shape
    if M == 0 or K == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    N, R = y.shape[1], lora_A.shape[1]
    interp = layout.interpreting()
    BLOCK_R = block_r(R)
    # A and B tiles of 8192 and 4096 float32 values a step (64 and 32 a thread at 4 warps)
    BLOCK_K = 32 if interp else max(64, 8192 // BLOCK_R)
    BLOCK_N = 32 if interp else max(32, 4096 // BLOCK_R)
    target = 4 if interp else 2 * layout.num_sms(x.device.index or 0)
    chunks = max(1, min(cdiv(N, BLOCK_N), cdiv(target, M)))
    n_chunk = cdiv(cdiv(N, chunks), BLOCK_N) * BLOCK_N
    fast_launch.cached_launch(
        bgmv_one_kernel, (M, cdiv(N, n_chunk)),
        (y, x, lora_A, lora_B, adapter_index, scalings, ranks, K, N, n_chunk, y.stride(0), x.stride(0),
         lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1)),
        dict(BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R), num_warps=4, num_stages=1 if interp else 3)
    return y


# ----------------------------------------------------------------------------- decode: the shrink in the base GEMM
# A bank whose A slots lie in memory right after the base weight's rows (the serving layers
# allocate them so: fusedpeft.serving.layers) makes [W; A[0]; ...; A[S-1]] one (N + S R) x K matrix.
# One cuBLAS GEMM with it gives every row x W^T and x A[s]^T for every slot s: the shrink costs the
# GEMM S R more rows of K, which at decode (the GEMM bound by reading its matrix) is 2 S R K more
# bytes and no launch (32 slots of rank 16 at K = 4096: +4 MiB on W's 32 MiB). A row's u is then a
# gather from the GEMM's output, done by the expand. Two launches, where bgmv makes three and
# sgmv_cublas three; at prefill the S R extra output columns are S R / N more tensor-core work for
# every row, whatever its slot, and the tuner measures it against the grouped schedules. The op's
# stacked_weight gives the view.
@triton.jit
def stacked_expand_kernel(
    y_ptr, out_ptr, b_ptr, bias_ptr, idx_ptr, scale_ptr, rank_ptr,
    N, R, stride_ym, stride_om, stride_bs, stride_bn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, n] = out[m, n] + b[n] + s[i] sum_{r < rank[i]} out[m, N + i R + r] B[i, n, r] over one block
    of columns, i = idx[m] (-1: out[m, n] + b[n]); out = x [W; A]^T, so out[m, N + i R:] is x[m] A[i]^T."""
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.load(out_ptr + m * stride_om + n, mask=n_ok, other=0.0).to(tl.float32)
    i = tl.load(idx_ptr + m).to(tl.int64)
    rank = tl.load(rank_ptr + tl.maximum(i, 0)) * (i >= 0)
    if rank > 0:
        lora = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(out_ptr + m * stride_om + N + i * R + r, mask=r < rank, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + i * stride_bs + n[:, None] * stride_bn + r[None, :],
                        mask=n_ok[:, None] & (r[None, :] < rank), other=0.0).to(tl.float32)
            lora += tl.sum(b * u[None, :], axis=1)
        acc += lora * tl.load(scale_ptr + i)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def lora_stacked(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """The decode schedule for a bank stacked under the weight (``stacked_weight``): out = x [W; A]^T
    by cuBLAS, then stacked_expand_kernel writing y = out[:, :N] + b + s[i] u B[i]^T. Bytes past
    the base GEMM: A's S R rows in the GEMM (2 S R K), B[i] per distinct slot (2 N r, from L2 for
    rows sharing it), out's rows read back and y written (about 4 M N + 2 M S R). x A[i]^T comes out
    of the GEMM rounded to the layer's dtype, as peft's lora_A output is. A bank not stacked
    runs ``lora_bgmv``."""
    full = stacked_weight(weight, lora_A)
    M, K = x.shape
    if full is None or M == 0 or K == 0:
        return lora_bgmv(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index)
    N, R = weight.shape[0], lora_A.shape[1]
    out = x @ full.T
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    interp = layout.interpreting()
    BLOCK_R = 16
    BLOCK_N = 32 if interp else 256
    fast_launch.cached_launch(
        stacked_expand_kernel, (M, cdiv(N, BLOCK_N)),
        (y, out, lora_B, y if bias is None else bias, adapter_index, scalings, ranks, N, R, y.stride(0),
         out.stride(0), lora_B.stride(0), lora_B.stride(1)),
        dict(HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R), num_warps=4, num_stages=1 if interp else 3)
    return y


# ----------------------------------------------------------------------------- prefill: fused SGMV
@triton.jit
def sgmv_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, rank_ptr, order_ptr, seg_start_ptr, tile_seg_ptr,
    tile_start_ptr,
    M, N, K, R,
    stride_xm, stride_wn, stride_ym, stride_as, stride_ar, stride_bs, stride_bn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One (row tile, column block) of y = x W^T + b + s[i] (x A[i]^T) B[i]^T over rows grouped by
    slot. Segment 0 holds the rows without an adapter, segment s + 1 slot s's rows; ``order`` lists
    the rows segment by segment, ``seg_start`` (S + 2) where each starts, ``tile_start`` (S + 2)
    where each segment's row tiles start among the tiles, ``tile_seg`` the segment of each tile.
    Programs past the last tile return at once (the grid is sized for the worst case)."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + t)
    first_tile = tl.load(tile_start_ptr + seg)
    row_lo = tl.load(seg_start_ptr + seg) + (t - first_tile) * BLOCK_M
    row_hi = tl.load(seg_start_ptr + seg + 1)
    if row_lo < row_hi:
        slot = (seg - 1).to(tl.int64)
        pos = row_lo + tl.arange(0, BLOCK_M)
        in_seg = pos < row_hi
        rows = tl.load(order_ptr + pos, mask=in_seg, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        rank = tl.load(rank_ptr + tl.maximum(slot, 0)) * (slot >= 0)
        r_idx = tl.arange(0, BLOCK_R)
        r_ok = r_idx < rank
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=in_seg[:, None] & (k[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=(cols[None, :] < N) & (k[:, None] < K),
                        other=0.0)
            acc = mma(a, w, acc)
            if rank > 0:
                p = tl.load(a_ptr + slot * stride_as + r_idx[None, :] * stride_ar + k[:, None],
                            mask=r_ok[None, :] & (k[:, None] < K), other=0.0)
                lr = mma(a, p, lr)
        if rank > 0:
            q = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + r_idx[:, None],
                        mask=r_ok[:, None] & (cols[None, :] < N), other=0.0)
            s = tl.load(scale_ptr + slot)
            acc = mma((lr * s).to(q.dtype), q, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=in_seg[:, None] & (cols[None, :] < N))


def _row_tiles(idx, slots: int, block_m: int):
    """The grouping of rows by slot, all on idx's device (no host sync): (order, seg_start,
    tile_seg, tile_start, tile count bound). Segment 0 is the rows without an adapter."""
    seg_of_row = idx.long() + 1  # -1 -> segment 0
    order = torch.argsort(seg_of_row, stable=True)
    # scatter_add, not bincount: bincount sizes its output from the largest entry (a host sync)
    counts = torch.zeros(slots + 1, dtype=torch.int64, device=idx.device).scatter_add_(0, seg_of_row,
                                                                                      torch.ones_like(seg_of_row))
    seg_start = torch.zeros(slots + 2, dtype=torch.int64, device=idx.device)
    seg_start[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_start = torch.zeros(slots + 2, dtype=torch.int64, device=idx.device)
    tile_start[1:] = torch.cumsum(tiles, 0)
    bound = cdiv(idx.shape[0], block_m) + slots + 1  # every segment's last tile may be partial
    tile_seg = torch.searchsorted(tile_start, torch.arange(bound, device=idx.device), right=True) - 1
    return order, seg_start, tile_seg.clamp_max(slots), tile_start, bound


def _sgmv(x, weight, bias, lora_A, lora_B, scalings, ranks, idx):
    M, K = x.shape
    N, S, R = weight.shape[0], lora_A.shape[0], lora_A.shape[1]
    interp = layout.interpreting()
    BLOCK_M, BLOCK_N, BLOCK_K = (16, 32, 16) if interp else (64, 128, 64)
    order, seg_start, tile_seg, tile_start, bound = _row_tiles(idx, S, BLOCK_M)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    fast_launch.cached_launch(
        sgmv_kernel, (bound, cdiv(N, BLOCK_N)),
        (x, w, y, x if bias is None else bias, lora_A, lora_B, scalings, ranks, order, seg_start, tile_seg, tile_start,
         M, N, K, R, x.stride(0), w.stride(0), y.stride(0), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
         lora_B.stride(1)),
        dict(HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=block_r(R)),
        num_warps=4, num_stages=1 if interp else 3)
    return y


# ----------------------------------------------------------------------------- prefill: split SGMV
@triton.jit
def grouped_shrink_kernel(
    x_ptr, a_ptr, u_ptr, group_ptr, rank_ptr,
    L, K, k_chunk, tiles_per_group,
    stride_xm, stride_as, stride_ar, stride_us, stride_um,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    """u_part[split, rows] = x[rows, k-chunk] A[i, :, k-chunk]^T (float32) for one row tile of one
    group (group g holds rows g L .. g L + L - 1, all of slot i = group[g]); A's rows past the slot's
    rank are masked off, so those columns are 0. A group without an adapter writes nothing: the
    expand never reads its rows."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = pid // tiles_per_group
    slot = tl.load(group_ptr + g).to(tl.int64)
    rank = tl.load(rank_ptr + tl.maximum(slot, 0)) * (slot >= 0)
    if rank > 0:
        row0 = (pid - g * tiles_per_group) * BLOCK_M
        m = row0 + tl.arange(0, BLOCK_M)
        row_ok = m < L
        rows = (g * L + m).to(tl.int64)  # offsets past 2^31 elements at long prefills
        r_idx = tl.arange(0, BLOCK_R)
        r_ok = r_idx < rank
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            at = tl.load(a_ptr + slot * stride_as + r_idx[None, :] * stride_ar + k[:, None],
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            acc = mma(xt, at, acc, IEEE)
        tl.store(u_ptr + split * stride_us + rows[:, None] * stride_um + r_idx[None, :], acc, mask=row_ok[:, None])


@triton.jit
def grouped_expand_kernel(
    y_ptr, u_ptr, b_ptr, bias_ptr, group_ptr, scale_ptr, rank_ptr,
    L, N, splits, tiles_per_group,
    stride_ym, stride_us, stride_um, stride_bs, stride_bn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    """y[rows, cols] = s[i] (sum over splits of u_part[split, rows]) B[i, cols]^T (+ bias) for one
    row tile of one group: the rank-r term written once, which the base GEMM then accumulates onto.
    A group without an adapter writes the bias, or zeros."""
    pid = tl.program_id(0)
    g = pid // tiles_per_group
    m = (pid - g * tiles_per_group) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < L
    rows = (g * L + m).to(tl.int64)  # offsets past 2^31 elements at long prefills
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    slot = tl.load(group_ptr + g).to(tl.int64)
    rank = tl.load(rank_ptr + tl.maximum(slot, 0)) * (slot >= 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if rank > 0:
        r_idx = tl.arange(0, BLOCK_R)
        r_ok = r_idx < rank
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in range(0, splits):
            u += tl.load(u_ptr + sp * stride_us + rows[:, None] * stride_um + r_idx[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        u = u * tl.load(scale_ptr + slot)
        bt = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + r_idx[:, None],
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(u.to(bt.dtype), bt, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :].to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def grouped_block_m(rows_per_group: int) -> int:
    """Row tiles never straddle two groups: a tile no taller than the group, 16 to 64 rows."""
    if layout.interpreting() or rows_per_group <= 16:
        return 16
    return 32 if rows_per_group <= 32 else 64


def grouped_shrink(x, lora_A, ranks, group_index, rows_per_group: int, BLOCK_K=None, splits=None, num_stages=None):
    """u_part (splits, M, BLOCK_R) float32 of grouped_shrink_kernel: x A[i]^T per group, split over K.
    By default about two programs per SM over (row tiles x K chunks), each chunk at least
    4 x BLOCK_K long (the interpreter's small tests: one BLOCK_K, so that their K is split too)."""
    M, K = x.shape
    G, L, R = group_index.shape[0], rows_per_group, lora_A.shape[1]
    interp = layout.interpreting()
    BLOCK_R, BLOCK_M = block_r(R), grouped_block_m(L)
    BLOCK_K = BLOCK_K or (16 if interp else 128)
    tiles_per_group = cdiv(L, BLOCK_M)
    tiles = G * tiles_per_group
    if splits is None:
        target = 8 if interp else 2 * layout.num_sms(x.device.index or 0)
        splits = max(1, min(cdiv(target, tiles), cdiv(K, (1 if interp else 4) * BLOCK_K)))
    k_chunk = cdiv(cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = cdiv(K, k_chunk)
    u = torch.empty(splits, M, BLOCK_R, dtype=torch.float32, device=x.device)
    fast_launch.cached_launch(
        grouped_shrink_kernel, (tiles, splits),
        (x, lora_A, u, group_index, ranks, L, K, k_chunk, tiles_per_group,
         x.stride(0), lora_A.stride(0), lora_A.stride(1), u.stride(0), u.stride(1)),
        dict(BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, IEEE=x.dtype == torch.float32),
        num_warps=4, num_stages=1 if interp else (num_stages or 4))
    return u


def grouped_expand(u, lora_B, bias, group_index, scalings, ranks, rows_per_group: int, dtype, BLOCK_N=None,
                   num_warps=None):
    """y (M, N) in ``dtype`` of grouped_expand_kernel: s[i] u B[i]^T (+ bias), u summed over its splits.
    By default 256 columns a program (u's splits are loaded once per 256 columns rather than per
    128: python -m tools.grouped_sweep on an H100, 24.2 us against 27.3 at 32 x 128 rows of a
    4096 x 4096 layer, 10.3 against 10.7 at 64 decode rows), 8 warps for 64-row tiles."""
    splits, M, BLOCK_R = u.shape
    N, L = lora_B.shape[1], rows_per_group
    BLOCK_M = grouped_block_m(L)
    BLOCK_N = BLOCK_N or (32 if layout.interpreting() else 256)
    num_warps = num_warps or (8 if BLOCK_M == 64 else 4)
    tiles_per_group = cdiv(L, BLOCK_M)
    y = torch.empty(M, N, dtype=dtype, device=u.device)
    fast_launch.cached_launch(
        grouped_expand_kernel, (group_index.shape[0] * tiles_per_group, cdiv(N, BLOCK_N)),
        (y, u, lora_B, y if bias is None else bias, group_index, scalings, ranks, L, N, splits, tiles_per_group,
         y.stride(0), u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1)),
        dict(HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, IEEE=dtype == torch.float32),
        num_warps=num_warps, num_stages=3)
    return y


def lora_grouped(x, weight, bias, lora_A, lora_B, scalings, ranks, group_index, rows_per_group: int):
    """The split prefill schedule (backend ``sgmv_cublas``) on groups of consecutive rows, group j
    of slot group_index[j] (-1: none):

        u_part = x A[i]^T           grouped_shrink_kernel, split over K: (splits, M, R) float32
        y = s[i] u B[i]^T + b       grouped_expand_kernel: the rank-r term, written once
        y += x W^T                  cuBLAS, accumulating (beta = 1)

    Three launches, no gather of the bank and nothing read past a slot's rank. Bytes beyond the
    base GEMM: x read again by the shrink (2 M K in 16-bit types) with A[i] per row tile and K chunk,
    y written by the expand and read in cuBLAS's epilogue (4 M N); FLOPs 2 M R (K + N). At 32
    sequences x 128 tokens of a 4096 x 4096 layer, R = 16: 32 MiB of x, 2 x 32 MiB of y, about
    25 us of HBM time at 3.5 TB/s beside the base GEMM's 0.14 TFLOP (about 0.17 ms). The shrink is
    split over K so that a few hundred programs stream x (a row tile alone would leave most SMs
    idle), and the expand sums the splits as it loads u: no atomics, no zeroed buffer."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0 or K == 0:  # K = 0: x A^T is zero, y the bias
        return torch.nn.functional.linear(x, weight, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    u = grouped_shrink(x, lora_A, ranks, group_index, rows_per_group)
    y = grouped_expand(u, lora_B, bias, group_index, scalings, ranks, rows_per_group, x.dtype)
    return y.addmm_(x, weight.T)


def lora(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """The prefill schedule: sgmv_kernel, one launch, y written once."""
    if x.shape[0] == 0:
        return torch.empty(0, weight.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[1] == 0:  # no input features: x A^T is zero, y the bias
        return torch.nn.functional.linear(x, weight, bias)
    return _sgmv(x if x.stride(1) == 1 else x.contiguous(), weight, bias, lora_A, lora_B, scalings, ranks,
                 adapter_index)


def lora_bgmv(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """The decode schedule: cuBLAS's base GEMM, then the BGMV shrink and expand."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    if x.shape[0] == 0:
        return y
    return _bgmv(y, x if x.stride(1) == 1 else x.contiguous(), lora_A, lora_B, scalings, ranks, adapter_index)


# ----------------------------------------------------------------------------- IA3
@triton.jit
def multi_ia3_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, l_ptr, idx_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_ls,
    FEEDFORWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = ((x * L[idx]) W^T + b) with FEEDFORWARD (input scaling), else (x W^T + b) * L[idx]; a row
    with idx -1 has scale 1. The scales are gathered per row in the prologue / epilogue."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets past 2^31 elements
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.load(idx_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
    has = i >= 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        if FEEDFORWARD:
            scale = tl.load(l_ptr + i[:, None] * stride_ls + k[None, :], mask=has[:, None] & (k[None, :] < K),
                            other=1.0)
            a = (a.to(tl.float32) * scale.to(tl.float32)).to(a.dtype)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=(cols[None, :] < N) & (k[:, None] < K),
                    other=0.0)
        acc = mma(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
    if not FEEDFORWARD:
        scale = tl.load(l_ptr + i[:, None] * stride_ls + cols[None, :], mask=has[:, None] & (cols[None, :] < N),
                        other=1.0)
        acc = acc * scale.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def ia3(x, weight, bias, scales, adapter_index, feedforward):
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    scales = scales.to(x.dtype).contiguous()
    interp = layout.interpreting()
    BLOCK_M, BLOCK_N, BLOCK_K = (16, 32, 16) if interp else ((16, 128, 128) if M <= 64 else (128, 128, 64))
    fast_launch.cached_launch(
        multi_ia3_kernel, (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)),
        (x, w, y, x if bias is None else bias, scales, adapter_index, M, N, K, x.stride(0), w.stride(0), y.stride(0),
         scales.stride(0)),
        dict(FEEDFORWARD=bool(feedforward), HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K),
        num_warps=4, num_stages=1 if interp else 3)
    return y


# ----------------------------------------------------------------------------- the backends
# Each backend is a namespace of exactly its functions: the op runs a backend's ``lora_grouped``
# where it has one, so the module itself (which holds sgmv_cublas's) must not stand for a backend.
triton_backend = types.SimpleNamespace(lora=lora, ia3=ia3)  # the fused SGMV, and multi-IA3
bgmv_backend = types.SimpleNamespace(lora=lora_bgmv)  # the decode schedule: base GEMM, shrink, expand
bgmv_one_backend = types.SimpleNamespace(lora=lora_bgmv_one)  # base GEMM, then shrink and expand in one launch
sgmv_cublas_backend = types.SimpleNamespace(lora_grouped=lora_grouped)  # the split prefill schedule
stacked_backend = types.SimpleNamespace(lora=lora_stacked)  # the shrink in the base GEMM (bank under W)
