"""The rank-r pieces of LoRA that run apart from the layer's GEMM, each a kernel and its launcher:

    lowrank_product_kernel       out = scale * (a * mask) @ w^T, out [M, r]: the skinny GEMMs
                                 u_s = s drop(x) A^T and g_s = s grad_y B
    lowrank_weight_grad_kernel   out = scale * (l * mask)^T @ s, [C, r], and column sums of l: the
                                 adapters' gradients grad_A = g_s^T drop(x), grad_B = grad_y^T u_s
    lowrank_update_kernel        out (+)= scale * mask * (l @ q^T): the rank-r term a cuBLAS
                                 composition adds to its GEMM's output

``mask`` is LoRA's dropout keep-mask (dropout.dropout_keep), regenerated from the forward's seed:
never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpeft.settings import settings

from . import fast_launch, layout
from .buffers import ticket_counters
from .core import gemm_setup, k_loop, make_desc, mma, split_halves, store_tile, tile_start
from .dropout import dropout_keep, load_seed
from .gemm import NOT_PLANNED, Gemm, PersistentGemm
from .layout import block_r, cdiv, descriptor_ok, split_rows, weight_operand


# ----------------------------------------------------------------------------- skinny product
@triton.jit
def lowrank_product_kernel(
    a_ptr, w_ptr, out_ptr, seed_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om,
    scale, dropout_p,
    W_KMAJOR: tl.constexpr, DROPOUT: tl.constexpr, USE_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EPI_SUBTILE: tl.constexpr,
):
    """out[M, N] = scale * (a * mask) @ w^T with N = r: u_s = s drop(x) A^T (a = x, w = A, mask at
    [m, k] of x) or g_s = s grad_y B (a = grad_y, w = B^T, no mask), written in out's dtype (the
    layer's) for the epilogue MMA and the weight gradients to read as they are.

    Cost: 2MKr FLOPs against 2MK + 2Mr bytes: a streaming read of a (memory-bound at r <= 64),
    so the tiles are short and one column tile wide (configs' skinny candidates), and each SM
    streams its share of the rows. fp32 inputs multiply in full fp32 (core.mma's IEEE)."""
    seed = load_seed(seed_ptr, DROPOUT)
    num_pid_m, num_pid_n, a_desc, w_desc = gemm_setup(a_ptr, w_ptr, M, N, K, stride_am, stride_wn, stride_wk, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC)
    EPI_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    out_desc = make_desc(out_ptr, M, N, stride_om, BLOCK_M, EPI_N, USE_DESC)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, off_m, off_n = tile_start(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = k_loop(acc, a_ptr, a_desc, w_ptr, w_desc, off_m, off_n, M, N, K, stride_am, stride_ak, stride_wn,
                     stride_wk, a_ptr, seed, dropout_p, K, BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, USE_DESC,
                     MASK_A=DROPOUT, IEEE=a_ptr.dtype.element_ty == tl.float32)
        acc0, acc1 = split_halves(acc * scale, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        for piece in tl.static_range(2 if EPI_SUBTILE else 1):
            store_tile(out_ptr, out_desc, acc0 if piece == 0 else acc1, off_m, off_n + piece * EPI_N, M, N,
                       stride_om, 1, BLOCK_M, EPI_N, USE_DESC)


_PRODUCT = PersistentGemm(lowrank_product_kernel)


def lowrank_product(a, w_mat, out, scale, seed=None, dropout_p=0.0):
    """out = scale * (a * mask) @ w_mat^T (see lowrank_product_kernel). a: [M, K]; w_mat: logical
    [r, K] in either orientation (A, or B^T as a view); out: [M, r], contiguous; mask: the keep-mask
    at [m, k] (row length K) drawn from ``seed`` when dropout_p > 0."""
    M, K = a.shape
    N = w_mat.shape[0]
    if M == 0 or N == 0:
        return out
    w, w_kmajor, stride_wn, stride_wk = weight_operand(w_mat)
    dropout = dropout_p > 0
    tensors = (a, w, out, seed if dropout else a)
    scalars = (float(scale), float(dropout_p))
    plan_key = None
    if fast_launch.enabled():
        meta = fast_launch.meta
        plan_key = (a.get_device(), meta(a), meta(w), meta(out), dropout, settings.generation)
        if _PRODUCT.replay(plan_key, tensors, scalars) is not NOT_PLANNED:
            return out
    use_desc = descriptor_ok(a, w, out)
    ints = (M, N, K, a.stride(0), a.stride(1), stride_wn, stride_wk, out.stride(0))
    flags = dict(W_KMAJOR=w_kmajor, DROPOUT=dropout, USE_DESC=use_desc)
    _PRODUCT.launch(plan_key, tensors, ints, scalars, flags,
                    Gemm(M, N, K, a.dtype, a.element_size(), descriptors=use_desc))
    return out


# ----------------------------------------------------------------------------- weight gradients
@triton.jit
def lowrank_weight_grad_kernel(
    l_ptr, s_ptr, out_ptr, colsum_ptr, partial_ptr, counter_ptr, seed_ptr, update_ptr, q_ptr,
    M, C, R, rows_per_split,
    stride_lm, stride_lc, stride_sm, stride_oc, stride_or, stride_um, stride_qc, stride_qr,
    scale, dropout_p,
    DROPOUT: tl.constexpr, COLSUM: tl.constexpr, SPLIT: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[c, r] = scale * sum_m (l * mask)[m, c] s[m, r] (out addressed by strides, so grad_A^T
    lands in grad_A's layout), and with COLSUM colsum[c] = sum_m l[m, c] (grad_bias from the grad_y
    tiles already held): grad_B = grad_y^T u_s and grad_A = g_s^T drop(x), mask at [m, c] of l (row
    length C). Memory-bound: l (M x C) is read once in all; s (M x R, small) once per column block.

    M is split over grid axis 1 so that narrow C still fills the GPU. With SPLIT, each program
    stores its float32 partial ([splits, C, R + 1], the last column the sum), then takes a ticket
    from its column block's counter; the last to arrive sums the partials in split order (so the
    result is deterministic), writes out / colsum in their dtypes and resets the counter to zero
    for the next launch. One launch, no torch reduction after it.

    With UPDATE it also writes update[m, c] = scale * mask[m, c] * (s[m] @ q[c]^T) for every tile
    it reads: LoRA's backward with dropout, l = x, s = grad_y B, q = A^T, gives grad_A and grad_x's
    masked rank-r term (onto which cuBLAS then accumulates grad_y W) from one draw of the mask
    and one read of x. Apart, the two passes drew the mask twice and took 59 + 49 us at 8192 x
    4096 (H100): the draw, about 90 integer operations per 8 elements, bounds each pass, so
    drawing once saves about a pass; the fused pass moves 4MC bytes (x read, the term written)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    seed = load_seed(seed_ptr, DROPOUT)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_idx = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if UPDATE:  # q^T's [BLOCK_R, BLOCK_C] block, the same for every row step
        q = tl.load(q_ptr + cols[None, :] * stride_qc + r_idx[:, None] * stride_qr,
                    mask=(cols[None, :] < C) & (r_idx[:, None] < R), other=0.0).to(l_ptr.dtype.element_ty)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        l = tl.load(l_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lc,
                    mask=(rows[:, None] < row_end) & (cols[None, :] < C), other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed, rows, cols, C, dropout_p)
            l = tl.where(keep, l, 0.0)
        s = tl.load(s_ptr + rows[:, None] * stride_sm + r_idx[None, :],
                    mask=(rows[:, None] < row_end) & (r_idx[None, :] < R), other=0.0)
        acc = mma(l.T, s.to(l.dtype), acc)
        if UPDATE:
            term = mma(s.to(l.dtype), q, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32),
                       update_ptr.dtype.element_ty == tl.float32)
            if DROPOUT:
                term = tl.where(keep, term, 0.0)
            tl.store(update_ptr + rows[:, None] * stride_um + cols[None, :],
                     (term * scale).to(update_ptr.dtype.element_ty),
                     mask=(rows[:, None] < row_end) & (cols[None, :] < C))
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


class _WeightGradPlan:
    """A weight_grad call replayed from its plan key (shapes, strides, dtypes, alignment, flags):
    the compiled kernel, grid, integer arguments and constexprs are kept; a replay allocates the
    partials, looks up the ticket counters and launches (the host cost of a training step,
    benchmarks/RESULTS.md)."""

    __slots__ = ("entry", "grid3", "device", "partial_numel", "col_blocks", "ints", "tail")

    def __call__(self, l, s, out, colsum, scale, seed, dropout_p, update):
        partial, counter = _split_buffers(self.partial_numel, self.col_blocks, out)
        update_out, q = update or (out, out)
        self.entry(self.grid3, self.device, (l, s, out, out if colsum is None else colsum, partial, counter,
                                             l if seed is None else seed, update_out, q, *self.ints, float(scale),
                                             float(dropout_p), *self.tail))


_WEIGHT_GRAD_PLANS = fast_launch.plan_cache()


def _split_buffers(partial_numel, col_blocks, out):
    """The float32 partials and ticket counters of a split reduction; a single split needs neither
    (the kernel does not touch them: out stands in)."""
    if not partial_numel:
        return out, out
    return (torch.empty(partial_numel, dtype=torch.float32, device=out.device),
            ticket_counters(col_blocks, out.device))


def weight_grad(l, s, out, *, scale, transpose_out, colsum=None, seed=None, dropout_p=0.0, update=None):
    """out = scale * (l * mask)^T @ s ([C, R], or its transpose with ``transpose_out``), and
    colsum = column sums of l, in one launch (lowrank_weight_grad_kernel). mask: the keep-mask at
    [m, c] of l drawn from ``seed`` when dropout_p > 0. ``update=(update_out, q)``, q [C, R] in any
    strides (A^T as a view) and update_out [M, C] with a unit column stride: the same launch also
    writes update_out = scale * mask * (s @ q^T), its old values never read.

    The tile on the GPU (rows per step, columns per program) and the programs per SM its split
    over M aims at: tools/diag_weight_grad.py times the choices; on the H100 (RESULTS.md) 256 x 64
    with 2 programs per SM was best or within 4% of it at every shape and rank <= 64 (4096 x 4096,
    r = 64: 36 us against 53 us for 64 x 64 at 4 per SM). Above r = 64 a 256-row stage would not
    leave room for two stages: 64 x 64. settings.weight_grad_tile and
    settings.weight_grad_programs_per_sm override both."""
    M, C = l.shape
    R = s.shape[1]
    if update is not None and update[0].stride(1) != 1:
        raise ValueError("weight_grad's update output needs a unit column stride")
    if C == 0:
        return
    if M == 0:
        out.zero_()
        if colsum is not None:
            colsum.zero_()
        return
    interp = layout.interpreting()
    fast = fast_launch.enabled()
    if fast:
        meta = fast_launch.meta
        plan_key = (l.get_device(), meta(l), meta(s), meta(out), meta(colsum), transpose_out, dropout_p > 0,
                    None if update is None else (meta(update[0]), meta(update[1])), settings.generation)
        plan = _WEIGHT_GRAD_PLANS.get(plan_key)
        if plan is not None:
            return plan(l, s, out, colsum, scale, seed, dropout_p, update)
    BLOCK_R = block_r(R)
    # With the update, 64 x 64 (tools.diag_weight_grad, H100, r = 16, p = 0.05, x of 8192 rows):
    # 74 / 258 / 44 / 27 us at K = 4096 / 14336 / 2048 / 896, where 128 x 64 took 104 / 311 / 52 /
    # 36 and the two passes apart 107 / 323 / 64 / 37.
    default_tile = (256, 64) if BLOCK_R <= 64 and update is None else (64, 64)
    BLOCK_M, BLOCK_C = (16, 16) if interp else settings.weight_grad_tile or default_tile
    # Each pipeline stage holds an l tile and an s tile: up to 4 stages within 160 KB of shared
    # memory (r = 256: 66 KB a stage in bf16 at 64 x 64, so 2), and 8 warps once the
    # [BLOCK_C, BLOCK_R] float32 accumulator passes 64 registers a thread at 4 warps.
    stage_bytes = BLOCK_M * (BLOCK_C * l.element_size() + BLOCK_R * s.element_size())
    num_stages = 1 if interp else max(1, min(4, (160 * 1024) // stage_bytes))
    num_warps = 8 if BLOCK_C * BLOCK_R > 128 * 64 or (update is not None and BLOCK_M * BLOCK_C >= 128 * 64) else 4
    col_blocks, splits, rows_per_split = split_rows(M, C, BLOCK_M, BLOCK_C, l.device,
                                                    settings.weight_grad_programs_per_sm)
    partial_numel = splits * C * (BLOCK_R + 1) if splits > 1 else 0
    partial, counter = _split_buffers(partial_numel, col_blocks, out)
    stride_oc, stride_or = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    update_out, q = update or (out, out)  # out stands in when there is no update
    ints = (M, C, R, rows_per_split, l.stride(0), l.stride(1), s.stride(0), stride_oc, stride_or,
            update_out.stride(0), q.stride(0), q.stride(1))
    constexprs = dict(DROPOUT=dropout_p > 0, COLSUM=colsum is not None, SPLIT=splits > 1, UPDATE=update is not None,
                      BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    entry = fast_launch.cached_launch(
        lowrank_weight_grad_kernel, (col_blocks, splits),
        (l, s, out, colsum if colsum is not None else out, partial, counter, l if seed is None else seed,
         update_out, q, *ints, float(scale), float(dropout_p)),
        constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    if fast and entry is not None:
        plan = fast_launch.new_plan(_WEIGHT_GRAD_PLANS, plan_key, _WeightGradPlan)
        plan.entry, plan.grid3, plan.device = entry, (col_blocks, splits, 1), l.get_device()
        plan.partial_numel, plan.col_blocks, plan.ints = partial_numel, col_blocks, ints
        plan.tail = tuple(constexprs[n] for n in fast_launch.constexpr_names(lowrank_weight_grad_kernel))


# ----------------------------------------------------------------------------- rank-r update
@triton.jit
def lowrank_update_kernel(
    out_ptr, l_ptr, q_ptr, seed_ptr,
    M, C, R,
    stride_om, stride_lm, stride_lr, stride_qc, stride_qr,
    scale, dropout_p,
    DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[M, C] (+)= scale * keep[m, c] * (l[M, R] @ q[C, R]^T), keep the dropout mask at [m, c]
    (row length C) or 1: the rank-r term a cuBLAS composition writes before its GEMM (which then
    accumulates onto it, beta = 1) or adds after it (ACCUMULATE). In the LoRA backward
    grad_x = s * mask * (g A) is written here with no M x K mask or temporary.

    Cost: 2MCR FLOPs, far under the ridge; bytes: out written once (2MC in bf16; read too with
    ACCUMULATE) plus the l and q tiles (L2-resident: l is re-read once per column block). So a plain
    2-D grid of [BLOCK_M, BLOCK_C] tiles, R in one piece, nothing persistent: copy bandwidth."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    seed = load_seed(seed_ptr, DROPOUT)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_idx = tl.arange(0, BLOCK_R)
    l = tl.load(l_ptr + rows[:, None] * stride_lm + r_idx[None, :] * stride_lr,
                mask=(rows[:, None] < M) & (r_idx[None, :] < R), other=0.0)
    q = tl.load(q_ptr + cols[:, None] * stride_qc + r_idx[None, :] * stride_qr,
                mask=(cols[:, None] < C) & (r_idx[None, :] < R), other=0.0)
    low = mma(l, q.T.to(l.dtype), tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32),
              out_ptr.dtype.element_ty == tl.float32)
    if DROPOUT:
        low = tl.where(dropout_keep(seed, rows, cols, C, dropout_p), low, 0.0)
    in_tile = (rows[:, None] < M) & (cols[None, :] < C)
    here = out_ptr + rows[:, None] * stride_om + cols[None, :]
    low = scale * low
    if ACCUMULATE:
        low += tl.load(here, mask=in_tile, other=0.0).to(tl.float32)
    tl.store(here, low.to(out_ptr.dtype.element_ty), mask=in_tile)


def lowrank_into(out, l, q, scale, seed=None, dropout_p=0.0, accumulate=True):
    """out += scale * mask * (l @ q^T) in place (``accumulate=False``: out = ..., out's old values
    never read). out: [M, C] with a unit column stride; l: [M, R]; q: [C, R] (any strides: A^T is
    passed as a view); mask: the dropout keep-mask at [m, c] (row length C) drawn from ``seed``
    when dropout_p > 0."""
    M, C = out.shape
    R = l.shape[1]
    if M == 0 or C == 0:
        return out
    if out.stride(1) != 1:
        raise ValueError("lowrank_into writes an output with a unit column stride")
    BLOCK_R = block_r(R)
    if layout.interpreting():
        BLOCK_M, BLOCK_C, warps = 16, 32, 4
    else:
        # 64 x 128 output tiles at R <= 64; narrower above, where the l and q tiles are large.
        BLOCK_M, BLOCK_C, warps = (64, 128, 4) if BLOCK_R <= 64 else (64, 64, 4)
    dropout = dropout_p > 0
    fast_launch.cached_launch(
        lowrank_update_kernel, (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)),
        (out, l, q, seed if dropout else out, M, C, R, out.stride(0), l.stride(0), l.stride(1), q.stride(0),
         q.stride(1), float(scale), float(dropout_p)),
        dict(DROPOUT=dropout, ACCUMULATE=bool(accumulate), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R),
        num_warps=warps, num_stages=1,
    )
    return out
