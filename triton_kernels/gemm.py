"""The GEMM core's launcher: ``out = a @ w^T`` plus the extras fused_linear_kernel can apply,
each described by a small frozen record rather than a long keyword list:

    LowRank   + scale * lr @ q^T, lr read (precomputed) or computed in the K loop as a @ p^T
    Dropout   the keep-mask and where it applies (a before the rank-r product, the low-rank
              term at output positions, or the whole product a @ w^T)
    Rescale   IA3 / SSF: a scaled along K, or the result along N, a shift, the unscaled z
              written to or reduced against aux

The launcher turns them into the kernel's constexprs, picks the tile config (configs.tuned_config)
and keeps a plan per call shape, so a repeated call costs one key and one launch
(fast_launch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fusedpeft.settings import settings

from . import buffers, configs, fast_launch, layout
from .dropout import dropout_mask_kernel
from .fused_linear import fused_linear_kernel
from .layout import block_r, cdiv, column_sums, descriptor_ok, m_bucket, weight_operand, zero_column_sums


@dataclass(frozen=True, slots=True)
class LowRank:
    """+ scale * lr @ q^T. q: [N, R] (any strides). lr: [M, R]. With p ([R, K]) given, lr =
    (a * mask) @ p^T is computed in the K loop and scale * lr written to lr; without it, lr is read
    and holds scale * lr already."""

    q: torch.Tensor
    lr: torch.Tensor
    scale: float
    p: Optional[torch.Tensor] = None


@dataclass(frozen=True, slots=True)
class Dropout:
    """The dropout keep-mask (dropout_keep) drawn from ``seed`` (a one-element int64 device
    tensor) with row length ``mask_ld``, applied to ``on``: "input" masks a before the in-loop
    rank-r product, "term" the low-rank term at output positions, "product" a for the whole
    a @ w^T (the skinny u = drop(x) A^T)."""

    seed: torch.Tensor
    p: float
    mask_ld: int
    on: str


@dataclass(frozen=True, slots=True)
class Rescale:
    """IA3 / SSF. scale: [K] with scale_a (a scaled along K), else [N] (the result scaled along N);
    shift: [N], added after the scale; aux: [M, N], written with the unscaled result z = a @ w^T
    + bias (save_aux) or reduced against it (reduce_aux: the launch returns the float32 column
    sums (sum_rows(z * aux), sum_rows(aux) if reduce_sum else None))."""

    scale: Optional[torch.Tensor] = None
    scale_a: bool = False
    shift: Optional[torch.Tensor] = None
    aux: Optional[torch.Tensor] = None
    save_aux: bool = False
    reduce_aux: bool = False
    reduce_sum: bool = False


_NO_RESCALE = Rescale()
_PLANS = fast_launch.plan_cache()


class _GemmPlan:
    """Everything about one launch_gemm call that depends only on its plan key (shapes,
    strides, dtypes, alignment, flags): the compiled kernel, grid, integer arguments and
    constexprs. A repeated call then costs the key, one dict look-up and the launch itself
    (benchmarks/RESULTS.md: the host time of a LoRA training step)."""

    __slots__ = ("entry", "grid3", "device", "ints", "tail", "partial_shape", "reduce_sum", "in_loop", "copy_w",
                 "desc")

    def __call__(self, a, w, out, bias, p, q, lr, scale, shift, aux, lr_scale, seed, dropout_p):
        if self.copy_w:
            w = w.contiguous()
        partial = None
        if self.partial_shape is not None:
            partial = torch.empty(self.partial_shape, dtype=torch.float32, device=a.device)
        if self.desc:
            buffers.ensure_allocator()
        dummy = a
        self.entry(self.grid3, self.device, (
            a, w, dummy if out is None else out, dummy if bias is None else bias, p if self.in_loop else dummy,
            dummy if q is None else q, dummy if lr is None else lr, dummy if scale is None else scale,
            dummy if shift is None else shift, dummy if aux is None else aux, dummy if partial is None else partial,
            *self.ints, float(lr_scale), dummy if seed is None else seed, float(dropout_p), *self.tail))
        return out if partial is None else column_sums(partial, self.reduce_sum)


def _lowrank_apart(a, w_mat, out, bias, lowrank: LowRank, dropout: Optional[Dropout]):
    """out = a @ w^T + bias by the GEMM core alone, then out += mask * (lr @ q^T) by a separate
    product (lr read from memory carries its scale already): the fallback for ranks whose epilogue
    tiles no config can hold beside the main loop. It costs one more read and write of out (4MN
    bytes in bf16), and, with dropout on the low-rank term, the M x N keep-mask (float32) for the
    time of the call."""
    launch_gemm(a, w_mat, out, bias=bias)
    low = lowrank.lr.to(out.dtype) @ lowrank.q.T.to(out.dtype)
    if dropout is not None and dropout.on == "term" and dropout.p > 0:
        M, N = out.shape
        if dropout.mask_ld != N:
            raise ValueError(f"dropout mask rows of {dropout.mask_ld} for an output of width {N}")
        mask = torch.empty(M, N, dtype=torch.float32, device=out.device)
        dropout_mask_kernel[(M, cdiv(N, 64))](mask, M, N, dropout.seed, float(dropout.p), BLOCK=64)
        low = low * mask.to(out.dtype)
    return out.add_(low)


def launch_gemm(a, w_mat, out, *, bias=None, lowrank: Optional[LowRank] = None, dropout: Optional[Dropout] = None,
                rescale: Rescale = _NO_RESCALE, out_scale: Optional[float] = None, precise: bool = False):
    """out = a @ w_mat^T with the extras the records describe, + bias (see fused_linear_kernel).
    a: [M, K]; w_mat: logical [N, K] (either orientation in memory); out: [M, N], or None when
    only a reduction is wanted. Returns out, or with rescale.reduce_aux the column sums.

    out_scale: out = out_scale * (a @ w^T), for the skinny launch that writes a pre-scaled lr (no
    other extra may come with it). precise: for fp32 inputs, the product a @ w^T (a skinny rank-r
    GEMM) skips tf32; the in-loop rank-r product of fp32 inputs always does (see mma's IEEE)."""
    if lowrank is not None:
        q, lr, lr_scale, p = lowrank.q, lowrank.lr, lowrank.scale, lowrank.p
        lr_precomputed = p is None
    else:
        q = lr = p = None
        lr_scale, lr_precomputed = 1.0, False
    if dropout is not None:
        seed, dropout_p, mask_ld, on = dropout.seed, dropout.p, dropout.mask_ld, dropout.on
        if on not in ("input", "term", "product"):
            raise ValueError(f"Dropout.on is 'input', 'term' or 'product', got {on!r}")
    else:
        seed, dropout_p, mask_ld, on = None, 0.0, 1, None
    dropout_in, dropout_out, mask_a = on == "input", on == "term", on == "product"
    scale, scale_a, shift, aux = rescale.scale, rescale.scale_a, rescale.shift, rescale.aux
    save_aux, reduce_aux, reduce_sum = rescale.save_aux, rescale.reduce_aux, rescale.reduce_sum
    M, K = a.shape
    N = w_mat.shape[0]
    if M == 0 or N == 0:
        return zero_column_sums(N, reduce_sum, a.device) if reduce_aux else out
    if out_scale is not None:  # the kernel's one scalar multiplier (checked below, on first use)
        lr_scale = out_scale
    fast = fast_launch.enabled()
    if fast:
        meta = fast_launch.meta
        plan_key = (a.get_device(), meta(a), meta(w_mat), meta(out), meta(bias), meta(p), meta(q), meta(lr),
                    meta(scale), meta(shift), meta(aux), mask_ld, dropout_in, dropout_out, dropout_p > 0,
                    lr_precomputed, mask_a, scale_a, save_aux, reduce_aux, reduce_sum, precise, out_scale is None,
                    settings.generation)
        plan = _PLANS.get(plan_key)
        if plan is not None:
            return plan(a, w_mat, out, bias, p, q, lr, scale, shift, aux, lr_scale, seed, dropout_p)
    # The rank-r update can run apart from the GEMM when it is the only extra (lr precomputed).
    lowrank_apart_ok = (q is not None and lr_precomputed and out is not None and scale is None and shift is None
                        and not save_aux and not reduce_aux)
    if settings.separate_lowrank and lowrank_apart_ok:
        return _lowrank_apart(a, w_mat, out, bias, lowrank, dropout)
    w, w_kmajor, stride_wn, stride_wk = weight_operand(w_mat)
    has_lora = q is not None
    if out_scale is not None and (has_lora or scale is not None or shift is not None or save_aux or reduce_aux):
        raise ValueError("out_scale comes alone: no LoRA term, rescaling or aux with it")
    R = q.shape[1] if has_lora else 1
    in_loop = has_lora and not lr_precomputed
    # The lr and q tiles by descriptor: q in its stored orientation ([N, R] for B, [R, N] for A).
    q_stored = None if not has_lora else q if q.stride(1) == 1 else q.T if q.stride(0) == 1 else None
    lr_desc = bool(settings.lowrank_tma and has_lora and lr_precomputed and q_stored is not None
                   and descriptor_ok(lr, q_stored))
    store_out = out is not None
    dummy = a  # never read: its constexpr flag is off
    use_desc = descriptor_ok(a, w, out)
    aux_desc = bool(settings.rescale_tma and use_desc and aux is not None and descriptor_ok(aux))
    if (use_desc or lr_desc) and not layout.interpreting():
        buffers.ensure_allocator()
    ints = (M, N, K, R,
            a.stride(0), a.stride(1), stride_wn, stride_wk,
            out.stride(0) if store_out else 0, out.stride(1) if store_out else 0,
            p.stride(0) if in_loop else 0, p.stride(1) if in_loop else 0,
            q.stride(0) if has_lora else 0, q.stride(1) if has_lora else 0,
            lr.stride(0) if lr is not None else 0,
            aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0)
    tail = (int(mask_ld), m_bucket(M))

    def args_for(partial):
        return (
            a, w, out if store_out else dummy, bias if bias is not None else dummy, p if in_loop else dummy,
            q if has_lora else dummy, lr if lr is not None else dummy, scale if scale is not None else dummy,
            shift if shift is not None else dummy, aux if aux is not None else dummy,
            partial if partial is not None else dummy,
            *ints, float(lr_scale), seed if seed is not None else dummy, float(dropout_p), *tail,
        )

    def partial_shape(cfg):
        # [2 if reduce_sum else 1, row blocks, N] float32: one row per row block of the config.
        return (2 if reduce_sum else 1, cdiv(M, cfg["BLOCK_M"]), N) if reduce_aux else None

    def partial_for(cfg):
        shape = partial_shape(cfg)
        return None if shape is None else torch.empty(shape, dtype=torch.float32, device=a.device)

    flags = dict(
        HAS_BIAS=bias is not None, LR_EPILOGUE=has_lora, W_KMAJOR=w_kmajor,
        DROPOUT_IN=bool(dropout_in and dropout_p > 0), DROPOUT_OUT=bool(dropout_out and dropout_p > 0),
        SAVE_LR=lr is not None and in_loop, LR_PRECOMPUTED=bool(has_lora and lr_precomputed),
        MASK_A=bool(mask_a and dropout_p > 0), IN_LOOP_LR=in_loop,  # FLATTEN: per config, config_constexprs
        ACC_SCALE=out_scale is not None,
        SCALE_A=bool(scale is not None and scale_a), SAVE_AUX=bool(save_aux), REDUCE_AUX=bool(reduce_aux),
        REDUCE_SUM=bool(reduce_aux and reduce_sum), SCALE_OUT=bool(scale is not None and not scale_a),
        SHIFT_OUT=shift is not None, STORE_OUT=store_out,
        PRECISE_MAIN=bool(precise and a.dtype == torch.float32), PRECISE_LR=bool(in_loop and a.dtype == torch.float32),
        USE_DESC=use_desc, BLOCK_R=block_r(R), EVEN_R=R == block_r(R), LR_DESC=lr_desc,
        Q_RMAJOR=q_stored is q, AUX_DESC=aux_desc,
    )

    def finish(partial):
        return out if partial is None else column_sums(partial, reduce_sum)

    if layout.interpreting():
        cfg = configs.INTERPRETER_CONFIG
        partial = partial_for(cfg)
        grid = (min(configs.INTERPRETER_SMS, cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])),)
        fused_linear_kernel[grid](*args_for(partial), **configs.config_constexprs(flags, cfg, a.element_size()),
                                  NUM_SMS=grid[0])
        return finish(partial)
    sms = layout.num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
    last = {}

    def launch_with(cfg):
        kw = cfg.kwargs
        partial = last["partial"] = partial_for(kw)
        grid = (min(sms, cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"])),)
        constexprs = {**configs.config_constexprs(flags, kw, a.element_size()), "NUM_SMS": sms}
        last["entry"] = fast_launch.cached_launch(fused_linear_kernel, grid, args_for(partial), constexprs,
                                      cfg.num_warps, cfg.num_stages)
        last["grid"], last["constexprs"] = grid, constexprs

    key = (m_bucket(M), N, K, a.dtype, tuple(sorted(flags.items())))
    try:
        cfg = configs.tuned_config(key, M, N, a.element_size(), launch_with)
    except configs.NoConfigFits:
        if not lowrank_apart_ok:
            raise
        return _lowrank_apart(a, w_mat, out, bias, lowrank, dropout)
    launch_with(cfg)
    if fast and last["entry"] is not None:
        plan = fast_launch.new_plan(_PLANS, plan_key, _GemmPlan)
        plan.entry, plan.grid3, plan.device = last["entry"], fast_launch.grid3(last["grid"]), a.get_device()
        plan.ints, plan.in_loop, plan.copy_w = ints, in_loop, w.data_ptr() != w_mat.data_ptr()
        plan.desc = use_desc or lr_desc
        plan.tail = (*tail, *(last["constexprs"][n] for n in fast_launch.constexpr_names(fused_linear_kernel)))
        plan.partial_shape, plan.reduce_sum = partial_shape(cfg.kwargs), reduce_sum
    return finish(last.get("partial"))
