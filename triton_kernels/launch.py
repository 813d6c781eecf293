"""Launch helpers shared by every method's launcher: operand layout, tile configs, autotuning."""
from __future__ import annotations

import functools
import inspect
import os
import threading

import torch
import triton
import triton.language as tl

from fusedpeft.settings import settings

from .fused_linear import dropout_mask_kernel, fused_linear_kernel

# Tests flip this to exercise the pointer-load path on inputs a descriptor could take.
USE_TENSOR_DESCRIPTORS = True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_SCRATCH: dict = {}
_SIDE_STREAMS: dict = {}


def persistent_buffer(make, device):
    """A device buffer that outlives the call that makes it (scratch, ticket counters), made so
    that CUDA graphs never own it. Inside a capture nothing persistent may be allocated: the
    caller gets ``None`` and makes a buffer for that launch alone (the graph keeps it). Outside,
    the buffer is made by a short-lived thread on a side stream: torch's cudagraph trees route
    every allocation of the warming-up thread to their pool, whatever its stream, and refuse a
    pool tensor that outlives the graph's outputs; another thread's allocations stay out of it."""
    if device.type != "cuda":
        return make()
    if torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    caller = torch.cuda.current_stream(index)
    made = {}

    def work():
        try:
            with torch.cuda.device(index):
                side.wait_stream(caller)  # a reused block is written only after the caller's work so far
                with torch.cuda.stream(side):
                    made["buf"] = make()
                side.synchronize()  # once per buffer: its contents are ready before any launch reads them
        except BaseException as exc:  # raised again in the caller's thread
            made["error"] = exc

    worker = threading.Thread(target=work, name="fusedpeft-buffer")
    worker.start()
    worker.join()
    if "error" in made:
        raise made["error"]
    return made["buf"]


def cached_buffer(cache: dict, key, numel: int, make, device):
    """cache[key] when it holds at least ``numel`` elements, else a new persistent_buffer from
    ``make`` kept there; inside a CUDA-graph capture, ``make()`` for that launch alone, not kept."""
    buf = cache.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf
    buf = persistent_buffer(make, device)
    if buf is None:
        return make()
    cache[key] = buf
    return buf


def _alloc(size: int, alignment: int, stream):
    # Device-side tensor descriptors need a small global scratch buffer per launch (the kernel
    # writes its descriptors there and reads them back). Launches on one stream run in order, so
    # one buffer per stream serves them all: no allocation per launch.
    return cached_buffer(_SCRATCH, stream, size,
                         lambda: torch.empty(max(size, 1 << 16), dtype=torch.int8, device="cuda"), torch.device("cuda"))


_allocator_threads = threading.local()


def ensure_allocator():
    # Triton keeps the allocator per thread, and autograd runs CUDA backward passes on its own
    # worker thread: set it once in every thread that launches.
    if not getattr(_allocator_threads, "set", False):
        triton.set_allocator(_alloc)
        _allocator_threads.set = True


def descriptor_ok(*tensors) -> bool:
    """TMA needs a 16-byte-aligned base, 16-byte-multiple row strides and a unit last stride."""
    if not USE_TENSOR_DESCRIPTORS:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16:
            return False
        if (t.stride(0) * t.element_size()) % 16 or t.shape[1] * t.element_size() < 16:
            return False
    return True


def weight_operand(mat: torch.Tensor):
    """``mat`` is the logical [N_out, K_red] matrix of ``out = a @ mat^T``. Returns the tensor to
    pass, W_KMAJOR, stride_wn, stride_wk so that no copy is made when either orientation of mat has
    a unit stride (nn.Linear weight: K-major; its transpose, or a Conv1D weight: N-major)."""
    if mat.stride(1) == 1:
        return mat, True, mat.stride(0), 1
    if mat.stride(0) == 1:
        return mat.T, False, 1, mat.stride(1)
    mat = mat.contiguous()
    return mat, True, mat.stride(0), 1


