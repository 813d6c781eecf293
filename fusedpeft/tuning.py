"""Choices made by measurement, kept on disk.

Two kinds of choice are measured once per shape key and then reused:

- the *path* of an op (``backends``): where several tunable backends can run the inputs (on CUDA,
  the Triton kernels and a composition of cuBLAS calls), each candidate runs the op's step
  (forward, plus backward when training) on the call's own tensors and the fastest wins;
- the Triton *tile config* of a fused launch (``triton_kernels/configs.py`` hands its winners here).

Winners persist in one JSON file, as Triton's own cache does, so a process that meets the same
shapes again starts without tuning. The file lives in ``$FUSEDPEFT_CACHE_DIR`` (default
``~/.cache/fusedpeft``) and keys every entry by the GPU's name, the torch and Triton versions and a
hash of fusedpeft's kernel sources, so one file can serve several machines and a kernel change
measures afresh. ``FUSEDPEFT_AUTOTUNE=0`` measures nothing: every op takes
its highest-priority candidate and every launch its first tile config that compiles.

Nothing is measured while a CUDA graph is being captured: a shape key first met inside a capture
takes the highest-priority candidate (warm up eagerly first, as torch.compile's cudagraph mode
does, to capture the measured path).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
from typing import Callable, Optional

import torch

from . import backends
from .settings import settings

_FILE_NAME = "tuning.json"
_FORMAT = 1

_lock = threading.Lock()
_PATHS: dict = {}  # (op, shape key) -> winning backend name, this process
generation = 0  # bumped by clear(): caches of choices made from _PATHS start afresh
_disk: Optional[dict] = None  # the file's entries, loaded on first use
LOG: list = []  # every measurement this process made: op, key, timings, winner, seconds


def enabled() -> bool:
    return settings.autotune


def cache_file() -> Optional[str]:
    """The tuning file's path; None when ``FUSEDPEFT_CACHE_DIR`` is set to the empty string."""
    folder = settings.cache_dir
    if folder == "":
        return None
    if folder is None:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fusedpeft")
    return os.path.join(folder, _FILE_NAME)


