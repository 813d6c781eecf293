"""Launch overhead: compiled kernels replayed without Triton's entry point, and launch plans."""
from __future__ import annotations

import functools
import inspect

import triton
import triton.language as tl

from fusedpeft.settings import settings

from .buffers import current_stream
from . import layout

# Launch overhead. Triton's JIT entry point re-derives the specialisation of every argument on
# each call (about 0.1 ms per launch on the H100 machine's host for this 50-argument kernel,
# benchmarks/RESULTS.md), which dominates at decode sizes. The compiled kernel is therefore cached
# under the same facts Triton specialises on (dtype and 16-byte alignment of each pointer;
# value 1, divisibility by 16 and int32 range of each integer; the constexprs), and called
# directly. settings.fast_launch off (FUSEDPEFT_FAST_LAUNCH=0) goes through Triton's entry point
# every time.
COMPILED: dict = {}


@functools.lru_cache(maxsize=None)
def constexpr_names(kernel) -> tuple:
    fn = getattr(kernel, "fn", kernel)
    return tuple(n for n, prm in inspect.signature(fn).parameters.items() if prm.annotation in ("tl.constexpr", tl.constexpr))


_INT32 = 2**31


def specialization_key(args) -> tuple:
    """The facts Triton specialises on, per argument: a tensor's dtype and 16-byte alignment; an
    int's being 1, its divisibility by 16 and whether it fits int32 (packed into one small int);
    bools and floats by value / type. One pass without isinstance chains: this runs on every
    launch, and was a third of its host time (benchmarks/RESULTS.md)."""
    key = []
    append = key.append
    for v in args:
        kind = type(v)
        if kind is int:
            append((v == 1) | ((v & 15) == 0) << 1 | (not -_INT32 <= v < _INT32) << 2)
        elif kind is float:
            append(float)
        elif kind is bool:
            append((bool, v))
        else:  # a tensor (Parameter and other subclasses included)
            append(v.dtype)
            append(v.data_ptr() & 15 == 0)
    return tuple(key)


_KNOBS = getattr(triton, "knobs", None)


def launch_hooks_installed() -> bool:
    """Whether a launch hook (a profiler's) is installed, which only Triton's own entry calls.
    Triton 3.5 and later hold each hook as a HookChain, present and empty unless something added to
    it: testing it against None alone sent every launch through kernel[grid] (Triton's runner,
    its launch-metadata dict and two empty hook calls per launch)."""
    if _KNOBS is None:
        return False
    runtime = _KNOBS.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):  # a loop: half a generator's time
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class _Compiled:
    """A compiled kernel and a way to launch it: straight through its launcher (the C function
    behind CompiledKernel.run) when this Triton lays it out as 3.6 does, skipping the closure
    CompiledKernel.__getitem__ builds and the device / stream / metadata look-ups it makes per
    call; through kernel[grid] otherwise, or while a launch hook (a profiler) is installed."""

    __slots__ = ("kernel", "run", "function", "metadata")

    def __init__(self, kernel):
        self.kernel = kernel
        try:
            kernel._init_handles()
            self.run, self.function, self.metadata = kernel.run, kernel.function, kernel.packed_metadata
        except AttributeError:
            self.run = None

    def __call__(self, grid3, device: int, args):
        if self.run is None or launch_hooks_installed():
            self.kernel[grid3](*args)
            return
        try:
            self.run(grid3[0], grid3[1], grid3[2], current_stream(device), self.function, self.metadata, None, None,
                     None, *args)
        except TypeError:  # a launcher laid out otherwise than 3.6's: Triton's entry from now on
            self.run = None
            self.kernel[grid3](*args)


def grid3(grid) -> tuple:
    return tuple(grid) + (1,) * (3 - len(grid))  # compiled kernels take a 3-D grid


def cached_launch(kernel, grid, args, constexprs: dict, num_warps: int, num_stages: int):
    """kernel[grid](*args, **constexprs) through the compiled-kernel cache above. Returns the
    _Compiled entry that ran (None in the interpreter or with settings.fast_launch off)."""
    if not enabled():
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return None
    device = args[0].get_device()
    key = (id(kernel), device, num_warps, num_stages, tuple(constexprs.items()), specialization_key(args))
    entry = COMPILED.get(key)
    if entry is not None:
        entry(grid3(grid), device, (*args, *(constexprs[n] for n in constexpr_names(kernel))))
        return entry
    compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    if compiled is None:
        return None
    entry = COMPILED[key] = _Compiled(compiled)
    return entry


def enabled() -> bool:
    """Whether launches go through the compiled-kernel cache and plans (never in the interpreter)."""
    return settings.fast_launch and not layout.interpreting()


def meta(t):
    """What a plan key holds of a tensor argument: shape, strides, dtype, 16-byte alignment."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15 == 0)


# Every launcher's plan cache, so that clear_plans() can empty them all.
_PLAN_CACHES: list = []
PLANS_MAX = 4096


def plan_cache() -> dict:
    """A new plan cache (plan key -> plan) for one launcher."""
    cache: dict = {}
    _PLAN_CACHES.append(cache)
    return cache


def clear_plans():
    """Forget every launcher's plans (the next calls plan afresh, e.g. after a config change)."""
    for cache in _PLAN_CACHES:
        cache.clear()


def new_plan(plans: dict, key, cls):
    """A fresh cls() stored in a launcher's plan cache under key. Many distinct shapes (variable
    sequence lengths) would grow the cache without end: past PLANS_MAX it starts afresh."""
    if len(plans) > PLANS_MAX:
        plans.clear()
    plan = plans[key] = cls()
    return plan