# Plain-Python helpers: triton.cdiv / triton.next_power_of_2 are constexpr-function wrappers in
# recent Triton, about 15 us a call on the host, and the launchers call them on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def split_rows(M: int, C: int, block_m: int, block_c: int, device, programs_per_sm: int = 4) -> tuple[int, int, int]:
    """Grid of the column reductions (weight gradients, column dot products): (column blocks,
    row splits, rows per split). M is split across programs so that narrow C still fills the
    GPU (about programs_per_sm programs per SM); each split's partial result is summed afterwards
    in a fixed order, so the result is deterministic."""
    col_blocks = cdiv(C, block_c)
    target = 2 if interpreting() else programs_per_sm * num_sms(device.index or 0)
    splits = max(1, min(cdiv(M, block_m * 4), cdiv(target, col_blocks)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    return col_blocks, cdiv(M, rows_per_split), rows_per_split


_COUNTERS: dict = {}


def ticket_counters(n: int, device) -> torch.Tensor:
    """At least n int32 zeros for the ticket counters of the single-launch split reductions
    (lowrank_weight_grad_kernel). The kernel's last program per block resets its counter to zero,
    so one buffer per (device, stream) serves every launch on that stream, in stream order."""
    stream = None if device.type != "cuda" else _stream(device.index if device.index is not None else torch.cuda.current_device())
    return cached_buffer(_COUNTERS, (device, stream), n,
                         lambda: torch.zeros(max(n, 1024), dtype=torch.int32, device=device), device)


def column_sums(partial: torch.Tensor, with_second: bool):
    """The column reductions' result from their float32 partials [1 or 2, parts, C]: the parts
    summed in a fixed order (deterministic), as (first [C], second [C] or None). One part needs
    no sum."""
    sums = partial[:, 0] if partial.shape[1] == 1 else partial.sum(1)
    return sums[0], (sums[1] if with_second else None)


def zero_column_sums(C: int, with_second: bool, device):
    """column_sums of an empty reduction (M = 0)."""
    zeros = torch.zeros(C, dtype=torch.float32, device=device)
    return zeros, (zeros.clone() if with_second else None)


def block_r(r: int) -> int:
    return max(16, next_power_of_2(r))


def m_bucket(M: int) -> int:
    """Autotuning key for M: the tile choice depends on its size class, not its exact value."""
    return min(next_power_of_2(max(M, 1)), 8192)


def _config(bm, bn, bk, warps, stages, ws=False, sub=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "WARP_SPECIALIZE": ws,
                          "EPI_SUBTILE": sub}, num_warps=warps, num_stages=stages)


def _gemm_configs():
    # Large M: Hopper-sized tiles (the probe's 128x256x64, 8 warps, 3 stages) and neighbours, each
    # with and without warp specialisation; the 128x256 tiles also with the epilogue in two
    # halves (EPI_SUBTILE, less shared memory: the rank-64 epilogue fits beside 3 stages).
    large = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 2), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    # Small M (decode): W is the traffic; narrow column tiles give every SM a slice of W.
    small = [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (32, 32, 256, 4, 4), (64, 64, 128, 4, 4), (64, 32, 128, 4, 4)]
    return ([_config(*c, ws=ws, sub=sub) for c in large for sub in ((True, False) if c[1] == 256 else (False,))
             for ws in (False, True)] + [_config(*c) for c in small])


def _skinny_configs(N):
    # N <= 64 (the rank-r products u = x A^T, g = grad_y B): one column tile, row tiles small
    # enough that every SM streams its share of a. (Two programs per SM on the small-row tiles was
    # tried in session 4 and never won the tuning at the benchmark shapes.)
    bn = max(16, next_power_of_2(N))
    return [_config(bm, bn, bk, 4, st) for bm, bk, st in [(32, 256, 3), (64, 128, 4), (64, 256, 3), (128, 128, 3), (16, 256, 4)]]


@functools.lru_cache(maxsize=None)
def _warp_specialization_applies() -> bool:
    # Triton 3.6 compiles this kernel's warp_specialize loop to the same binary as the plain loop on
    # Hopper (the same TTGIR but for the attribute, the same cubin): only Blackwell (sm_100+) gets
    # partitions. Timing both on Hopper would double the tuning time for nothing.
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10


