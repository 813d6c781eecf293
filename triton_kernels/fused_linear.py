"""The one GEMM core every method shares: out = epilogue(a @ w^T), persistent and tiled.

    out[M, N] = a[M, K] @ w^T                  w stored [N, K] (W_KMAJOR, nn.Linear) or [K, N]
              + scale * (lr @ q^T) (* mask)    low-rank term: lr[M, R] accumulates in the K loop
                                              as (a * dropout mask) @ p^T, p stored [R, K];
                                              q stored [N, R]
              + bias[N]

LoRA forward:  a = x, w = W, p = A, q = B                      (lr = u = drop(x) A^T, saved)
LoRA grad_x:   a = grad_y, w = W (as [K, N]), p = B^T, q = A^T (lr = grad_y B, saved; the
               dropout mask applies to the low-rank term at output positions)
lr in memory (SAVE_LR writes it; LR_PRECOMPUTED reads it, from the skinny launch that made it
with ACC_SCALE) is stored as scale * lr in the layer's dtype: the epilogue's MMA takes it as is,
and the weight gradients need no further scaling.
IA3 / SSF (triton_kernels/rescale.py) use the same kernel with small constexpr pieces:
  prologue SCALE_A:   a tile scaled along K in registers before the MMA (input scaling, and
                      grad_y * l in the grad_x of output scaling); never materialised.
  epilogue:           + bias; SAVE_AUX writes the unscaled result z to aux; REDUCE_AUX writes
                      per-row-block column sums of z * aux (and of aux) to ``partial``; then
                      SCALE_OUT (* scale[N]), SHIFT_OUT (+ shift[N]), and the store (STORE_OUT).

Schedule. A persistent grid (one program per SM) walks output tiles in grouped order (GROUP_M row
blocks share the column sweep, so the W tiles in flight stay in L2). Per tile the K loop does the
base MMA (BLOCK_M x BLOCK_N x BLOCK_K) and, when the tile's row block differs from the program's
previous tile, the rank-R MMA (BLOCK_M x R x BLOCK_K) into lr: that extra tensor-core work is
R / BLOCK_N of the base per recomputation (6% at R=16, BLOCK_N=256), paid once per (program, row
block) run instead of once per tile. The epilogue does one BLOCK_M x BLOCK_N x R MMA.

Cost of the LoRA forward: 2MNK + 2MKR + 2MNR FLOPs; bytes: x (MK) + W (NK) + y (MN) + A, B,
u (MR): the low-rank path adds under 1% of the bytes at R <= 64 and K, N >= 4096, so the kernel
is as compute-bound as the base GEMM (2MNK / bytes ~ 1000 FLOP/B at 4096^3 against the H100's
~260 FLOP/B ridge).

Loads go through device-side tensor descriptors (TMA on Hopper) when every operand allows it
(16-byte-aligned base and row strides, unit last stride); otherwise through masked pointer loads.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .dropout import dropout_keep, load_seed

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
def _load_2d(ptr, desc, r0, c0, R, C, stride_r, stride_c,
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
def _make_desc(ptr, R, C, stride_r, BR: tl.constexpr, BC: tl.constexpr, USE_DESC: tl.constexpr):
    if USE_DESC:
        desc = tl.make_tensor_descriptor(ptr, shape=[R, C], strides=[stride_r, 1], block_shape=[BR, BC])
    else:
        desc = ptr
    return desc


@triton.jit
def _mma_w(acc, a, w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr,
           PRECISE: tl.constexpr):
    """acc += a @ (w tile as [BLOCK_K, BLOCK_N]), w stored [N, K] (K-major) or [K, N]."""
    if W_KMAJOR:
        w = _load_2d(w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, USE_DESC).T
    else:
        w = _load_2d(w_ptr, w_desc, off_k, off_n, K, N, stride_wk, stride_wn, BLOCK_K, BLOCK_N, USE_DESC)
    return mma(a, w, acc, PRECISE)


@triton.jit
def _base_k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, k_tiles,
                 stride_am, stride_ak, stride_wn, stride_wk, seed, dropout_p, mask_ld, scale_ptr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 W_KMAJOR: tl.constexpr, USE_DESC: tl.constexpr, MASK_A: tl.constexpr, SCALE_A: tl.constexpr,
                 PRECISE: tl.constexpr):
    for ki in range(k_tiles):
        off_k = ki * BLOCK_K
        a = _load_2d(a_ptr, a_desc, off_m, off_k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_DESC)
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
        if MASK_A:  # dropout on the whole product (the rank-r u = drop(x) A^T as its own GEMM)
            rows = off_m + tl.arange(0, BLOCK_M)
            cols_k = off_k + tl.arange(0, BLOCK_K)
            a = tl.where(dropout_keep(seed, rows, cols_k, mask_ld, dropout_p), a, 0.0)
        acc = _mma_w(acc, a, w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk,
                     BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC, PRECISE)
    return acc


@triton.jit
def fused_linear_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, p_ptr, q_ptr, lr_ptr, scale_ptr, shift_ptr, aux_ptr, partial_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    stride_pr, stride_pk, stride_qn, stride_qr, stride_lm, stride_xm, stride_xn,
    lr_scale, seed_ptr, dropout_p, mask_ld,
    m_bucket,  # unused in the body: the autotuner's key for M's size class
    HAS_BIAS: tl.constexpr,
    LR_EPILOGUE: tl.constexpr,  # + lr_scale * lr @ q^T in the epilogue (the LoRA term; a read lr has lr_scale in)
    W_KMAJOR: tl.constexpr,     # w stored [N, K] (True) or [K, N]
    DROPOUT_IN: tl.constexpr,   # mask a (positions [m, k], ld = mask_ld) before the rank-R product
    DROPOUT_OUT: tl.constexpr,  # mask the low-rank term (positions [m, n], ld = mask_ld)
    SAVE_LR: tl.constexpr,      # write lr_scale * lr ([M, R], lr_ptr's dtype) from the tiles of column block 0
    LR_PRECOMPUTED: tl.constexpr,  # lr (lr_scale applied) was computed by an earlier launch: read it
    ACC_SCALE: tl.constexpr,    # out = lr_scale * (a @ w^T): the skinny launches writing a scaled lr
    MASK_A: tl.constexpr,       # dropout on a for the main product too (the u = drop(x) A^T GEMM)
    IN_LOOP_LR: tl.constexpr,   # a LoRA term whose lr is computed in the K loop (not LR_PRECOMPUTED)
    FLATTEN: tl.constexpr,      # flatten the tile and K loops (launch.py says when not)
    SCALE_A: tl.constexpr,      # prologue: a[:, k] *= scale[k]
    SAVE_AUX: tl.constexpr,     # epilogue: aux = a @ w^T + bias (the unscaled output z)
    REDUCE_AUX: tl.constexpr,   # epilogue: partial[0, pid_m, n] = sum over the tile's rows of z * aux
    REDUCE_SUM: tl.constexpr,   # epilogue: partial[1, pid_m, n] = sum over the tile's rows of aux
    SCALE_OUT: tl.constexpr,    # epilogue: out[:, n] *= scale[n]
    SHIFT_OUT: tl.constexpr,    # epilogue: out[:, n] += shift[n]
    STORE_OUT: tl.constexpr,    # write out (off when only the reduction is wanted)
    PRECISE_MAIN: tl.constexpr,  # a @ w^T in full fp32 (the skinny rank-r GEMMs of fp32 layers)
    PRECISE_LR: tl.constexpr,    # the in-loop rank-r product in full fp32 (fp32 layers)
    USE_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPI_SUBTILE: tl.constexpr,  # run the epilogue on two [BLOCK_M, BLOCK_N / 2] halves
    EVEN_R: tl.constexpr,       # R == BLOCK_R: the lr / q tiles need no mask along R (vector loads)
    LR_DESC: tl.constexpr,      # lr and q tiles through tensor descriptors (TMA) instead of pointers
    Q_RMAJOR: tl.constexpr,     # q stored [N, R] with unit R stride (B); else [R, N] (A, for grad_x)
    AUX_DESC: tl.constexpr = False,    # aux tiles (SAVE_AUX, REDUCE_AUX) through a descriptor (TMA)
):
    start = tl.program_id(0)
    seed = load_seed(seed_ptr, (DROPOUT_IN or DROPOUT_OUT) or MASK_A)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)

    a_desc = _make_desc(a_ptr, M, K, stride_am, BLOCK_M, BLOCK_K, USE_DESC)
    if W_KMAJOR:
        w_desc = _make_desc(w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, USE_DESC)
    else:
        w_desc = _make_desc(w_ptr, K, N, stride_wk, BLOCK_K, BLOCK_N, USE_DESC)
    # The epilogue's tiles (out, aux, q) are as wide as its pieces: half the tile with EPI_SUBTILE.
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    out_desc = out_ptr
    if STORE_OUT:
        out_desc = _make_desc(out_ptr, M, N, stride_om, BLOCK_M, EPI_N, USE_DESC)
    aux = _make_desc(aux_ptr, M, N, stride_xm, BLOCK_M, EPI_N, AUX_DESC)  # [M, N], unit column stride
    lr_desc = _make_desc(lr_ptr, M, R, stride_lm, BLOCK_M, BLOCK_R, LR_DESC)
    q_desc = _make_q_desc(q_ptr, N, R, stride_qn, stride_qr, EPI_N, BLOCK_R, LR_DESC, Q_RMAJOR)

    if IN_LOOP_LR:  # carried across tiles (a read lr, in its own dtype, is not)
        lr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        prev_m = -1
    # FLATTEN (launch.config_constexprs) fuses the tile and K loops into one pipelined loop.
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if IN_LOOP_LR:
            if pid_m != prev_m:
                # lr depends on the row block only: recomputed when the row block changes.
                lr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for ki in range(k_tiles):
                    off_k = ki * BLOCK_K
                    a = _load_2d(a_ptr, a_desc, off_m, off_k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_DESC)
                    acc = _mma_w(acc, a, w_ptr, w_desc, off_n, off_k, N, K, stride_wn, stride_wk,
                                 BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC, False)
                    # p ([R, K], a few KB) by pointer with any strides: B^T needs no copy.
                    p = _load_2d(p_ptr, p_ptr, 0, off_k, R, K, stride_pr, stride_pk, BLOCK_R, BLOCK_K, False)
                    if DROPOUT_IN:
                        cols_k = off_k + tl.arange(0, BLOCK_K)
                        a = tl.where(dropout_keep(seed, rows, cols_k, mask_ld, dropout_p), a, 0.0)
                    lr = mma(a, p.T, lr, PRECISE_LR)
            else:
                acc = _base_k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, k_tiles,
                                   stride_am, stride_ak, stride_wn, stride_wk, seed, dropout_p, mask_ld, scale_ptr,
                                   BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC, False, False, False)
            prev_m = pid_m
        else:
            acc = _base_k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, k_tiles,
                               stride_am, stride_ak, stride_wn, stride_wk, seed, dropout_p, mask_ld, scale_ptr,
                               BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC, MASK_A, SCALE_A, PRECISE_MAIN)
            if ACC_SCALE:
                acc = acc * lr_scale

        if LR_EPILOGUE:
            if LR_PRECOMPUTED:
                lr = _load_2d(lr_ptr, lr_desc, off_m, 0, M, R, stride_lm, 1, BLOCK_M, BLOCK_R, LR_DESC, EVEN_R)
            elif SAVE_LR:
                if pid_n == 0:
                    r_idx = tl.arange(0, BLOCK_R)
                    tl.store(lr_ptr + rows[:, None] * stride_lm + r_idx[None, :],
                             (lr * lr_scale).to(lr_ptr.dtype.element_ty),
                             mask=(rows[:, None] < M) & (r_idx[None, :] < R))
        else:
            lr = 0.0  # no LoRA term: a placeholder argument
        if EPI_SUBTILE:
            # Two [BLOCK_M, BLOCK_N / 2] halves, one after the other: the epilogue's shared memory
            # (the store tile, the q tile of the rank-r product) halves, which is what lets the
            # 128 x 256 x 64, 3-stage main loop fit beside a rank-64 epilogue (227 KB on the H100).
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        else:
            acc0 = acc
            acc1 = acc  # unused: one piece
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            _finish_tile(acc0 if piece == 0 else acc1, lr, off_m, off_n + piece * EPI_N, pid_m, num_pid_m, M, N, R,
                         out_ptr, out_desc, bias_ptr, q_ptr, q_desc, scale_ptr, shift_ptr, aux, partial_ptr,
                         stride_om, stride_on, stride_qn, stride_qr, stride_xm, stride_xn, lr_scale, seed, dropout_p,
                         mask_ld, LR_EPILOGUE, LR_PRECOMPUTED, DROPOUT_OUT, EVEN_R, LR_DESC, Q_RMAJOR, HAS_BIAS,
                         SAVE_AUX, REDUCE_AUX, REDUCE_SUM, SCALE_OUT, SHIFT_OUT, STORE_OUT, USE_DESC, AUX_DESC,
                         BLOCK_M, EPI_N, BLOCK_R)

@triton.jit
def _finish_tile(acc, lr, off_m, off_n, pid_m, num_pid_m, M, N, R, out_ptr, out_desc, bias_ptr, q_ptr, q_desc,
                 scale_ptr, shift_ptr, aux_ptr, partial_ptr, stride_om, stride_on, stride_qn, stride_qr,
                 stride_xm, stride_xn, lr_scale, seed, dropout_p, mask_ld,
                 LR_EPILOGUE: tl.constexpr, LR_PRECOMPUTED: tl.constexpr, DROPOUT_OUT: tl.constexpr,
                 EVEN_R: tl.constexpr, LR_DESC: tl.constexpr, Q_RMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SAVE_AUX: tl.constexpr, REDUCE_AUX: tl.constexpr, REDUCE_SUM: tl.constexpr, SCALE_OUT: tl.constexpr,
                 SHIFT_OUT: tl.constexpr, STORE_OUT: tl.constexpr, USE_DESC: tl.constexpr, AUX_DESC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Output columns [off_n, off_n + BLOCK_N) of the tile: + the LoRA term (its q tile loaded
    here), then the epilogue."""
    if LR_EPILOGUE:
        q = _load_q(q_ptr, q_desc, off_n, N, R, stride_qn, stride_qr, BLOCK_N, BLOCK_R, EVEN_R, LR_DESC, Q_RMAJOR)
        acc = _lowrank_product(acc, _scaled_lr(lr, lr_scale, q.dtype, LR_PRECOMPUTED), q,
                               off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N),
                               seed, dropout_p, mask_ld, DROPOUT_OUT, BLOCK_M, BLOCK_N)
    _epilogue(acc, off_m, off_n, pid_m, num_pid_m, M, N, out_ptr, out_desc, bias_ptr,
              scale_ptr, shift_ptr, aux_ptr, partial_ptr, stride_om, stride_on, stride_xm, stride_xn,
              HAS_BIAS, SAVE_AUX, REDUCE_AUX, REDUCE_SUM, SCALE_OUT, SHIFT_OUT, STORE_OUT, USE_DESC, AUX_DESC,
              BLOCK_M, BLOCK_N)


