"""Every switch that changes what fusedpeft runs, in one object.

``settings`` is read from the environment once, when fusedpeft is imported; after that only
``settings.override(...)`` changes it, for the length of a ``with`` block::

    with fusedpeft.settings.override(autotune=False, lora_schedule="split"):
        ...

An override holds for every thread (autograd runs CUDA backward passes on a worker thread, which
must see what the forward saw), nests, and is undone on leaving the block even when it raises.
Names and values are checked: an unknown name is a TypeError, a bad value a ValueError.
``settings.generation`` names the values of every setting but ``backend``: the launch plans are
keyed on it, so a plan is never replayed under other settings, and the same values give the same
generation again (a ``use_backend`` block, or a block that restates the current values, keeps the
plans). README's "Settings" table lists the variables.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Optional

# field: (environment variable, kind, choices); kind "bool" reads "0" as False, anything else True.
_FIELDS = {
    "backend": ("FUSEDPEFT_BACKEND", "choice", None),
    "autotune": ("FUSEDPEFT_AUTOTUNE", "bool", None),
    "cache_dir": ("FUSEDPEFT_CACHE_DIR", "path", None),
    "output_scale_grad": ("FUSEDPEFT_OUTPUT_SCALE_GRAD", "choice", ("output", "save", "recompute")),
    "lora_schedule": ("FUSEDPEFT_LORA_SCHEDULE", "choice", ("auto", "fused", "split")),
    "fast_launch": ("FUSEDPEFT_FAST_LAUNCH", "bool", None),
    "tensor_descriptors": ("FUSEDPEFT_TENSOR_DESCRIPTORS", "bool", None),
    "lowrank_tma": ("FUSEDPEFT_LORA_LOWRANK_TMA", "bool", None),
    "rescale_tma": ("FUSEDPEFT_RESCALE_TMA", "bool", None),
    "loop_form": ("FUSEDPEFT_LOOP_FORM", "choice", ("auto", "flattened", "per_tile")),
    "separate_lowrank": ("FUSEDPEFT_SEPARATE_LOWRANK", "bool", None),
    "tile_config": ("FUSEDPEFT_TILE_CONFIG", "index", None),
    "weight_grad_tile": ("FUSEDPEFT_WEIGHT_GRAD_TILE", "tile", None),
    "weight_grad_programs_per_sm": ("FUSEDPEFT_WEIGHT_GRAD_PROGRAMS_PER_SM", "positive", None),
    "skip_cuda_build": ("FUSEDPEFT_SKIP_CUDA_BUILD", "bool_off", None),
}


@dataclasses.dataclass(frozen=True)
class Values:
    """One state of the settings. Defaults are what an unset variable means."""

    backend: str = "auto"  # "auto", or a backend name forced for every op ("torch", "triton", ...)
    autotune: bool = True  # False: measure nothing; every op and kernel takes its first candidate
    cache_dir: Optional[str] = None  # tuning file folder; None: $XDG_CACHE_HOME/fusedpeft; "": no file
    # output scaling's gradient needs the unscaled output z: recovered from the layer's own output where
    # that determines it (DoRA without dropout or bias; "save" elsewhere), saved, or recomputed
    output_scale_grad: str = "output"
    lora_schedule: str = "auto"  # the Triton LoRA path: one launch ("fused") or rank-r product first
    fast_launch: bool = True  # replay compiled kernels from launch plans instead of Triton's entry
    tensor_descriptors: bool = True  # TMA descriptors where the operands allow; False: pointer loads
    lowrank_tma: bool = True  # a precomputed LoRA term's tiles through descriptors
    rescale_tma: bool = True  # IA3 / SSF's saved-z tiles through descriptors
    loop_form: str = "auto"  # the GEMM core's loop: its own choice, or forced flat / per tile
    separate_lowrank: bool = False  # the rank-r update apart from the GEMM (the no-fit fallback)
    tile_config: Optional[int] = None  # force this index of the candidate tile configs (diagnostics)
    weight_grad_tile: Optional[tuple] = None  # (BLOCK_M, BLOCK_C) of the weight-gradient reduction
    weight_grad_programs_per_sm: int = 2  # programs per SM the weight-gradient split aims at
    skip_cuda_build: bool = False  # never build the CUDA extension of csrc/ at first use (setup.py reads it too)


_NAMES = tuple(field.name for field in dataclasses.fields(Values))


def _parse(name: str, raw: str):
    var, kind, choices = _FIELDS[name]
    text = raw.strip()
    if kind == "bool":
        return text != "0"
    if kind == "bool_off":  # off unless set: "" and "0" leave it off
        return text not in ("", "0")
    if kind == "path":
        return text
    if kind == "choice":
        return text.lower()
    if kind in ("index", "positive"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{var} must be an integer, got {raw!r}") from None
    if kind == "tile":
        try:
            return tuple(int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"{var} must be BLOCK_MxBLOCK_C, e.g. 256x64, got {raw!r}") from None
    raise AssertionError(kind)


def _check(name: str, value):
    var, kind, choices = _FIELDS[name]
    if kind in ("bool", "bool_off") and not isinstance(value, bool):
        raise ValueError(f"settings.{name} is True or False, got {value!r}")
    if kind == "choice":
        if name == "backend":
            if not isinstance(value, str) or not value:
                raise ValueError(f"settings.backend is a backend name or 'auto', got {value!r}")
        elif value not in choices:
            raise ValueError(f"settings.{name} ({var}) must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if kind == "path" and value is not None and not isinstance(value, str):
        raise ValueError(f"settings.{name} is a folder path, '' or None, got {value!r}")
    if kind == "index" and value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"settings.{name} is a candidate index >= 0 or None, got {value!r}")
    if kind == "positive" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"settings.{name} is an integer >= 1, got {value!r}")
    if kind == "tile" and value is not None and not (
            isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 and v & (v - 1) == 0
                                                                 for v in value)):
        raise ValueError(f"settings.{name} is (BLOCK_M, BLOCK_C), two powers of two, or None, got {value!r}")
    return value


def from_environment(environ=None) -> Values:
    environ = os.environ if environ is None else environ
    values = {}
    for name, (var, _, _) in _FIELDS.items():
        if var in environ:
            values[name] = _check(name, _parse(name, environ[var]))
    return Values(**values)


class Settings:
    """The live settings: each field of Values is a plain attribute (torch.compile reads them as
    constants while tracing); see the module docstring."""

    def __init__(self, values: Values):
        object.__setattr__(self, "_lock", threading.Lock())
        # An override is entered on every call of a use_backend block, so its cost is host time on
        # every step: each distinct Values is kept once (interned), with its generation, and each
        # (values, changes) pair is resolved once; after that an override is a dict look-up and
        # the attribute copies.
        object.__setattr__(self, "_interned", {})  # Values -> the one instance kept
        object.__setattr__(self, "_generation_of", {})  # id(interned Values) -> generation
        object.__setattr__(self, "_plan_generations", {})  # Values with backend "auto" -> generation
        object.__setattr__(self, "_transitions", {})  # (id(interned before), changes key) -> interned after
        self._replace(self._intern(values))

    def __setattr__(self, name, value):
        raise AttributeError("fusedpeft.settings is changed with settings.override(...), in a with block")

    def values(self) -> Values:
        return self._values

    def _intern(self, values: Values) -> Values:
        kept = self._interned.setdefault(values, values)
        if kept is values and id(values) not in self._generation_of:
            plan_values = dataclasses.replace(values, backend="auto")  # the backend changes no launch
            generation = self._plan_generations.setdefault(plan_values, len(self._plan_generations))
            self._generation_of[id(values)] = generation
        return kept

    def _replace(self, values: Values):
        object.__setattr__(self, "_values", values)
        for name in _NAMES:
            object.__setattr__(self, name, getattr(values, name))
        object.__setattr__(self, "generation", self._generation_of[id(values)])

    def _after(self, before: Values, changes: dict) -> Values:
        # The key carries each value's type, so that 1 is not taken for an already-checked True.
        try:
            key = (id(before), tuple((name, type(value), value) for name, value in changes.items()))
            after = self._transitions.get(key)
        except TypeError:  # an unhashable value: checked below, and refused there
            key, after = None, None
        if after is None:
            for name, value in changes.items():
                if name not in _FIELDS:
                    raise TypeError(f"settings.override() got an unknown setting {name!r}; the settings are "
                                    f"{', '.join(_FIELDS)}")
                _check(name, value)
            after = self._intern(dataclasses.replace(before, **changes))
            if key is not None:
                self._transitions[key] = after
        return after

    @contextlib.contextmanager
    def override(self, **changes):
        """Set the named settings inside the block; the previous values come back after it."""
        with self._lock:
            before = self._values
            self._replace(self._after(before, changes))
        try:
            yield self
        finally:
            with self._lock:
                self._replace(before)

    def __repr__(self):
        return f"fusedpeft.settings({self._values})"


def environment_variables() -> dict:
    """setting name -> its environment variable (the README table lists them)."""
    return {name: var for name, (var, _, _) in _FIELDS.items()}


settings = Settings(from_environment())
