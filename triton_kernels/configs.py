"""Tile configs of the GEMM core and the tuner that picks one per launch key."""
from __future__ import annotations

import functools
import time

import torch
import triton

from fusedpeft.settings import settings
from fusedpeft.tuning import device_fault

from .layout import next_power_of_2

def _config(bm, bn, bk, warps, stages, ws=False, sub=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "WARP_SPECIALIZE": ws,
                          "EPI_SUBTILE": sub}, num_warps=warps, num_stages=stages)


def _gemm_configs():
    # Large M: Hopper-sized tiles (the probe's 128x256x64, 8 warps, 3 stages) and neighbours, each
    # with and without warp specialisation; the 128x256 tiles also with the epilogue in two
    # halves (EPI_SUBTILE, less shared memory: the rank-64 epilogue fits beside 3 stages).
    # 128-row tiles run with 8 warps (two warpgroups), never 4: under Triton 3.6 on the H100
    # (tools.config_faults, benchmarks/RESULTS.md) the one-warpgroup 128 x 128 and 128 x 64 tiles
    # gave grad_x of a 960 x 195 -> 13 layer wrong (relative error 0.72-0.75, bf16 and fp16, with
    # and without dropout) and faulted in the forward at 518 x 716 -> 704 and 78 x 598 -> 128
    # (fp16, r = 32), and the skinny 128 x 16 x 128 tile at 4 warps faulted at 960 x 195 -> 13.
    large = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 2), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4),
             (64, 128, 64, 4, 4)]
    # Small M (decode): W is the traffic; narrow column tiles give every SM a slice of W. Not 64 x 32
    # x 128 at 4 warps and 4 stages: its grad_x with the rank-r product in the loop was wrong at 2 x
    # 7404 -> 399 (relative error 9.9, memcheck clean) and faulted at 32 x 20 -> 15442, where the
    # skinny list below gave it (H100, Triton 3.6).
    small = [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (32, 32, 256, 4, 4), (64, 64, 128, 4, 4)]
    return ([_config(*c, ws=ws, sub=sub) for c in large for sub in ((True, False) if c[1] == 256 else (False,))
             for ws in (False, True)] + [_config(*c) for c in small])


def _skinny_configs(N):
    # N <= 64 (the rank-r products u = x A^T, g = grad_y B): one column tile, row tiles small
    # enough that every SM streams its share of a. (Two programs per SM on the small-row tiles
    # never won the tuning at the benchmark shapes: benchmarks/RESULTS.md.) With dropout the pass
    # is bound by the mask's integer work (about 8 operations an element), not the read: one
    # program of 4 warps per SM leaves each scheduler one warp to hide the philox chain's latency,
    # so the 64 x 256 tile is also tried with 8; the 128-row tile runs with 8 only (_gemm_configs).
    # (64 x 128 at 4 stages and 4 warps is out: at N = 20 it is _gemm_configs' faulting 64 x 32 x 128.)
    bn = max(16, next_power_of_2(N))
    return [_config(bm, bn, bk, w, st) for bm, bk, st, w in [(32, 256, 3, 4), (64, 256, 3, 4),
                                                            (16, 256, 4, 4), (64, 256, 3, 8), (128, 128, 3, 8)]]


@functools.lru_cache(maxsize=None)
def _warp_specialization_applies() -> bool:
    # Triton 3.6 compiles this kernel's warp_specialize loop to the same binary as the plain loop on
    # Hopper (the same TTGIR but for the attribute, the same cubin): only Blackwell (sm_100+) gets
    # partitions. Timing both on Hopper would double the tuning time for nothing.
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10


def candidates(M: int, N: int, element_size: int) -> list:
    """The tile configs the tuner times for an M x N output of element_size-byte inputs."""
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
# settings.autotune off takes the first candidate that runs instead; settings.tile_config forces
# one candidate by its index (diagnostics).
TUNED: dict = {}
TUNE_LOG: list = []


class NoConfigFits(RuntimeError):
    """No candidate tile config can run this launch (shared memory or registers run out)."""


class ForcedConfigDoesNotFit(RuntimeError):
    """settings.tile_config names a config this launch cannot run (the tuner would skip it). Not a
    NoConfigFits: a launcher's fallback for launches no config fits must not hide it."""


# Where tuned configs persist across processes: an object with lookup(kind, key) and
# record(kind, key, value) (fusedpeft.tuning, set when the Triton backend loads); None keeps
# them in this process only.
CONFIG_STORE = None


