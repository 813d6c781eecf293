"""Backend registry: each op (``lora_linear``, ``ia3_linear``, ``ssf_linear``) has one or more
implementations: ``torch`` everywhere, and others where their code can run. The choice, per call:

1. ``settings.backend``: a ``use_backend(name)`` block (innermost first), else the
   ``FUSEDPEFT_BACKEND`` environment variable (``torch``, ``triton``, ``cublas``, ... or ``auto``);
2. else the highest-priority backend whose ``supports`` accepts the inputs (device, dtype, shape).
   Where several *tunable* backends accept them (on CUDA: the Triton kernels and the
   compositions of cuBLAS calls), the op's shape key picks among them by measurement
   (``fusedpeft.tuning``): the fastest candidate at that shape runs, and the choice persists.

A backend named by 1 that cannot take the inputs raises, naming why: a forced choice is
never silently replaced by another. ``last_backend(op)`` says which implementation ran last.

How a backend registers
-----------------------
Each op file registers its ``torch`` reference (``fusedpeft/ops/lora.py``, ``ops/ia3.py``,
``ops/ssf.py``); every other backend lives in a module of this package that registers itself when
imported: ``triton.py`` holds the Triton kernels and the cuBLAS compositions that draw their masks
with Triton. ``fusedpeft/__init__.py`` imports these modules after ``fusedpeft.ops``, in a fixed
order (and each module imports ``fusedpeft.ops`` before it registers anything), so that the
registration index of every (op, backend) pair is the same in every process: the reference is
index 0, then the backends in the order their modules register them. Compiled
graphs carry that index (``forced_index``) and the backward finds the forward's backend by it
(``impl_at``). A backend module calls, for each op it serves::

    register(op, name, load=..., supports=..., priority=..., tunable=...)

- ``load()`` takes no argument and returns the implementation, an object with the op's functions
  (``forward``, ``backward`` and, for LoRA, ``dropout_mask``: see the op file for their
  signatures). It runs on first use, so it is where the module imports its compiled code: importing
  fusedpeft never imports triton or a CUDA extension. An exception it raises becomes the reason the
  backend cannot run, reported to whoever names it.
- ``supports(x, weight, forced=False)`` reads only the tensors' devices and dtypes (a choice is
  cached per device types and dtypes) and returns None when the backend can run them, else why not.
- ``priority`` orders the automatic choice; ``tunable`` makes the backend a measured candidate.

The CUDA extension built from ``csrc/`` fits the same way: ``backends/cuda.py`` imports it inside
``load`` (fusedpeft/_cuda_ext.py builds it at first use where it was not built at install, so the
package imports where it never was), reports in ``supports`` why it cannot run (no CUDA tensors, a
dtype it lacks), and is imported by ``fusedpeft/__init__.py`` after ``triton``, so that the indices
already given do not move; ``cublas.py`` (compositions of cuBLAS calls through torch ops that need
neither Triton nor the extension) comes after it.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..settings import settings

ENV_VAR = "FUSEDPEFT_BACKEND"


class LoadRefused(RuntimeError):
    """A loader's refusal that a setting decides (e.g. skip_cuda_build): reported, but not kept,
    so the backend is tried again once the setting changes."""


@dataclass
class Backend:
    name: str
    priority: int
    # supports(*tensors, forced=bool) -> None when the backend can run these inputs, else the reason
    # it cannot. `forced` is True when the user named this backend (some paths, such as Triton's
    # CPU interpreter, are for testing and are never picked automatically).
    supports: Callable[..., Optional[str]]
    # A zero-argument loader returning the implementation, called on first use (so that
    # `import fusedpeft` never imports triton or compiles CUDA code).
    load: Callable[[], Any]
    # An automatic candidate timed against the op's other tunable backends per shape key.
    tunable: bool = False
    _impl: Any = None
    _load_error: Optional[str] = None

    def impl(self):
        if self._impl is None:
            self._impl = self.load()
        return self._impl

    def unavailable_reason(self) -> Optional[str]:
        if self._impl is not None:
            return None
        if self._load_error is None:
            try:
                self.impl()
            except LoadRefused as exc:
                return f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # the reason is reported to whoever asks for this backend
                self._load_error = f"{type(exc).__name__}: {exc}"
        return self._load_error


_REGISTRY: dict[str, dict[str, Backend]] = {}
_CHOICE: dict[tuple, Backend] = {}  # select()'s cache; cleared when a backend is registered
# Bumped by every registration: caches of choices made through select (the composable ops' entry
# memo) compare it and start afresh.
generation = 0
_INDEX: dict[tuple[str, str], int] = {}  # (op, name) -> registration index, and back
_BY_INDEX: dict[tuple[str, int], Backend] = {}
_LAST: dict[str, str] = {}
_COUNTS: dict[tuple[str, str], int] = {}


def register(op: str, name: str, load: Callable[[], Any], supports: Callable[..., Optional[str]], priority: int,
             tunable: bool = False):
    _REGISTRY.setdefault(op, {})[name] = Backend(name=name, priority=priority, supports=supports, load=load,
                                                 tunable=tunable)
    _CHOICE.clear()
    _HELPERS.clear()
    global generation
    generation += 1
    for i, (n, b) in enumerate(_REGISTRY[op].items()):
        _INDEX[(op, n)] = i
        _BY_INDEX[(op, i)] = b


def registered(op: str) -> list[str]:
    return sorted(_REGISTRY.get(op, {}), key=lambda n: -_REGISTRY[op][n].priority)


_HELPERS: dict = {}


def helper_impl(op: str, name: str, *tensors):
    """The implementation of ``op``'s backend ``name`` when it can run these tensors, else None:
    for a part of an op computed before its backend is chosen (DoRA's row norms), which takes a
    backend's kernel where that runs and the reference elsewhere. A forced backend of another name
    (``use_backend("torch")``) keeps the reference; the forced name itself may use the paths only
    a named backend takes (Triton's interpreter on CPU). Cached per forced name, devices and dtypes,
    as select's choices."""
    forced = _forced()
    key = (op, name, forced, *[(t.device, t.dtype) for t in tensors])
    hit = _HELPERS.get(key)
    if hit is None:
        backend = _REGISTRY.get(op, {}).get(name)
        runs = (backend is not None and forced in (None, name)
                and not (backend.supports(*tensors, forced=forced == name) or backend.unavailable_reason()))
        hit = _HELPERS[key] = (backend.impl(),) if runs else (None,)
    return hit[0]


def _forced() -> Optional[str]:
    # values() rather than settings.backend: dynamo traces a plain method and an attribute of a
    # frozen dataclass, not Settings.__getattr__, and guards the compiled graph on the value.
    value = settings.values().backend
    return None if value == "auto" else value


def use_backend(name: str):
    """Force one backend for every fusedpeft op inside the block (``"auto"`` restores the default):
    ``settings.override(backend=name)``."""
    return settings.override(backend=name.strip().lower() if isinstance(name, str) else name)


def forced_index(op: str, *tensors) -> int:
    """Registration index of the backend that a ``use_backend`` block or FUSEDPEFT_BACKEND forces
    for these inputs (checked as select checks it), or -1 when none is forced. torch.compile reads
    it while tracing and passes it to the custom ops, whose forward and backward then agree
    without a tensor carrying the choice."""
    forced = _forced()
    if forced is None:
        return -1
    return _forced_index(op, forced, tuple((t.device.type, t.dtype) for t in tensors))


class _Kind:
    """What ``supports`` may read of a tensor: its device and dtype."""

    def __init__(self, device_type, dtype):
        import torch

        self.device, self.dtype = torch.device(device_type), dtype


def _constant_while_tracing(fn):
    # Dynamo calls fn with its (constant) arguments at trace time and keeps the int it returns,
    # rather than tracing the registry's checks (which import and inspect modules). The mark is
    # the one torch.compiler.assume_constant_result sets; that function imports torch._dynamo, and
    # with it triton, which importing fusedpeft must not do. tests/test_compile.py checks that
    # dynamo honours the mark.
    fn._dynamo_marked_constant = True
    return fn


@_constant_while_tracing
def _forced_index(op: str, forced: str, kinds: tuple) -> int:
    return _INDEX[(op, _choose(op, forced, [_Kind(*k) for k in kinds]).name)]


def select(op: str, *tensors, tune=None, index: int = -1, record: bool = True) -> tuple[str, Any]:
    """Pick the backend for ``op`` on these inputs; returns (name, implementation).

    ``supports`` may look only at the tensors' device types and dtypes, so a choice is cached per
    (op, forced name, devices, dtypes): the per-call cost is one dict lookup. Where several
    tunable backends qualify, ``tune = (shape_key, bench)`` picks among them: ``bench(impl)``
    times one candidate on these inputs (ms), and runs only the first time a shape key is seen
    (fusedpeft.tuning keeps the winner, on disk too). Without ``tune`` the highest priority wins."""
    if index >= 0:  # chosen already (forced_index)
        hit = _BY_INDEX[(op, index)]
    else:
        forced = _forced()
        # The device itself, not device.type: building the type string is most of the key's cost.
        key = (op, forced, *[(t.device, t.dtype) for t in tensors])
        hit = _CHOICE.get(key)
        if hit is None:
            hit = _CHOICE[key] = _choose(op, forced, tensors)
        if type(hit) is tuple:
            hit = _measured(op, hit, tune)
    return _record(op, hit) if record else (hit.name, hit.impl())


def _measured(op: str, candidates: tuple, tune) -> Backend:
    if tune is None:
        return candidates[0]
    from .. import tuning

    shape_key, bench = tune
    name = tuning.choose(op, shape_key, [b.name for b in candidates],
                         lambda n: bench(_REGISTRY[op][n].impl()))
    return _REGISTRY[op][name]


def _choose(op: str, forced: Optional[str], tensors) -> Backend:
    backends = _REGISTRY.get(op)
    if not backends:
        raise KeyError(f"no backend registered for op {op!r}")
    if forced is not None:
        backend = backends.get(forced)
        if backend is None:
            raise RuntimeError(
                f"{op}: backend {forced!r} was requested (use_backend / {ENV_VAR}) but {op} has "
                f"only {registered(op)}"
            )
        reason = backend.unavailable_reason() or backend.supports(*tensors, forced=True)
        if reason:
            raise RuntimeError(f"{op}: backend {forced!r} was requested but cannot run these inputs: {reason}")
        return backend
    usable = [backends[name] for name in registered(op)
              if backends[name].supports(*tensors, forced=False) is None and backends[name].unavailable_reason() is None]
    if not usable:
        raise RuntimeError(f"{op}: no registered backend accepts these inputs")
    tunable = tuple(b for b in usable if b.tunable)
    # Several tunable candidates: a tuple, resolved per shape key by measurement (_measured).
    return tunable if len(tunable) > 1 and usable[0].tunable else usable[0]


def select_index(op: str, *tensors, tune=None, index: int = -1, record: bool = True) -> tuple[int, Any]:
    """Like select, but returns the backend's registration index (see impl_at)."""
    name, impl = select(op, *tensors, tune=tune, index=index, record=record)
    return _INDEX[(op, name)], impl


def impl_at(op: str, index: int):
    """The implementation registered index-th for ``op`` (the backward runs the forward's backend)."""
    return _BY_INDEX[(op, index)].impl()


def record_index(op: str, index: int):
    """Count a call of the backend registered index-th for ``op`` (a choice made by select_index
    with record=False, then run)."""
    _record(op, _BY_INDEX[(op, index)])


def recorder(op: str, index: int):
    """record_index(op, index) as a callable of no arguments, its look-up done once."""
    return functools.partial(_count, op, _BY_INDEX[(op, index)].name)


def index_of(op: str, impl) -> int:
    """The registration index of the loaded implementation ``impl`` of ``op``."""
    for (name_op, index), backend in _BY_INDEX.items():
        if name_op == op and backend._impl is impl:
            return index
    raise KeyError(f"{op}: {impl!r} is not a loaded backend of this op")


@contextlib.contextmanager
def uncounted():
    """Calls made inside (a tuner's measurements) leave backend_counts() and last_backend() as
    they were."""
    counts, last = dict(_COUNTS), dict(_LAST)
    try:
        yield
    finally:
        _COUNTS.clear()
        _COUNTS.update(counts)
        _LAST.clear()
        _LAST.update(last)


def _count(op: str, name: str) -> None:
    _LAST[op] = name
    _COUNTS[(op, name)] = _COUNTS.get((op, name), 0) + 1


def _record(op: str, backend: Backend):
    _count(op, backend.name)
    return backend.name, backend.impl()


def last_backend(op: str) -> Optional[str]:
    """Name of the backend that ran ``op`` most recently in this process (None if it never ran)."""
    return _LAST.get(op)


def backend_counts() -> dict[tuple[str, str], int]:
    """How many calls each (op, backend) pair has served in this process."""
    return dict(_COUNTS)


def reset_counts():
    _LAST.clear()
    _COUNTS.clear()
