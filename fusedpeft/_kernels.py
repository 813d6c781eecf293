"""Access to the Triton kernels. They live in the top-level ``triton_kernels/`` folder, which an
install maps to ``fusedpeft.triton_kernels`` (package-dir in pyproject.toml) so that it never
clashes with the unrelated ``triton_kernels`` distribution on PyPI. From a source checkout that was
not installed, the folder beside the package is loaded under that same name. The backends that
run these kernels register in ``fusedpeft/backends/triton.py``."""
from __future__ import annotations

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

    module.configs.CONFIG_STORE = tuning
    return module


def __getattr__(name):
    if name == "triton_kernels":
        return _load()
    raise AttributeError(name)