def _config_to_json(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _config_from_json(data):
    return triton.Config(dict(data["kwargs"]), num_warps=data["num_warps"], num_stages=data["num_stages"])


def _fault(cfg, key, M, N, exc) -> RuntimeError:
    return RuntimeError(f"tile config {cfg} of {key[0]} (M={M}, N={N}, key {key}) faulted on the GPU, which leaves "
                        f"this process's CUDA context unusable: {exc}")


def tuned_config(key, M, N, element_size, launch_with):
    """The tile config for a launch key: known, stored, or timed now over candidates()
    (launch_with(cfg) runs the launch with cfg). Raises NoConfigFits when none can run."""
    forced = settings.tile_config
    if forced is not None:
        cands = candidates(M, N, element_size)
        if forced >= len(cands):
            raise ValueError(f"settings.tile_config={forced}, but this launch has {len(cands)} candidate configs")
        return cands[forced]
    tune = settings.autotune
    # A pick made with autotune off (the first config that runs) or under a forced loop form is
    # kept for those settings alone, and only a tuned pick in the loop form of choice is stored.
    memo = (key, tune, settings.loop_form)
    persist = CONFIG_STORE is not None and tune and settings.loop_form == "auto"
    cfg = TUNED.get(memo)
    if isinstance(cfg, str):  # known not to fit: fail fast, every call
        raise NoConfigFits(cfg)
    if cfg is not None:
        return cfg
    if persist:
        stored = CONFIG_STORE.lookup("triton_config", repr(key))
        if stored is not None:
            try:
                cfg = _config_from_json(stored)
                launch_with(cfg)  # a stored config that no longer runs is tuned afresh
                TUNED[memo] = cfg
                return cfg
            except Exception as exc:
                if device_fault(exc):
                    raise _fault(cfg, key, M, N, exc) from exc
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a fused launch met a new shape key inside a CUDA-graph capture, where its tile "
                           "configs cannot be timed: run the step once eagerly before capturing it")
    import triton.testing

    t0 = time.perf_counter()
    timings, errors = [], []
    for cand in candidates(M, N, element_size):
        try:
            if tune:
                ms = triton.testing.do_bench(lambda: launch_with(cand), warmup=5, rep=25, return_mode="median")
            else:  # autotune off: the first candidate that runs (tests, quick starts)
                launch_with(cand)
                ms = 0.0
            timings.append((ms, cand))
            if not tune:
                break
        except Exception as exc:  # compile or resource failure: skip the candidate
            if device_fault(exc):  # sticky: every later launch of the process would fail, unexplained
                raise _fault(cand, key, M, N, exc) from exc
            errors.append(f"{cand}: {type(exc).__name__}: {str(exc)[-1500:]}")
    if not timings:
        TUNED[memo] = "no Triton config could run this GEMM:\n" + "\n".join(errors)
        raise NoConfigFits(TUNED[memo])
    ms, cfg = min(timings, key=lambda t: t[0])
    TUNED[memo] = cfg
    if persist:
        CONFIG_STORE.record("triton_config", repr(key), _config_to_json(cfg))
    TUNE_LOG.append({"key": key, "best": str(cfg), "ms": ms, "tuning_s": time.perf_counter() - t0,
                     "failed": errors, "all": [(round(t, 4), str(c)) for t, c in sorted(timings, key=lambda t: t[0])]})
    return cfg


# The CPU interpreter runs one fixed small config: tiles smaller than the test shapes, so ragged
# edges, several K steps and the persistent loop (3 "SMs") are all exercised.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "WARP_SPECIALIZE": False,
                      "EPI_SUBTILE": True}
INTERPRETER_SMS = 3


def config_constexprs(cfg: dict, element_size: int, *, scales_a: bool = False, in_loop: bool = False) -> dict:
    """A tile config's constexprs with the loop form it allows (FLATTEN; settings.loop_form
    "flattened" or "per_tile" forces one). A kernel whose K loop branches on the row block
    (``in_loop``: the rank-r product computed beside the main loop) cannot take the pipeliner's loop
    flattening: never flattened.

    ``scales_a``: the a tile is scaled in registers before the MMA. A flattened tile-and-K loop
    zeroes the accumulator between tiles with a select that ptxas takes for a non-wgmma write to
    registers that a register-operand wgmma is still accumulating into; it then serialises every
    wgmma of the kernel (ptxas advisory C7515, tools/sm90_resources.py). A per-tile K loop keeps
    them pipelined, but it is only safe where Triton 3.6 gives each step's scaled tile registers
    that no in-flight wgmma still reads: 16-bit inputs on the 128-row tiles. fp32 (tf32) tiles and
    the 64-row, one-warpgroup tiles reload the next step's tile into the registers the previous
    step's wgmmas are reading (wrong results on the H100 for fp32; found for both by
    sm90_resources' register-operand hazard check), so they keep the serialised loop."""
    loop_form = settings.loop_form
    per_tile = scales_a and loop_form != "flattened" and element_size == 2 and cfg["BLOCK_M"] >= 128
    per_tile = per_tile or loop_form == "per_tile"
    return {**cfg, "FLATTEN": not in_loop and not per_tile}