@functools.lru_cache(maxsize=None)
def kernels_hash() -> str:
    """A short hash of fusedpeft's kernel sources (triton_kernels/ and csrc/): a kernel change makes
    the stored choices, measured on the old kernels, void."""
    package = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha1()
    # a source checkout has them beside the package; an install, inside it
    for folder in ("../triton_kernels", "../csrc", "triton_kernels", "_csrc"):
        path = os.path.normpath(os.path.join(package, folder))
        if not os.path.isdir(path):
            continue
        for name in sorted(os.listdir(path)):
            if name.endswith((".py", ".cu", ".h", ".cpp")):
                with open(os.path.join(path, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """Who measured: the GPU and the software that decide what is fast, fusedpeft's kernels included."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{gpu}|torch {torch.__version__}|triton {triton_version}|kernels {kernels_hash()}"


def _load() -> dict:
    global _disk
    if _disk is None:
        _disk = {}
        path = cache_file()
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f)
                if data.get("format") == _FORMAT:
                    _disk = data.get("entries", {})
            except (OSError, ValueError):
                _disk = {}  # an unreadable file is re-measured and rewritten, never trusted
    return _disk


def _save():
    path = cache_file()
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entries = dict(_disk or {})
        if os.path.exists(path):  # keep what other processes wrote meanwhile
            try:
                with open(path) as f:
                    on_disk = json.load(f)
                if on_disk.get("format") == _FORMAT:
                    entries = {**on_disk.get("entries", {}), **entries}
            except (OSError, ValueError):
                pass
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choices still hold for this process


def lookup(kind: str, key: str):
    """The stored value for (kind, key) on this machine, or None."""
    with _lock:
        return _load().get(f"{kind}|{_machine()}|{key}")


def record(kind: str, key: str, value):
    with _lock:
        _load()[f"{kind}|{_machine()}|{key}"] = value
        _save()


def clear(disk: bool = False):
    """Forget this process's choices (and, with ``disk``, the file's)."""
    global _disk, generation
    with _lock:
        _PATHS.clear()
        generation += 1
        _disk = None
        if disk:
            path = cache_file()
            if path and os.path.exists(path):
                os.remove(path)


def entries() -> list[dict]:
    """Every path choice this process knows (measured here or read from disk), for reports."""
    with _lock:
        out = [{"op": op, "key": repr(key), "winner": name} for (op, key), name in _PATHS.items()]
    return out


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def choose(op: str, shape_key: tuple, names: list[str], bench: Callable[[str], float]) -> str:
    """The fastest of ``names`` (backend names, highest priority first) at ``shape_key``:
    from this process's memory, else the disk, else measured now with ``bench(name) -> ms``
    (None where that name is no candidate at this key)."""
    hit = _PATHS.get((op, shape_key))
    if hit is not None:
        return hit
    stored = lookup("path", f"{op}|{shape_key!r}")
    # A stored winner stands only against the candidates it was measured against: a backend
    # registered since (a new release, an extension built now) is measured, not passed over.
    measured = () if stored is None else stored.get("candidates", stored.get("ms", ()))  # older files: ms's keys
    if stored is not None and stored.get("winner") in names and set(names) <= set(measured):
        _PATHS[(op, shape_key)] = stored["winner"]
        return stored["winner"]
    if not enabled() or capturing():
        return names[0]  # not remembered: a later eager call at this key still measures
    t0 = time.perf_counter()
    samples, errors = measure_in_turns(names, bench)
    if not samples:
        raise RuntimeError(f"{op}: no candidate could run at {shape_key}: {errors}")
    timings = {name: min(times) for name, times in samples.items()}
    winner = min(timings, key=timings.get)
    _PATHS[(op, shape_key)] = winner
    LOG.append({"op": op, "key": repr(shape_key), "ms": timings, "passes": samples, "errors": errors,
                "winner": winner, "tuning_s": time.perf_counter() - t0})
    record("path", f"{op}|{shape_key!r}", {"winner": winner, "ms": timings, "candidates": list(names)})
    return winner


# How choose measures: PASSES turns over the candidates, every other one in reverse order, each
# turn ROUNDS_PER_PASS rounds of time_ms (six rounds in all, where one turn of seven was taken
# before), and each candidate's time the least of its turns. Interference on the lent GPU hosts
# only ever slows a measurement down, in bursts that moved a host-bound step by 20-40% from one
# second to the next (2048 -> 512 x 8192: the tuner's 0.92 against 0.95 ms became 1.05 against
# 0.74 a moment later). Measured one after another, a candidate that a burst covered lost whatever
# it cost; measured in turns, each is timed at several moments, and its least time is the one the
# bursts touched least.
PASSES = 3
ROUNDS_PER_PASS = 2
_rounds = None  # time_ms's rounds while measure_in_turns runs (None: its argument's)


def device_fault(exc: BaseException) -> bool:
    """Whether a candidate's failure is a CUDA error raised by running it (an illegal memory
    access, say), not a compile, resource or argument failure. CUDA errors are sticky: the
    process's context is unusable after one, so such a candidate cannot lose quietly like one that
    does not compile (every later launch would fail with no word of which candidate it was)."""
    text = str(exc).lower()
    return any(sticky in text for sticky in _STICKY_CUDA_ERRORS)


# The CUDA errors that end a context (cudaErrorIllegalAddress and its kin), as torch and Triton word
# them; "too many resources requested for launch" and the like are not among them: a candidate
# raising those only does not fit, as one whose CUDA-graph capture fails (it synchronises with the
# host: "operation not permitted when stream is capturing"). "device-side assert triggered" in
# full: torch ends every CUDA error's message with a hint naming "device-side assertions".
_STICKY_CUDA_ERRORS = ("illegal memory access", "illegal address", "illegal instruction", "misaligned address",
                       "unspecified launch failure", "device-side assert triggered", "invalid program counter",
                       "hardware stack error", "uncorrectable ecc error")


def measure_in_turns(names: list, bench: Callable[[str], Optional[float]]):
    """({name: [ms per pass]}, {name: error}) of ``bench`` over ``names`` in PASSES mirrored turns.
    A candidate that raises in any pass is out (its error kept), one whose bench answers None is no
    candidate, and one that answers LAST_RESORT is not measured again."""
    global _rounds
    samples: dict = {}
    errors: dict = {}
    out: set = set()
    previous, _rounds = _rounds, ROUNDS_PER_PASS  # (a choose inside a candidate's first run nests)
    try:
        for turn in range(PASSES):
            for name in (names if turn % 2 == 0 else names[::-1]):
                if name in out:
                    continue
                try:
                    ms = bench(name)
                except Exception as exc:  # a candidate that cannot run these inputs loses; the others decide
                    if device_fault(exc):
                        raise RuntimeError(f"candidate {name!r} faulted on the GPU while it was measured, which "
                                           f"leaves this process's CUDA context unusable: {exc}") from exc
                    errors[name] = f"{type(exc).__name__}: {str(exc)[-500:]}"
                    samples.pop(name, None)  # out, even where an earlier pass ran it
                    out.add(name)
                    continue
                if ms is None:  # no candidate at this key (it would only repeat another)
                    out.add(name)
                    continue
                samples.setdefault(name, []).append(ms)
                if ms == LAST_RESORT:  # unmeasured by design: asking again tells nothing
                    out.add(name)
    finally:
        _rounds = previous
    return samples, errors


class ChoiceMemo:
    """A caller's choices per call signature (the ops' entries: backend index and implementation),
    so that a repeated call skips select, its shape key and the tuner's look-up. Started afresh
    when a backend registers or the tuner forgets its choices (their generations), and past
    ``limit`` entries; ``put`` writes nothing during a CUDA-graph capture, where the tuner answers
    without remembering."""

    __slots__ = ("entries", "state", "limit")

    def __init__(self, limit: int = 4096):
        self.entries: dict = {}
        self.state = None
        self.limit = limit

    def get(self, key):
        state = (backends.generation, generation)
        if self.state != state or len(self.entries) > self.limit:
            self.entries.clear()
            self.state = state
        return self.entries.get(key)

    def put(self, key, value) -> None:
        if not capturing():
            self.entries[key] = value


ROWS_CLASS_MAX = 16384


def measures(x) -> bool:
    """Whether a call on ``x`` chooses among tunable candidates by measurement (CUDA tensors: the
    timings are CUDA events)."""
    return x.is_cuda


def rows_class(M: int, largest: int = ROWS_CLASS_MAX) -> int:
    """The shape keys' class for M rows: the next power of two, up to ``largest`` (the fastest
    path, and a kernel's best tile, depend on M's size class, not its exact value)."""
    return min(1 << max(M - 1, 0).bit_length(), largest)


def step_bench(forward, backward, out_shape, like: torch.Tensor, trains: bool):
    """A ``bench(impl) -> ms`` for backends.select: one step of a backend on the call's own inputs,
    ``forward(impl) -> (out, saved)`` and, when ``trains``, ``backward(impl, grad_out, saved)``
    with a random upstream gradient of ``out_shape``."""

    def bench(impl):
        grad = random_like_output(out_shape, like.dtype, like.device) if trains else None

        def step():
            out, saved = forward(impl)
            if grad is not None:
                backward(impl, grad, saved)

        return time_ms(step)

    return bench


# A candidate's time where it would break the memory promise of the "recompute" setting (it forms
# the whole M x N output again in its backward) while another candidate keeps it: it runs only if
# every other candidate fails at the key.
LAST_RESORT = math.inf


def time_step(step: Optional[Callable[[], None]]) -> Optional[float]:
    """time_ms(step), or None for no step (no candidate)."""
    return None if step is None else time_ms(step)


def composable_bench(impl, through, bare: Callable) -> Optional[float]:
    """The bench of a composable op's candidate: its step as the autograd entry runs it where the
    entry made the call (``through``, see ops/_autograd.entry_step); else ``bare(impl)``, the bare
    forward and backward the custom ops run, of which a composed_only candidate has none of its own
    (None: no candidate)."""
    if through is not None:
        return time_step(through()(impl))
    if getattr(impl, "composed_only", False):
        return None
    return bare(impl)


def _l2_scrub(device) -> torch.Tensor:
    """A buffer of twice the L2 cache (H100 50 MB, H200 60 MB; 128 MiB where torch does not say):
    zeroing it evicts what a step left in L2. Freed by the caller's scope; the caching allocator
    keeps the memory for the next candidate's measurement."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)