def _candidates(M: int, N: int, element_size: int):
    small = M <= 64
    if N <= 64:
        cands = _skinny_configs(N)
    else:
        cands = [c for c in _gemm_configs() if (c.kwargs["BLOCK_M"] <= 64) == small
                 and (_warp_specialization_applies() or not c.kwargs["WARP_SPECIALIZE"])]
    if element_size == 4:  # fp32 tiles take twice the shared memory: halve BLOCK_K, fewer stages
        cands = [triton.Config({**c.kwargs, "BLOCK_K": c.kwargs["BLOCK_K"] // 2}, num_warps=c.num_warps,
                               num_stages=min(c.num_stages, 3)) for c in cands]
    return cands


# Autotuning, by hand rather than triton.autotune so that a config the installed Triton cannot
# compile (warp specialisation around a data-dependent branch, say) is skipped instead of failing
# the call. Key: M's size class, N, K and the constexpr flags; the first call per key times every
# candidate (about 0.1-2 s each including compilation) and later calls reuse the winner.
# settings.autotune off (FUSEDPEFT_AUTOTUNE=0) takes the first candidate that runs instead.
TUNED: dict = {}
TUNE_LOG: list = []


class NoConfigFits(RuntimeError):
    """No candidate tile config can run this launch (shared memory or registers run out)."""


# Where tuned configs persist across processes: an object with lookup(kind, key) and
# record(kind, key, value) (fusedpeft.tuning, set when the Triton backend loads); None keeps
# them in this process only.
CONFIG_STORE = None


def _config_to_json(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _config_from_json(data):
    return triton.Config(dict(data["kwargs"]), num_warps=data["num_warps"], num_stages=data["num_stages"])


def _tuned_config(key, M, N, element_size, launch_with):
    cfg = TUNED.get(key)
    if isinstance(cfg, str):  # known not to fit: fail fast, every call
        raise NoConfigFits(cfg)
    if cfg is not None:
        return cfg
    tune = settings.autotune
    if CONFIG_STORE is not None and tune:
        stored = CONFIG_STORE.lookup("triton_config", repr(key))
        if stored is not None:
            try:
                cfg = _config_from_json(stored)
                launch_with(cfg)  # a stored config that no longer runs is tuned afresh
                TUNED[key] = cfg
                return cfg
            except Exception:
                pass
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a fused launch met a new shape key inside a CUDA-graph capture, where its tile "
                           "configs cannot be timed: run the step once eagerly before capturing it")
    import time

    import triton.testing

    t0 = time.perf_counter()
    timings, errors = [], []
    for cand in _candidates(M, N, element_size):
        try:
            if tune:
                ms = triton.testing.do_bench(lambda: launch_with(cand), warmup=5, rep=25, return_mode="median")
            else:  # FUSEDPEFT_AUTOTUNE=0: the first candidate that runs (tests, quick starts)
                launch_with(cand)
                ms = 0.0
            timings.append((ms, cand))
            if not tune:
                break
        except Exception as exc:  # compile or resource failure: skip the candidate
            errors.append(f"{cand}: {type(exc).__name__}: {str(exc)[-1500:]}")
    if not timings:
        TUNED[key] = "no Triton config could run this GEMM:\n" + "\n".join(errors)
        raise NoConfigFits(TUNED[key])
    ms, cfg = min(timings, key=lambda t: t[0])
    TUNED[key] = cfg
    if CONFIG_STORE is not None and tune:
        CONFIG_STORE.record("triton_config", repr(key), _config_to_json(cfg))
    TUNE_LOG.append({"key": key, "best": str(cfg), "ms": ms, "tuning_s": time.perf_counter() - t0,
                     "failed": errors, "all": [(round(t, 4), str(c)) for t, c in sorted(timings, key=lambda t: t[0])]})
    return cfg


# Launch overhead. Triton's JIT entry point re-derives the specialisation of every argument on
# each call (about 0.1 ms per launch on the H100 machine's host for this 50-argument kernel,
# benchmarks/RESULTS.md), which dominates at decode sizes. The compiled kernel is therefore cached
# under the same facts Triton specialises on (dtype and 16-byte alignment of each pointer;
# value 1, divisibility by 16 and int32 range of each integer; the constexprs), and called
# directly. FUSEDPEFT_FAST_LAUNCH=0 goes through Triton's entry point every time.
FAST_LAUNCH = os.environ.get("FUSEDPEFT_FAST_LAUNCH", "1") != "0"
_COMPILED: dict = {}


@functools.lru_cache(maxsize=None)
def _constexpr_names(kernel) -> tuple:
    fn = getattr(kernel, "fn", kernel)
    return tuple(n for n, prm in inspect.signature(fn).parameters.items() if prm.annotation in ("tl.constexpr", tl.constexpr))


_INT32 = 2**31


def _specialization_key(args) -> tuple:
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
_current_stream = None


def _stream(device: int):
    global _current_stream
    if _current_stream is None:
        _current_stream = triton.runtime.driver.active.get_current_stream
    return _current_stream(device)


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
        if self.run is None or (_KNOBS is not None and (_KNOBS.runtime.launch_enter_hook is not None
                                                        or _KNOBS.runtime.launch_exit_hook is not None)):
            self.kernel[grid3](*args)
            return
        self.run(grid3[0], grid3[1], grid3[2], _stream(device), self.function, self.metadata, None, None, None, *args)


def _grid3(grid) -> tuple:
    return tuple(grid) + (1,) * (3 - len(grid))  # compiled kernels take a 3-D grid


def cached_launch(kernel, grid, args, constexprs: dict, num_warps: int, num_stages: int):
    """kernel[grid](*args, **constexprs) through the compiled-kernel cache above. Returns the
    _Compiled entry that ran (None in the interpreter or with FAST_LAUNCH off)."""
    if not FAST_LAUNCH or interpreting():
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return None
    device = args[0].get_device()
    key = (id(kernel), device, num_warps, num_stages, tuple(constexprs.items()), _specialization_key(args))
    entry = _COMPILED.get(key)
    if entry is not None:
        entry(_grid3(grid), device, (*args, *(constexprs[n] for n in _constexpr_names(kernel))))
        return entry
    compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    if compiled is None:
        return None
    entry = _COMPILED[key] = _Compiled(compiled)
    return entry


# The CPU interpreter runs one fixed small config: tiles smaller than the test shapes, so ragged
# edges, several K steps and the persistent loop (3 "SMs") are all exercised.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "WARP_SPECIALIZE": False,
                      "EPI_SUBTILE": True}
