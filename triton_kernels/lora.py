"""LoRA launchers over the shared GEMM core: forward, backward and the dropout mask, on 2-D
inputs. The op layer (fusedpeft/ops/lora.py) owns argument checks, reshapes and autograd.

Forward: y = x W^T + b + s (drop(x) A^T) B^T, and s * u = s drop(x) A^T (M x r, in x's dtype,
as peft's autograd would keep u) saved for the backward: no full-size tensor. Keeping u (and
g = grad_y B) pre-scaled and in the layer's dtype lets the epilogue feed it to the tensor cores
straight from its TMA tile, and the weight gradients need no scale. Two schedules over the one
GEMM core (see schedule()): 'fused', one launch with u accumulated in the K loop; 'split', u as
a skinny GEMM (reads x once: 2MK bytes) and then the base GEMM with a rank-r epilogue.

Backward:
1. grad_x = grad_y W + s ((grad_y B) A) * mask: the core with W read as [K, N]; g = grad_y B
   (M x r) in the same N loop ('fused') or as its own skinny GEMM first ('split').
2. grad_A = s g^T drop(x): reduced over M (split across programs, partials summed in order).
3. grad_B = s grad_y^T u, and grad_bias = column sums of grad_y, from the same grad_y tiles.
2 and 3 reduce over M while 1 reduces over N, so they cannot share 1's tiles without atomics
across programs; they are memory-bound passes over x and grad_y (2MK + 2MN bytes in bf16).
"""
from __future__ import annotations

import torch

from fusedpeft.settings import settings

from . import fast_launch, layout
from .buffers import ticket_counters
from .dropout import dropout_mask_kernel
from .fused_linear import lowrank_weight_grad_kernel
from .gemm import Dropout, LowRank, launch_gemm
from .layout import block_r, cdiv, split_rows


def schedule(M: int, r: int) -> str:
    """'fused' (one launch: the rank-r product inside the GEMM's K loop) or 'split' (the rank-r
    product as its own skinny GEMM first, then the base GEMM with a rank-r epilogue).
    settings.lora_schedule ("fused" or "split"; FUSEDPEFT_LORA_SCHEDULE) overrides. The rule comes from the H100 measurements in
    benchmarks/RESULTS.md: at M <= 64 the layer is bound by reading W and the in-loop product is
    free, while one more launch is not; at large M the in-loop MMA (N = r) stalls the tensor-core
    pipeline more than a separate pass over x (2MK bytes) costs. Above r = 64 the in-loop product
    keeps a [BLOCK_R, BLOCK_K] slice of A per pipeline stage (64 KB and more at the small-M tiles'
    BLOCK_K of 128-256), which the small-M configs cannot hold beside their own: split."""
    forced = settings.lora_schedule
    if forced in ("fused", "split"):
        return forced
    return "fused" if M <= 64 and r <= 64 else "split"


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    u_s = torch.empty(M, r, dtype=x.dtype, device=x.device)  # s * drop(x) A^T
    s = scaling / (1.0 - dropout_p)
    dropout = Dropout(seed, dropout_p, K, "input") if dropout_p > 0 else None
    if schedule(M, r) == "fused":
        launch_gemm(x, weight, y, bias=bias, lowrank=LowRank(lora_B, u_s, s, p=lora_A), dropout=dropout)
    else:
        mask_x = Dropout(seed, dropout_p, K, "product") if dropout_p > 0 else None
        launch_gemm(x, lora_A, u_s, dropout=mask_x, precise=True, out_scale=s)
        launch_gemm(x, weight, y, bias=bias, lowrank=LowRank(lora_B, u_s, s))
    return y, (u_s,)


class _WeightGradPlan:
    """A _weight_grad call replayed from its plan key (shapes, strides, dtypes, alignment, flags):
    the compiled kernel, grid, integer arguments and constexprs are kept; a replay allocates the
    partials, looks up the ticket counters and launches (the host cost of a training step,
    benchmarks/RESULTS.md)."""

    __slots__ = ("entry", "grid3", "device", "partial_numel", "col_blocks", "ints", "tail")

    def __call__(self, l, s, out, colsum, scale, seed, dropout_p):
        partial, counter = _split_buffers(self.partial_numel, self.col_blocks, out)
        self.entry(self.grid3, self.device, (l, s, out, out if colsum is None else colsum, partial, counter, *self.ints,
                                             float(scale), l if seed is None else seed, float(dropout_p),
                                             *self.tail))


_PLANS = fast_launch.plan_cache()


def _split_buffers(partial_numel, col_blocks, out):
    """The float32 partials and ticket counters of a split reduction; a single split needs neither
    (the kernel does not touch them: out stands in)."""
    if not partial_numel:
        return out, out
    return (torch.empty(partial_numel, dtype=torch.float32, device=out.device),
            ticket_counters(col_blocks, out.device))


# The weight-gradient reduction's tile on the GPU (rows per step, columns per program) and the
# programs per SM its split over M aims at. tools/diag_weight_grad.py times the choices; on the
# H100 (RESULTS.md) 256 x 64 with 2 programs per SM was best or within 4% of it at every shape and
# rank <= 64 (4096 x 4096, r = 64: 36 us against 53 us for 64 x 64 at 4 per SM). Above r = 64 a
# 256-row stage would not leave room for two stages: 64 x 64. settings.weight_grad_tile and
# settings.weight_grad_programs_per_sm override both.


