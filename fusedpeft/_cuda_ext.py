"""The CUDA extension built from ``csrc/`` (the BGMV kernels the ``cuda`` backend runs): found
prebuilt, or built at first use.

``load()`` returns the extension module, trying in turn:

1. ``fusedpeft._C_bgmv``, which ``setup.py`` builds ahead of time where torch with CUDA and nvcc
   are present at install (``pip install --no-build-isolation -e .``, so that the build sees torch);
2. on a machine with a CUDA GPU, a build now from ``csrc/`` with ``torch.utils.cpp_extension.load``
   (ninja, the machine's nvcc, code for the visible GPUs' architectures or ``TORCH_CUDA_ARCH_LIST``)
   into ``<cache>/torch_extensions/<python, torch, CUDA, architectures, hash of csrc>``, where
   ``<cache>`` is ``FUSEDPEFT_CACHE_DIR`` (default ``~/.cache/fusedpeft``; the empty string: torch's
   own extension folder). Later processes load the build from there in well under a second; a
   change to csrc/, torch or the GPU builds anew. The first build takes about a minute.

``FUSEDPEFT_SKIP_CUDA_BUILD=1`` forbids step 2 (and makes setup.py skip step 1's build). Whatever
fails raises a RuntimeError saying why; the backend registry reports it as the reason the ``cuda``
backend cannot run. Importing fusedpeft never needs the extension, nor CUDA, nor a compiler.

At import this module uses the standard library only: setup.py loads it by path (fusedpeft is not
installed yet then) for the sources and the compiler flags, so that both builds use the same.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Optional

PREBUILT = "fusedpeft._C_bgmv"  # the module setup.py builds
JIT_NAME = "fusedpeft_bgmv"  # the module name of a build at first use
API_VERSION = 2  # the binding's api_version (csrc/bgmv_binding.cpp); another one is a stale build
SKIP_ENV = "FUSEDPEFT_SKIP_CUDA_BUILD"
SOURCES = ("bgmv.cu", "bgmv_binding.cpp")  # in csrc/
HEADERS = ("bgmv.h",)
DEFAULT_ARCHS = ("9.0",)  # where no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Hopper
NVCC_FLAGS = ("-O3", "-lineinfo")
CXX_FLAGS = ("-O3",)

_log = logging.getLogger("fusedpeft")
_lock = threading.Lock()
_loaded = None
_failed: Optional[str] = None


def skip_build(environ=None) -> bool:
    """FUSEDPEFT_SKIP_CUDA_BUILD set to anything but "" or "0"."""
    return (os.environ if environ is None else environ).get(SKIP_ENV, "0").strip() not in ("", "0")


def csrc_dir() -> Path:
    """csrc/: beside the package in a source checkout and an editable install; installed as the
    package data fusedpeft/_csrc otherwise (pyproject.toml maps it)."""
    here = Path(__file__).resolve().parent
    beside = here.parent / "csrc"
    return beside if beside.is_dir() else here / "_csrc"


def source_paths(root: Optional[Path] = None) -> list[str]:
    root = csrc_dir() if root is None else root
    return [str(root / name) for name in SOURCES]


def parse_arch_list(text: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST's format: "8.0;9.0+PTX" or "8.0 9.0a"."""
    return [a for a in re.split(r"[;\s,]+", text.strip()) if a]


def gencode_flags(archs) -> list[str]:
    """nvcc's -gencode flags for archs such as "9.0", "9.0a" (Hopper's arch-specific features) or
    "9.0+PTX" (with PTX for later GPUs)."""
    flags = []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        base = arch[: -len("+PTX")] if ptx else arch
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", base)
        if not match:
            raise ValueError(f"unrecognised CUDA architecture {arch!r} (expected e.g. 9.0, 9.0a or 9.0+PTX)")
        num = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_flags(archs) -> list[str]:
    """What nvcc gets besides torch's own defaults (the build adds -std and torch's -D flags)."""
    return [*NVCC_FLAGS, *gencode_flags(archs)]


def target_archs(environ=None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPUs' compute capabilities, else 9.0."""
    environ = os.environ if environ is None else environ
    listed = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed and listed != "native":
        return parse_arch_list(listed)
    try:
        import torch

        if torch.cuda.is_available():
            found = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            if found:
                return found
    except Exception:  # no torch, or no usable driver: the default below
        pass
    return list(DEFAULT_ARCHS)


def sources_hash(root: Optional[Path] = None) -> str:
    root = csrc_dir() if root is None else root
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:12]


