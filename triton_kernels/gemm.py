"""The launcher every persistent GEMM entry kernel shares (lora.py, lowrank.py, rescale.py).

A method's launcher builds its kernel's arguments in the kernel's order (tensors, then integers,
then float scalars) and its flags; ``PersistentGemm.launch`` adds the tile config
(configs.tuned_config: known, stored or timed now), the loop form and the grid, launches, and
keeps a plan under the caller's plan key. ``replay`` serves a repeated call from that plan: one
dict look-up and the launch (fast_launch), no re-derivation.

An entry kernel that reduces columns in its epilogue (rescale's grad kernel) takes a float32
``partial`` buffer right after its tensors: ``partial_planes`` planes of [row blocks, N], made per
call for the config's BLOCK_M (layout.column_sums adds them up).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.runtime.errors import OutOfResources

from fusedpeft.settings import settings
from fusedpeft.tuning import rows_class

from . import buffers, configs, fast_launch, layout
from .layout import cdiv

NOT_PLANNED = object()
# Tile configs are tuned per power-of-two class of M up to this (larger M tile alike).
TILE_ROWS_CLASS_MAX = 8192


@dataclass(frozen=True, slots=True)
class Gemm:
    """What the launcher needs of one call besides its arguments. M, N: the output's shape (the
    grid); K: the reduction; element_size: the inputs' bytes (the candidate configs); descriptors:
    whether any operand goes through a tensor descriptor (the allocator must be set); scales_a:
    the a tile is scaled in registers (configs.config_constexprs' loop form); in_loop: a rank-r
    product branches on the row block inside the K loop (never flattened); partial_planes: the
    float32 column-reduction planes the kernel writes (0: none)."""

    M: int
    N: int
    K: int
    dtype: torch.dtype
    element_size: int
    descriptors: bool
    scales_a: bool = False
    in_loop: bool = False
    partial_planes: int = 0


class _Plan:
    """A planned call: the compiled kernel, its grid, integer arguments and constexprs."""

    __slots__ = ("entry", "grid3", "device", "ints", "tail", "partial_shape", "descriptors")

    def __call__(self, tensors, scalars):
        if self.descriptors:
            buffers.ensure_allocator()
        if self.partial_shape is None:
            self.entry(self.grid3, self.device, (*tensors, *self.ints, *scalars, *self.tail))
            return None
        partial = torch.empty(self.partial_shape, dtype=torch.float32, device=tensors[0].device)
        self.entry(self.grid3, self.device, (*tensors, partial, *self.ints, *scalars, *self.tail))
        return partial


class PersistentGemm:
    """Launches one persistent entry kernel (one program per SM, NUM_SMS constexpr)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.plans = fast_launch.plan_cache()

    def replay(self, plan_key, tensors, scalars):
        """The planned call's partial sums (or None), or NOT_PLANNED when no plan is kept."""
        plan = self.plans.get(plan_key)
        return NOT_PLANNED if plan is None else plan(tensors, scalars)

    def launch(self, plan_key, tensors, ints, scalars, flags: dict, gemm: Gemm):
        """kernel(*tensors, [partial], *ints, *scalars, **flags, **tile config). Returns the partial
        sums tensor (gemm.partial_planes > 0) or None. plan_key None: keep no plan. Raises
        configs.NoConfigFits when no candidate config can run the launch."""
        M, N = gemm.M, gemm.N
        if M == 0 or N == 0:  # nothing to launch: an empty output, and column sums of nothing
            planes = gemm.partial_planes
            return torch.zeros(planes, 1, N, dtype=torch.float32, device=tensors[0].device) if planes else None

        def partial_shape(cfg):
            return (gemm.partial_planes, cdiv(M, cfg["BLOCK_M"]), N) if gemm.partial_planes else None

        def args_for(cfg):
            shape = partial_shape(cfg)
            if shape is None:
                return None, (*tensors, *ints, *scalars)
            partial = torch.empty(shape, dtype=torch.float32, device=tensors[0].device)
            return partial, (*tensors, partial, *ints, *scalars)

        def constexprs_for(cfg, sms):
            loop = configs.config_constexprs(cfg, gemm.element_size, scales_a=gemm.scales_a, in_loop=gemm.in_loop)
            return {**flags, **loop, "NUM_SMS": sms}

        if gemm.descriptors and not layout.interpreting():
            buffers.ensure_allocator()
        if layout.interpreting():
            cfg = configs.INTERPRETER_CONFIG
            grid = (min(configs.INTERPRETER_SMS, cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])),)
            partial, args = args_for(cfg)
            self.kernel[grid](*args, **constexprs_for(cfg, grid[0]))
            return partial
        sms = layout.num_sms(tensors[0].device.index if tensors[0].device.index is not None
                             else torch.cuda.current_device())
        last = {}

        def launch_with(cfg):
            kw = cfg.kwargs
            last["partial"], args = args_for(kw)
            grid = (min(sms, cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"])),)
            constexprs = constexprs_for(kw, sms)
            last["entry"] = fast_launch.cached_launch(self.kernel, grid, args, constexprs, cfg.num_warps,
                                                      cfg.num_stages)
            last["grid"], last["constexprs"], last["shape"] = grid, constexprs, partial_shape(kw)

        key = (self.kernel.__name__, rows_class(M, TILE_ROWS_CLASS_MAX), N, gemm.K, gemm.dtype,
               tuple(sorted(flags.items())))
        cfg = configs.tuned_config(key, M, N, gemm.element_size, launch_with)
        try:
            launch_with(cfg)
        except OutOfResources as exc:  # the tuner skips such a config; only a forced one gets here
            if settings.tile_config is None:
                raise
            raise configs.ForcedConfigDoesNotFit(f"settings.tile_config={settings.tile_config} ({cfg}) does not "
                                                 f"fit {self.kernel.__name__}: {exc}") from exc
        if plan_key is not None and fast_launch.enabled() and last["entry"] is not None:
            plan = fast_launch.new_plan(self.plans, plan_key, _Plan)
            plan.entry, plan.grid3, plan.device = last["entry"], fast_launch.grid3(last["grid"]), tensors[0].get_device()
            plan.ints, plan.partial_shape, plan.descriptors = ints, last["shape"], gemm.descriptors
            plan.tail = tuple(last["constexprs"][n] for n in fast_launch.constexpr_names(self.kernel))
        return last["partial"]
