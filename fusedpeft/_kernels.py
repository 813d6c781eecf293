"""Access to the Triton kernels. They live in the top-level ``triton_kernels/`` folder, which an
install maps to ``fusedpeft.triton_kernels`` (package-dir in pyproject.toml) so that it never
clashes with the unrelated ``triton_kernels`` distribution on PyPI. From a source checkout that was
not installed, the folder beside the package is loaded under that same name."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

_NAME = "fusedpeft.triton_kernels"


def _load():
    try:
        return _connect(importlib.import_module(_NAME))
    except ModuleNotFoundError as exc:
        if exc.name != _NAME:
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
    spec = importlib.util.spec_from_file_location(
        _NAME, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    if spec is None:
        raise ModuleNotFoundError(f"fusedpeft's Triton kernels were not found (looked for {_NAME} and {folder})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return _connect(module)


def _connect(module):
    # The launchers keep their tuned tile configs in fusedpeft's tuning file.
    from . import tuning

    module.launch.CONFIG_STORE = tuning
    return module


def __getattr__(name):
    if name == "triton_kernels":
        return _load()
    raise AttributeError(name)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(x, weight, forced=False):
    """None when the Triton backend can run on these tensors, else why not. On CPU tensors it runs
    only when asked for by name under Triton's interpreter (TRITON_INTERPRET=1): that is how CI
    tests the kernels, and far too slow to pick automatically."""
    if not triton_installed():
        return "triton is not installed"
    import torch

    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 and float32, not {x.dtype}"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and interpreter_on() and forced:
        return None
    return f"tensors are on {x.device.type}; the Triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU)"
