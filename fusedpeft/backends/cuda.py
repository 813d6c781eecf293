"""The ``cuda`` and ``cuda_overlap`` backends: the BGMV kernels of ``csrc/bgmv.cu`` (CUDA C++,
bound with pybind11) for ``multi_lora_linear``, the decode-time op of many adapters in one batch.

Both make one call into the extension, ``lora_linear``, which launches the base GEMM through
torch (cuBLAS) and the two BGMV kernels that add each row's rank-r term into its output: the
shrink u[m, :r_i] = x[m] A[i, :r_i]^T and the expand y[m] += s_i u[m, :r_i] B[i, :, :r_i]^T (see
csrc/bgmv.cu for the design and its cost). ``cuda`` runs the three in order on the current stream;
``cuda_overlap`` runs the shrink on a side stream while the GEMM runs (both are memory-bound
passes at decode: the GEMM streams W, the shrink the adapters' A), joining before the expand. Which
wins depends on how much of the GPU the GEMM leaves idle, so both are measured candidates.

The extension is found or built on first use (``fusedpeft._cuda_ext``): nothing here imports it,
torch's extension machinery or a compiler when fusedpeft is imported, and where it cannot load,
the registry reports why to whoever names the backend. On CUDA tensors both are tunable
candidates: the op's shape key picks one or another (the torch reference's gathered GEMMs, a
Triton kernel, cuBLAS batched GEMMs) by measurement.
"""
from __future__ import annotations

import types

from .. import ops  # noqa: F401  (each op registers its torch reference first: registration index 0)
from . import register

OP = "multi_lora_linear"


def cuda_usable(x, weight=None, forced=False):
    """None when the BGMV kernels can run these inputs (CUDA tensors of a dtype they take), else why
    not. Whether the extension loads is the registry's question (load's error)."""
    import torch

    if x.device.type != "cuda":
        return (f"tensors are on {x.device.type}; the cuda backend (the BGMV kernels of csrc/bgmv.cu) needs CUDA "
                "tensors")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the BGMV kernels take float16, bfloat16 and float32, not {x.dtype}"
    return None


def _lora(ext, overlap, x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """multi_lora_linear on 2-D x (the op has checked shapes, dtypes and devices)."""
    import torch

    if x.stride(-1) != 1:
        x = x.contiguous()
    # The bank's small vectors as the kernels read them. The serving bank keeps them so already, and
    # at decode each conversion call costs host time beside kernels of a few microseconds: only
    # what differs is converted (the op has put every tensor on x's device).
    if scalings.dtype != torch.float32:
        scalings = scalings.float()
    if ranks.dtype != torch.int32:
        ranks = ranks.int()
    return ext.lora_linear(x, weight, bias, *[t if t.is_contiguous() else t.contiguous()
                                              for t in (lora_A, lora_B, scalings, ranks, adapter_index)], overlap)


def _loader(overlap: bool):
    def load():
        from .. import _cuda_ext

        ext = _cuda_ext.load()
        return types.SimpleNamespace(lora=lambda *args: _lora(ext, overlap, *args), extension=ext)

    return load


# Below the Triton kernels' priority 10 (the first candidate where nothing is measured, as with
# FUSEDPEFT_AUTOTUNE=0), above the torch reference's 0; tunable, so measured against both per shape.
register(OP, "cuda", load=_loader(overlap=False), supports=cuda_usable, priority=8, tunable=True)
register(OP, "cuda_overlap", load=_loader(overlap=True), supports=cuda_usable, priority=7, tunable=True)