@triton.jit
def _make_q_desc(q_ptr, N, R, stride_qn, stride_qr, QBN: tl.constexpr, BLOCK_R: tl.constexpr,
                 LR_DESC: tl.constexpr, Q_RMAJOR: tl.constexpr):
    if Q_RMAJOR:
        desc = _make_desc(q_ptr, N, R, stride_qn, QBN, BLOCK_R, LR_DESC)
    else:
        desc = _make_desc(q_ptr, R, N, stride_qr, BLOCK_R, QBN, LR_DESC)
    return desc


@triton.jit
def _load_q(q_ptr, q_desc, off_n, N, R, stride_qn, stride_qr, QBN: tl.constexpr, BLOCK_R: tl.constexpr,
            EVEN_R: tl.constexpr, LR_DESC: tl.constexpr, Q_RMAJOR: tl.constexpr):
    """The [QBN, BLOCK_R] tile of q ([N, R] logically) at row off_n, out-of-range entries zero. By
    descriptor, q is read in its stored orientation: [N, R] (B) or [R, N] (A, then transposed)."""
    if LR_DESC and not Q_RMAJOR:
        q = q_desc.load([0, off_n]).T
    else:  # by pointer, with any strides: grad_x's q = A^T needs no copy
        q = _load_2d(q_ptr, q_desc, off_n, 0, N, R, stride_qn, stride_qr, QBN, BLOCK_R, LR_DESC, EVEN_R)
    return q


