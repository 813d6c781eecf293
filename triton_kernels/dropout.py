"""LoRA's dropout mask, drawn where it is used and never stored: a counter-based RNG (philox)
keyed by (seed, position), so every kernel that needs the mask regenerates the same bits."""
from __future__ import annotations

import triton
import triton.language as tl

# Rounds of philox4x32 per draw. Philox4x32 passes TestU01's BigCrush from 7 rounds on (Salmon et
# al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"), and 7 is what FlashAttention's dropout
# draws; curand's default, which torch's dropout uses, is 10, a margin over that. Why it matters: a
# round is about eight vector integer operations, so a draw (8 elements, 16 bytes of bf16 x) costs
# 80 at 10 rounds, 5 per byte, past the H100's ~4.4 (about 15 T integer operations/s against
# 3.35 TB/s): a masked pass over x is bound by the draw, not the read. At 7 rounds it is about 3.5.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def dropout_keep(seed, rows, cols, ld, p):
    """Dropout keep-mask (True = kept) at [rows, cols] of an (*, ld) tensor; cols is one run of
    consecutive columns starting at a multiple of 8 (every tile here is). One philox4x32 draw
    (tl.randint4x, PHILOX_ROUNDS rounds) per 8 consecutive columns of a row, keyed by (seed, row *
    cdiv(ld, 8) + col // 8): its four 32-bit words give eight 16-bit uniforms, one per column,
    and a column is kept when its value is >= 65536 p. So the keep probability is
    1 - ceil(65536 p) / 65536, within 2^-16 of 1 - p.

    Why eight per draw: a philox draw is ~100 integer operations, and one per element made the
    masked passes (each a memory-bound read of x) cost more in arithmetic than in bytes: on the
    H200 dropout doubled a LoRA layer's training step. The same (seed, row, col) gives the same
    bit in every kernel, so the backward regenerates the forward's mask. ``seed`` is the value of
    the op's seed tensor (load_seed), drawn from torch's generator, so a captured CUDA graph
    draws a new mask at every replay."""
    BC: tl.constexpr = cols.shape[0]
    col0 = tl.min(cols, axis=0)
    groups = col0 // 8 + tl.arange(0, BC // 8)
    counter = rows[:, None] * ((ld + 7) // 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter, PHILOX_ROUNDS)
    low16 = 0xFFFF
    first = tl.interleave(tl.interleave(r0 & low16, r0 >> 16), tl.interleave(r1 & low16, r1 >> 16))
    second = tl.interleave(tl.interleave(r2 & low16, r2 >> 16), tl.interleave(r3 & low16, r3 >> 16))
    uniform16 = tl.interleave(first, second)  # [rows, BC]
    # u >= 65536 p as u >= ceil(65536 p) for the integer u: an integer compare, where converting u
    # to float32 took a quarter-rate conversion per element (16 a clock per SM on the H100).
    return uniform16 >= tl.ceil(p * 65536.0).to(tl.uint32)


@triton.jit
def load_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The dropout seed (int64) from its one-element tensor; 0 (never used) without dropout, when
    seed_ptr stands in for a tensor of another dtype."""
    if DROPOUT:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    return seed


@triton.jit
def dropout_mask_kernel(out_ptr, M, C, seed_ptr, dropout_p, BLOCK: tl.constexpr):
    """The keep-mask as 0/1 float32, for tests and the torch fallback's parity checks."""
    pid_m = tl.program_id(0)
    seed = load_seed(seed_ptr, True)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = pid_m + tl.arange(0, 1)
    keep = dropout_keep(seed, rows, cols, C, dropout_p)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], keep.to(tl.float32), mask=cols[None, :] < C)


@triton.jit
def dropped_kernel(x_ptr, out_ptr, M, C, stride_xm, stride_om, seed_ptr, dropout_p, keep_scale,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = x * keep / (1 - p) in x's dtype, with the kernels' mask (dropout_keep): one read of x
    and one write, where forming the float32 mask and multiplying by it took four passes."""
    seed = load_seed(seed_ptr, True)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
    keep = dropout_keep(seed, rows, cols, C, dropout_p)
    out = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=inside)