def _build_directory(archs) -> Optional[str]:
    """Where a build at first use goes; None: torch's default (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions)."""
    import torch

    try:
        from .settings import settings

        folder = settings.cache_dir
    except ImportError:  # loaded by path, outside the package
        folder = os.environ.get("FUSEDPEFT_CACHE_DIR")
    if folder == "":
        return None
    if folder is None:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fusedpeft")
    tag = "py{}{}_torch{}_cu{}_sm{}_{}".format(
        sys.version_info[0], sys.version_info[1], torch.__version__, torch.version.cuda,
        "-".join(a.replace(".", "").replace("+", "") for a in archs), sources_hash())
    path = os.path.join(folder, "torch_extensions", re.sub(r"[^A-Za-z0-9_.-]", "_", tag))
    os.makedirs(path, exist_ok=True)
    return path


def _check_api(module, where: str):
    version = getattr(module, "api_version", None)
    if version != API_VERSION:
        raise RuntimeError(f"{where} has api_version {version}, this fusedpeft expects {API_VERSION}: a stale build "
                           "(rebuild it: pip install --no-build-isolation -e . , or delete it)")
    return module


def _import_prebuilt():
    """The module setup.py built, or None when there is none; raises when it exists but cannot load."""
    try:
        module = importlib.import_module(PREBUILT)
    except ModuleNotFoundError as exc:
        if exc.name == PREBUILT:
            return None
        raise
    return _check_api(module, f"the prebuilt {PREBUILT} ({getattr(module, '__file__', '?')})")


def _build():
    import torch

    if not torch.cuda.is_available():
        where = ("torch {} was built without CUDA".format(torch.__version__) if torch.version.cuda is None
                 else "torch.cuda.is_available() is False (no GPU visible, or no driver)")
        raise RuntimeError(f"the cuda backend needs a CUDA GPU: {where}")
    from .settings import settings

    if settings.skip_cuda_build:
        from .backends import LoadRefused

        raise LoadRefused(f"{SKIP_ENV} is set, and {PREBUILT} was not built at install: nothing to load")
    from torch.utils import cpp_extension

    root = csrc_dir()
    missing = [p for p in source_paths(root) if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"the CUDA sources are not installed ({', '.join(missing)} missing): build at first use "
                           "needs a source checkout or an editable install")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc was not found: set CUDA_HOME to the CUDA toolkit (or put nvcc on PATH)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("building the CUDA extension needs ninja: pip install ninja (or fusedpeft[cuda])")
    archs = target_archs()
    build_dir = _build_directory(archs)
    _log.info("fusedpeft: building the CUDA extension from %s for %s into %s (once)", root, archs, build_dir)
    try:
        module = cpp_extension.load(
            name=JIT_NAME,
            sources=source_paths(root),
            extra_include_paths=[str(root)],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=nvcc_flags(archs),
            build_directory=build_dir,
            verbose=False,
        )
    except Exception as exc:
        text = str(exc)
        raise RuntimeError(f"building the CUDA extension from {root} failed: {text[-3000:]}") from exc
    return _check_api(module, f"the extension built in {build_dir}")


def load():
    """The extension module (prebuilt, else built now); RuntimeError saying why when neither.
    The outcome is kept for the process: a failure is not retried, but for the refusal that the
    skip_cuda_build setting decides (backends.LoadRefused), asked again at each call."""
    global _loaded, _failed
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failed is not None:
            raise RuntimeError(_failed)
        notes = []
        try:
            module = _import_prebuilt()
        except Exception as exc:  # built but unusable (another torch's ABI, a stale build): build anew
            module = None
            notes.append(f"the prebuilt {PREBUILT} could not be used ({type(exc).__name__}: {exc})")
        if module is None:
            try:
                module = _build()
            except Exception as exc:
                from .backends import LoadRefused  # here: setup.py loads this file by path

                reason = "; ".join([*notes, str(exc)])
                if isinstance(exc, LoadRefused):
                    raise LoadRefused(reason) from exc
                _failed = reason
                raise RuntimeError(_failed) from exc
        _loaded = module
        return module


def reset():
    """Forget the outcome of load() (tests)."""
    global _loaded, _failed
    with _lock:
        _loaded, _failed = None, None