@triton.jit
def _scaled_lr(lr, lr_scale, dtype: tl.constexpr, PRESCALED: tl.constexpr):
    """The A operand of the LoRA term: lr read from memory already carries lr_scale (whoever wrote
    it applied it); lr accumulated in this kernel's K loop does not yet."""
    if PRESCALED:
        lr_s = lr.to(dtype)
    else:
        lr_s = (lr * lr_scale).to(dtype)
    return lr_s


@triton.jit
def _lowrank_product(acc, lr_s, q, rows, cols_n, seed, dropout_p, mask_ld,
                     DROPOUT_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + lr_s @ q^T, the LoRA term of one output tile (lr_s: [BLOCK_M, BLOCK_R], pre-scaled, in
    q's dtype; q: [BLOCK_N, BLOCK_R]). With DROPOUT_OUT the term is masked by the dropout keep-mask
    at [rows, cols_n], which needs it apart from acc; otherwise it accumulates straight into acc."""
    if DROPOUT_OUT:
        low = mma(lr_s, q.T, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        acc += tl.where(dropout_keep(seed, rows, cols_n, mask_ld, dropout_p), low, 0.0)
    else:
        acc = mma(lr_s, q.T, acc)
    return acc


@triton.jit
def _epilogue(acc, off_m, off_n, pid_m, num_pid_m, M, N, out_ptr, out_desc, bias_ptr,
              scale_ptr, shift_ptr, aux_ptr, partial_ptr, stride_om, stride_on, stride_xm, stride_xn,
              HAS_BIAS: tl.constexpr, SAVE_AUX: tl.constexpr, REDUCE_AUX: tl.constexpr, REDUCE_SUM: tl.constexpr,
              SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr, STORE_OUT: tl.constexpr, USE_DESC: tl.constexpr,
              AUX_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output tile [BLOCK_M, BLOCK_N] at (off_m, off_n) from its fp32 accumulator acc (the
    LoRA term already in): + bias, the aux store / reduction, * scale, + shift, store. aux_ptr is
    a descriptor with AUX_DESC: no per-element addresses in registers (a [128, 128] pointer tile
    costs more registers than the accumulator half it serves), and the z store is asynchronous."""
    rows = off_m + tl.arange(0, BLOCK_M)
    cols_n = off_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols_n, mask=cols_n < N, other=0.0)
        acc += bias[None, :].to(tl.float32)
    in_tile = (rows[:, None] < M) & (cols_n[None, :] < N)
    if SAVE_AUX:
        if AUX_DESC:
            aux_ptr.store([off_m, off_n], acc.to(aux_ptr.dtype))
        else:
            tl.store(aux_ptr + rows[:, None] * stride_xm + cols_n[None, :] * stride_xn,
                     acc.to(aux_ptr.dtype.element_ty), mask=in_tile)
    if REDUCE_AUX:
        # Rows past M read aux as 0, so their (bias-only) acc adds nothing. One tile per
        # (pid_m, columns): each partial entry is written exactly once, no atomics.
        other = _load_2d(aux_ptr, aux_ptr, off_m, off_n, M, N, stride_xm, stride_xn, BLOCK_M, BLOCK_N,
                         AUX_DESC).to(tl.float32)
        col_mask = cols_n < N
        tl.store(partial_ptr + pid_m * N + cols_n, tl.sum(acc * other, axis=0), mask=col_mask)
        if REDUCE_SUM:
            tl.store(partial_ptr + (num_pid_m + pid_m) * N + cols_n, tl.sum(other, axis=0), mask=col_mask)
    if SCALE_OUT:
        scale = tl.load(scale_ptr + cols_n, mask=cols_n < N, other=0.0)
        acc = acc * scale[None, :].to(tl.float32)
    if SHIFT_OUT:
        shift = tl.load(shift_ptr + cols_n, mask=cols_n < N, other=0.0)
        acc += shift[None, :].to(tl.float32)
    if STORE_OUT:
        out = acc.to(out_ptr.dtype.element_ty)
        if USE_DESC:
            out_desc.store([off_m, off_n], out)
        else:
            tl.store(out_ptr + rows[:, None] * stride_om + cols_n[None, :] * stride_on, out, mask=in_tile)


@triton.jit
def lowrank_weight_grad_kernel(
    l_ptr, s_ptr, out_ptr, colsum_ptr, partial_ptr, counter_ptr,
    M, C, R, rows_per_split,
    stride_lm, stride_lc, stride_sm, stride_oc, stride_or,
    scale, seed_ptr, dropout_p, mask_ld,
    DROPOUT: tl.constexpr, COLSUM: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[c, r] = scale * sum_m (l * mask)[m, c] s[m, r] (out addressed by strides, so grad_A^T
    lands in grad_A's layout), and with COLSUM colsum[c] = sum_m l[m, c] (grad_bias from the grad_y
    tiles already held): grad_B = s grad_y^T u and grad_A = s g^T drop(x). Memory-bound: l (M x C)
    is read once in all; s (M x R, small) once per column block.

    M is split over grid axis 1 so that narrow C still fills the GPU. With SPLIT, each program
    stores its float32 partial ([splits, C, R + 1], the last column the sum), then takes a ticket
    from its column block's counter; the last to arrive sums the partials in split order (so the
    result is deterministic), writes out / colsum in their dtypes and resets the counter to zero
    for the next launch. One launch, no torch reduction after it."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    seed = load_seed(seed_ptr, DROPOUT)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_idx = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        l = tl.load(l_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lc,
                    mask=(rows[:, None] < row_end) & (cols[None, :] < C), other=0.0)
        if DROPOUT:
            l = tl.where(dropout_keep(seed, rows, cols, mask_ld, dropout_p), l, 0.0)
        s = tl.load(s_ptr + rows[:, None] * stride_sm + r_idx[None, :],
                    mask=(rows[:, None] < row_end) & (r_idx[None, :] < R), other=0.0)
        acc = mma(l.T, s.to(l.dtype), acc)
        if COLSUM:
            colsum += tl.sum(l.to(tl.float32), axis=0)
    if SPLIT:
        # partial row layout: [split, c, 0:BLOCK_R] the product, [split, c, BLOCK_R] the sum.
        ld = BLOCK_R + 1
        here = partial_ptr + split * C * ld + cols[:, None] * ld + r_idx[None, :]
        tl.store(here, acc, mask=cols[:, None] < C)
        if COLSUM:
            tl.store(partial_ptr + split * C * ld + cols * ld + BLOCK_R, colsum, mask=cols < C)
        tl.debug_barrier()  # every thread's partial stored before the ticket releases them
        ticket = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
        last = ticket == splits - 1
        if last:
            tl.debug_barrier()
            acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
            colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for sp in range(0, splits):
                base = partial_ptr + sp * C * ld
                acc += tl.load(base + cols[:, None] * ld + r_idx[None, :], mask=cols[:, None] < C, other=0.0,
                               cache_modifier=".cg")
                if COLSUM:
                    colsum += tl.load(base + cols * ld + BLOCK_R, mask=cols < C, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + pid_c, 0)
    else:
        last = True
    if last:
        out_mask = (cols[:, None] < C) & (r_idx[None, :] < R)
        tl.store(out_ptr + cols[:, None] * stride_oc + r_idx[None, :] * stride_or,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=out_mask)
        if COLSUM:
            tl.store(colsum_ptr + cols, colsum.to(colsum_ptr.dtype.element_ty), mask=cols < C)


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