INTERPRETER_SMS = 3


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15 == 0)


class _FusedLinearPlan:
    """Everything about one launch_fused_linear call that depends only on its plan key (shapes,
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
            ensure_allocator()
        dummy = a
        self.entry(self.grid3, self.device, (
            a, w, dummy if out is None else out, dummy if bias is None else bias, p if self.in_loop else dummy,
            dummy if q is None else q, dummy if lr is None else lr, dummy if scale is None else scale,
            dummy if shift is None else shift, dummy if aux is None else aux, dummy if partial is None else partial,
            *self.ints, float(lr_scale), dummy if seed is None else seed, float(dropout_p), *self.tail))
        return out if partial is None else column_sums(partial, self.reduce_sum)


_PLANS: dict = {}
PLANS_MAX = 4096


def new_plan(plans: dict, key, cls):
    """A fresh cls() stored in a launcher's plan cache under key. Many distinct shapes (variable
    sequence lengths) would grow the cache without end: past PLANS_MAX it starts afresh."""
    if len(plans) > PLANS_MAX:
        plans.clear()
    plan = plans[key] = cls()
    return plan

# A precomputed LoRA term's lr / q tiles through tensor descriptors (TMA) where both allow it,
# rather than pointer loads: its MMA then reads both operands from shared memory as the TMA put
# them there (benchmarks/RESULTS.md: this is what removed most of the epilogue's cost).
# FUSEDPEFT_LORA_LOWRANK_TMA=0 turns it off.
LOWRANK_TMA = os.environ.get("FUSEDPEFT_LORA_LOWRANK_TMA", "1") != "0"

# Flattening the tile and K loops into one software-pipelined loop overlaps a tile's epilogue with
# the next tile's loads, but with the x tile scaled in registers (SCALE_A) it makes ptxas serialise
# every wgmma (see config_constexprs). For diag_rescale, LOOP_FORM overrides the choice:
# "flattened" brings that loop back for SCALE_A, "per_tile" puts every launch on per-tile K loops.
LOOP_FORM = None

# The aux tiles (z saved, or read for a column reduction) go through tensor descriptors where the
# tensors allow; False: pointer loads and stores (tests and diag_rescale).
RESCALE_TMA = os.environ.get("FUSEDPEFT_RESCALE_TMA", "1") != "0"

# Tests flip this to run the rank-r update apart from the GEMM (what happens when no tile config
# can hold the rank-r epilogue, e.g. r = 256 at large M) on inputs where the epilogue would fit.
SEPARATE_LOWRANK = False


def _lowrank_apart(a, w_mat, out, bias, q, lr, seed, dropout_p, mask_ld, dropout_out):
    """out = a @ w^T + bias by the GEMM core alone, then out += mask * (lr @ q^T) by a separate
    product (lr read from memory carries its scale already): the fallback for ranks whose epilogue
    tiles no config can hold beside the main loop. It costs one more read and write of out (4MN
    bytes in bf16), and, with dropout on the low-rank term, the M x N keep-mask (float32) for the
    time of the call."""
    launch_fused_linear(a, w_mat, out, bias=bias)
    low = lr.to(out.dtype) @ q.T.to(out.dtype)
    if dropout_out and dropout_p > 0:
        M, N = out.shape
        if mask_ld != N:
            raise ValueError(f"dropout mask rows of {mask_ld} for an output of width {N}")
        mask = torch.empty(M, N, dtype=torch.float32, device=out.device)
        dropout_mask_kernel[(M, cdiv(N, 64))](mask, M, N, seed, float(dropout_p), BLOCK=64)
        low = low * mask.to(out.dtype)
    return out.add_(low)


def config_constexprs(flags: dict, cfg: dict, element_size: int) -> dict:
    """The kernel's constexprs for one tile config: the launch's flags and the config, with the loop
    form the config allows (FLATTEN). The in-loop low-rank product (IN_LOOP_LR) branches on the row
    block, which the pipeliner's loop flattening cannot take: never flattened.

    A flattened tile-and-K loop zeroes the accumulator between tiles with a select that ptxas takes
    for a non-wgmma write to registers that a register-operand (SCALE_A) wgmma is still
    accumulating into; it then serialises every wgmma of the kernel (ptxas advisory C7515,
    benchmarks/sm90_resources.py). A per-tile K loop keeps them pipelined, but it is only safe
    where Triton 3.6 gives each step's scaled tile registers that no in-flight wgmma still reads:
    16-bit inputs on the 128-row tiles. fp32 (tf32) tiles and the 64-row, one-warpgroup tiles
    reload the next step's tile into the registers the previous step's wgmmas are reading (wrong
    results on the H100 for fp32; found for both by sm90_resources' register-operand hazard
    check), so they keep the serialised loop."""
    per_tile = flags["SCALE_A"] and LOOP_FORM != "flattened" and element_size == 2 and cfg["BLOCK_M"] >= 128
    per_tile = per_tile or LOOP_FORM == "per_tile"
    return {**flags, **cfg, "FLATTEN": not flags["IN_LOOP_LR"] and not per_tile}


def launch_fused_linear(a, w_mat, out, *, bias=None, p=None, q=None, lr=None, lr_scale=1.0,
                        seed=None, dropout_p=0.0, mask_ld=1, dropout_in=False, dropout_out=False,
                        lr_precomputed=False, mask_a=False, scale=None, scale_a=False, shift=None,
                        aux=None, save_aux=False, reduce_aux=False, reduce_sum=False, precise=False,
                        out_scale=None):
    """out = a @ w_mat^T (+ lr_scale * lr @ q^T, masked) (+ bias), see fused_linear_kernel.
    seed: the dropout seed, a one-element int64 tensor on a's device (None without dropout).
    a: [M, K]; w_mat: logical [N, K]; q: [N, R]; lr: [M, R]. With lr_precomputed, lr is read, and
    holds lr_scale * lr already; otherwise lr = (a * mask) @ p^T (p: [R, K]) is computed in the K
    loop and lr_scale * lr saved into lr (in lr's dtype). out_scale: out = out_scale * (a @ w^T),
    for the skinny launch that writes a pre-scaled lr (no other extra may come with it).
    mask_a applies the dropout mask to a in the main product (for u = drop(x) A^T itself).

    Rescaling pieces: scale ([K] with scale_a: a scaled along K; [N] otherwise: out scaled along
    N), shift ([N], added after the scale), aux ([M, N]: written with the unscaled result when
    save_aux; read when reduce_aux). out may be None (nothing stored). With reduce_aux, returns
    (sum_rows(z * aux), sum_rows(aux) if reduce_sum else None) as float32 [N] tensors, z being
    a @ w^T + bias before the scale; otherwise returns out.

    precise: for fp32 inputs, the product a @ w^T (a skinny rank-r GEMM) skips tf32. The in-loop
    rank-r product of fp32 inputs always does (see mma's IEEE)."""
    M, K = a.shape
    N = w_mat.shape[0]
    if M == 0 or N == 0:
        return zero_column_sums(N, reduce_sum, a.device) if reduce_aux else out
    if out_scale is not None:  # the kernel's one scalar multiplier (checked below, on first use)
        lr_scale = out_scale
    fast = FAST_LAUNCH and not interpreting()
    if fast:
        plan_key = (a.get_device(), _meta(a), _meta(w_mat), _meta(out), _meta(bias), _meta(p), _meta(q), _meta(lr),
                    _meta(scale), _meta(shift), _meta(aux), mask_ld, dropout_in, dropout_out, dropout_p > 0,
                    lr_precomputed, mask_a, scale_a, save_aux, reduce_aux, reduce_sum, precise, out_scale is None,
                    USE_TENSOR_DESCRIPTORS, LOWRANK_TMA, LOOP_FORM, RESCALE_TMA)
        plan = _PLANS.get(plan_key)
        if plan is not None:
            return plan(a, w_mat, out, bias, p, q, lr, scale, shift, aux, lr_scale, seed, dropout_p)
    # The rank-r update can run apart from the GEMM when it is the only extra (lr precomputed).
    lowrank_apart_ok = (q is not None and lr_precomputed and out is not None and scale is None and shift is None
                        and not save_aux and not reduce_aux)
    if SEPARATE_LOWRANK and lowrank_apart_ok:
        return _lowrank_apart(a, w_mat, out, bias, q, lr, seed, dropout_p, mask_ld, dropout_out)
    w, w_kmajor, stride_wn, stride_wk = weight_operand(w_mat)
    has_lora = q is not None
    if out_scale is not None and (has_lora or scale is not None or shift is not None or save_aux or reduce_aux):
        raise ValueError("out_scale comes alone: no LoRA term, rescaling or aux with it")
    R = q.shape[1] if has_lora else 1
    in_loop = has_lora and not lr_precomputed
    # The lr and q tiles by descriptor: q in its stored orientation ([N, R] for B, [R, N] for A).
    q_stored = None if not has_lora else q if q.stride(1) == 1 else q.T if q.stride(0) == 1 else None
    lr_desc = bool(LOWRANK_TMA and has_lora and lr_precomputed and q_stored is not None
                   and descriptor_ok(lr, q_stored))
    store_out = out is not None
    dummy = a  # never read: its constexpr flag is off
    use_desc = descriptor_ok(a, w, out)
    aux_desc = bool(RESCALE_TMA and use_desc and aux is not None and descriptor_ok(aux))
    if (use_desc or lr_desc) and not interpreting():
        ensure_allocator()
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

    if interpreting():
        cfg = INTERPRETER_CONFIG
        partial = partial_for(cfg)
        grid = (min(INTERPRETER_SMS, cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])),)
        fused_linear_kernel[grid](*args_for(partial), **config_constexprs(flags, cfg, a.element_size()),
                                  NUM_SMS=grid[0])
        return finish(partial)
    sms = num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
    last = {}

    def launch_with(cfg):
        kw = cfg.kwargs
        partial = last["partial"] = partial_for(kw)
        grid = (min(sms, cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"])),)
        constexprs = {**config_constexprs(flags, kw, a.element_size()), "NUM_SMS": sms}
        last["entry"] = cached_launch(fused_linear_kernel, grid, args_for(partial), constexprs,
                                      cfg.num_warps, cfg.num_stages)
        last["grid"], last["constexprs"] = grid, constexprs

    key = (m_bucket(M), N, K, a.dtype, tuple(sorted(flags.items())))
    try:
        cfg = _tuned_config(key, M, N, a.element_size(), launch_with)
    except NoConfigFits:
        if not lowrank_apart_ok:
            raise
        return _lowrank_apart(a, w_mat, out, bias, q, lr, seed, dropout_p, mask_ld, dropout_out)
    launch_with(cfg)
    if fast and last["entry"] is not None:
        plan = new_plan(_PLANS, plan_key, _FusedLinearPlan)
        plan.entry, plan.grid3, plan.device = last["entry"], _grid3(last["grid"]), a.get_device()
        plan.ints, plan.in_loop, plan.copy_w = ints, in_loop, w.data_ptr() != w_mat.data_ptr()
        plan.desc = use_desc or lr_desc
        plan.tail = (*tail, *(last["constexprs"][n] for n in _constexpr_names(fused_linear_kernel)))
        plan.partial_shape, plan.reduce_sum = partial_shape(cfg.kwargs), reduce_sum
    return finish(last.get("partial"))
