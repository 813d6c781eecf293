"""The masked rank-r product that a cuBLAS composition adds to a GEMM's output:

    out[M, C] (+)= scale * keep[m, c] * (l[M, R] @ q[C, R]^T)    keep: the dropout mask, or 1

It lets the composition apply LoRA's dropout without an M x C mask or temporary: in the LoRA
backward, grad_x = s * mask * ((grad_y B) A) is written here, the mask regenerated from the
forward's seed (dropout_keep, positions [m, k] of x), and cuBLAS then accumulates grad_y W onto
it (beta = 1). ACCUMULATE adds to an out that is already written instead.

Cost: 2MCR FLOPs, far under the ridge; bytes: out written once (2MC in bf16; read too with
ACCUMULATE) plus the l and q tiles (L2-resident: l is re-read once per column block). So a plain
2-D grid of [BLOCK_M, BLOCK_C] tiles, R in one piece, nothing persistent: copy bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fast_launch, layout
from .dropout import dropout_keep, load_seed
from .fused_linear import mma
from .layout import block_r, cdiv


@triton.jit
def lowrank_update_kernel(
    out_ptr, l_ptr, q_ptr, seed_ptr,
    M, C, R,
    stride_om, stride_lm, stride_lr, stride_qc, stride_qr,
    scale, dropout_p, mask_ld,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
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
    low = mma(l, q.T.to(l.dtype), tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), IEEE)
    if DROPOUT:
        low = tl.where(dropout_keep(seed, rows, cols, mask_ld, dropout_p), low, 0.0)
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
        raise ValueError("add_lowrank writes an output with a unit column stride")
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
         q.stride(1), float(scale), float(dropout_p), int(C)),
        dict(DROPOUT=dropout, IEEE=out.dtype == torch.float32, ACCUMULATE=bool(accumulate), BLOCK_M=BLOCK_M,
             BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R),
        num_warps=warps, num_stages=1,
    )
    return out