def time_ms(step: Callable[[], None], rounds: int = 7, round_ms: float = 2.0, cold_l2: bool = False) -> float:
    """Median time of one ``step`` on the current CUDA stream, in ms. Each round times enough
    back-to-back steps to fill about ``round_ms`` between two events, so a host-bound step is
    charged its host time, as it is inside a model. The first call (compilation, Triton's own
    tuning) is left out. Inside measure_in_turns each call takes ROUNDS_PER_PASS rounds.
    cold_l2: each step runs after the L2 cache is overwritten (the overwrite's time, the same for
    every candidate, is in the figure), as a layer runs inside a model whose other layers' weights
    pass through L2 between two of its calls: back-to-back steps of a layer whose operands exceed
    L2 by little rank candidates by how much of them stays there."""
    if _rounds is not None:
        rounds = _rounds
    if cold_l2:
        scrub = _l2_scrub(torch.cuda.current_device())
        inner = step

        def step():
            scrub.zero_()
            inner()
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    n = max(1, min(200, math.ceil(round_ms / estimate)))
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def graphed(fn: Callable) -> Callable:
    """fn captured in a CUDA graph (after three warm-up calls on a side stream, as capture wants:
    compilation, cuBLAS's workspace, any inner tuning happen there): returns the graph's replay,
    which reissues fn's kernels with none of fn's host work. Raises whatever the capture raises (fn
    synchronises with the host, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay():
        # The replay reads the memory of fn's closure (its inputs), which the graph does not own:
        # this function holds fn, so the inputs live as long as the replay can run.
        graph.replay()
        return fn

    return replay


def time_graphed_ms(step: Callable[[], None], rounds: int = 7, replays_per_round: int = 5) -> float:
    """Median time of ``step`` replayed from a CUDA graph, each replay after the L2 cache is
    overwritten: its GPU time alone, as a caller that captures its calls (a served model's decode
    step) pays it. Eager timing charges a step its host time too, and picks the candidate with the
    fewest launches where the replay would favour the one whose kernels are shortest (serving, 64
    decode rows: eager picked a path that took 1.76x the base in a graph, where another took
    1.66x). Cold L2, as in a model, where the other layers' weights pass through it between two
    calls of a layer: back-to-back replays of a 4096-wide layer keep much of its weight and bank
    in L2 (50 MB on the H100), and ranked mixed-rank serving candidates otherwise than
    benchmarks.serving's cold-L2 timings (cuda_overlap picked at 2.55x the base where sgmv_cublas
    took 2.22x). Inside measure_in_turns each call takes ROUNDS_PER_PASS rounds."""
    if _rounds is not None:
        rounds = _rounds
    replay = graphed(step)
    scrub = _l2_scrub(torch.cuda.current_device())  # written between replays
    replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(rounds * replays_per_round)]
    for start, end in events:
        scrub.zero_()
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


_GENERATORS: dict = {}


def random_like_output(shape, dtype, device) -> torch.Tensor:
    """Random data for a measurement (an upstream gradient), drawn from a private generator so
    that tuning never moves torch's own RNG: a seeded run draws the same dropout masks whether
    or not its shapes were already tuned."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
        gen.manual_seed(0)
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)