def _weight_grad(l, s, out, *, scale, transpose_out, colsum=None, seed=None, dropout_p=0.0, mask_ld=1):
    """out = scale * (l * mask)^T @ s ([C, R], or its transpose), and colsum = column sums of l,
    in one launch (lowrank_weight_grad_kernel: split over M, the last program per column block
    sums the float32 partials in a fixed order, so the result is deterministic)."""
    M, C = l.shape
    R = s.shape[1]
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
        plan_key = (l.get_device(), meta(l), meta(s), meta(out), meta(colsum), transpose_out, dropout_p > 0, mask_ld,
                    settings.generation)
        plan = _PLANS.get(plan_key)
        if plan is not None:
            return plan(l, s, out, colsum, scale, seed, dropout_p)
    BLOCK_R = block_r(R)
    BLOCK_M, BLOCK_C = (16, 16) if interp else settings.weight_grad_tile or ((256, 64) if BLOCK_R <= 64 else (64, 64))
    # Each pipeline stage holds an l tile and an s tile: up to 4 stages within 160 KB of shared
    # memory (r = 256: 66 KB a stage in bf16 at 64 x 64, so 2), and 8 warps once the
    # [BLOCK_C, BLOCK_R] float32 accumulator passes 64 registers a thread at 4 warps.
    stage_bytes = BLOCK_M * (BLOCK_C * l.element_size() + BLOCK_R * s.element_size())
    num_stages = 1 if interp else max(1, min(4, (160 * 1024) // stage_bytes))
    num_warps = 8 if BLOCK_C * BLOCK_R > 128 * 64 else 4
    col_blocks, splits, rows_per_split = split_rows(M, C, BLOCK_M, BLOCK_C, l.device,
                                                    settings.weight_grad_programs_per_sm)
    partial_numel = splits * C * (BLOCK_R + 1) if splits > 1 else 0
    partial, counter = _split_buffers(partial_numel, col_blocks, out)
    stride_oc, stride_or = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    ints = (M, C, R, rows_per_split, l.stride(0), l.stride(1), s.stride(0), stride_oc, stride_or)
    constexprs = dict(DROPOUT=dropout_p > 0, COLSUM=colsum is not None, SPLIT=splits > 1,
                      BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    entry = fast_launch.cached_launch(
        lowrank_weight_grad_kernel, (col_blocks, splits),
        (l, s, out, colsum if colsum is not None else out, partial, counter, *ints,
         float(scale), l if seed is None else seed, float(dropout_p), int(mask_ld)),
        constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    if fast and entry is not None:
        plan = fast_launch.new_plan(_PLANS, plan_key, _WeightGradPlan)
        plan.entry, plan.grid3, plan.device = entry, (col_blocks, splits, 1), l.get_device()
        plan.partial_numel, plan.col_blocks, plan.ints = partial_numel, col_blocks, ints
        plan.tail = (int(mask_ld), *(constexprs[n] for n in fast_launch.constexpr_names(lowrank_weight_grad_kernel)))


def backward(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, needs, saved):
    need_x, need_w, need_b, need_A, need_B = needs
    (u_s,) = saved  # s * drop(x) A^T
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    s = scaling / (1.0 - dropout_p)
    grad_x = grad_w = grad_b = grad_A = grad_B = None
    if need_x or need_A:
        g_s = torch.empty(M, r, dtype=grad_y.dtype, device=x.device)  # s * grad_y B
        grad_x = torch.empty(M, K, dtype=x.dtype, device=x.device)
        dropout = Dropout(seed, dropout_p, K, "term") if dropout_p > 0 else None
        if schedule(M, r) == "fused":
            launch_gemm(grad_y, weight.T, grad_x, lowrank=LowRank(lora_A.T, g_s, s, p=lora_B.T), dropout=dropout)
        else:
            launch_gemm(grad_y, lora_B.T, g_s, precise=True, out_scale=s)
            launch_gemm(grad_y, weight.T, grad_x, lowrank=LowRank(lora_A.T, g_s, s), dropout=dropout)
        if not need_x:
            grad_x = None
    if need_A:  # grad_A = s g^T drop(x) = g_s^T drop(x)
        grad_A = torch.empty(r, K, dtype=lora_A.dtype, device=x.device)
        _weight_grad(x, g_s, grad_A, scale=1.0, transpose_out=True, seed=seed, dropout_p=dropout_p, mask_ld=K)
    if need_B or need_b:  # grad_B = s grad_y^T u = grad_y^T u_s
        grad_B = torch.empty(N, r, dtype=lora_B.dtype, device=x.device)
        grad_b = torch.empty(N, dtype=grad_y.dtype, device=x.device) if need_b else None
        _weight_grad(grad_y, u_s, grad_B, scale=1.0, transpose_out=False, colsum=grad_b)
        if not need_B:
            grad_B = None
    if need_w:  # only when the user unfroze the base weight: one plain GEMM
        grad_w = grad_y.T @ x
    return grad_x, grad_w, grad_b, grad_A, grad_B


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
