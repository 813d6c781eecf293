# Metadata lives in pyproject.toml. This file adds the optional CUDA extension of csrc/ (the BGMV
# kernels, fusedpeft._C_bgmv) where it can be built: torch with CUDA importable at build time, nvcc
# found, and FUSEDPEFT_SKIP_CUDA_BUILD unset. Anywhere else (a CPU machine, CI, pip's isolated build
# environment, which has no torch) the install stays pure Python, and the extension is built at
# first use on a CUDA machine instead (fusedpeft/_cuda_ext.py). To build it ahead of time, let the
# build see the installed torch:  pip install --no-build-isolation -e .
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _cuda_ext_module():
    """fusedpeft/_cuda_ext.py loaded by path (fusedpeft itself is not importable yet): the sources
    and compiler flags, shared with the build at first use."""
    spec = importlib.util.spec_from_file_location("_fusedpeft_cuda_ext", HERE / "fusedpeft" / "_cuda_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_args(environ=os.environ):
    """setup() keywords that build fusedpeft._C_bgmv, or {} where it cannot or must not be built
    (with the reason on stderr)."""
    cuda_ext = _cuda_ext_module()
    if cuda_ext.skip_build(environ):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {}  # pip's isolated build environment, or no torch yet: build at first use instead
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        print("fusedpeft: no CUDA build of torch or no nvcc: installing without the CUDA extension "
              "(it is built at first use on a CUDA machine)", file=sys.stderr)
        return {}
    archs = cuda_ext.target_archs(environ)
    sources = [os.path.relpath(p, HERE) for p in cuda_ext.source_paths(HERE / "csrc")]
    extension = cpp_extension.CUDAExtension(
        name=cuda_ext.PREBUILT,
        sources=sources,
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": list(cuda_ext.CXX_FLAGS), "nvcc": cuda_ext.nvcc_flags(archs)},
    )
    print(f"fusedpeft: building {cuda_ext.PREBUILT} for {archs}", file=sys.stderr)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**cuda_extension_args())
