"""The backends that run on Triton: ``triton`` (the fused kernels of ``fusedpeft.triton_kernels``)
for lora_linear, dora_linear, ia3_linear and ssf_linear; for lora_linear, ``cublas`` and ``cublas_after``
(cuBLAS GEMMs with the dropout masks from small Triton kernels, the rank-r term written before the
GEMM or added after it) and ``cublas_autograd`` (without dropout, cublas_after's calls as torch ops
that autograd differentiates); for dora_linear, ``cublas`` (its torch composition with those masks)
and its ``cublas_autograd``.

Nothing here imports triton: each ``load`` reaches the kernels through ``fusedpeft._kernels`` on
first use, and ``supports`` asks only whether triton is installed."""
from __future__ import annotations

import functools
import importlib.util
import os

from .. import ops  # noqa: F401  (each op registers its torch reference first: registration index 0)
from . import register


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


def _kernel(*path):
    """A loader for the object at ``path`` inside fusedpeft.triton_kernels."""
    def load():
        from .._kernels import triton_kernels

        found = triton_kernels
        for name in path:
            found = getattr(found, name)
        return found

    return load


# Priorities, tunable flags and order as the op's shape key expects them: the fused kernels first,
# then cuBLAS with the rank-r term first, then after. The cuBLAS compositions draw their masks with
# Triton, so they need what the triton backend needs.
register("lora_linear", "triton", load=_kernel("lora"), supports=triton_usable, priority=10, tunable=True)
register("lora_linear", "cublas", load=_kernel("lora_cublas", "low_rank_first"), supports=triton_usable,
         priority=5, tunable=True)
register("lora_linear", "cublas_after", load=_kernel("lora_cublas", "low_rank_after"), supports=triton_usable,
         priority=4, tunable=True)
# cublas_after's calls as differentiable torch ops (no dropout), run without the autograd Function.
register("lora_linear", "cublas_autograd", load=_kernel("lora_cublas", "autograd_after"), supports=triton_usable,
         priority=3, tunable=True)
register("dora_linear", "triton", load=_kernel("dora"), supports=triton_usable, priority=10, tunable=True)


def _dora_cublas():
    """DoRA's torch composition with the LoRA kernels' philox masks (drawn on the GPU)."""
    from .._kernels import triton_kernels
    from ..ops import dora

    dropout_mask = triton_kernels.lora.dropout_mask

    def keep_mask(seed, shape, p, device):
        return None if p == 0.0 else dropout_mask(seed, shape, p, device) != 0

    return dora.composition(keep_mask, dropout_mask)


register("dora_linear", "cublas", load=_dora_cublas, supports=triton_usable, priority=5, tunable=True)


def _dora_composed():
    """Without dropout, the same calls as differentiable torch ops, run without the autograd Function."""
    from ..ops import dora

    return dora.composed(_dora_cublas())


register("dora_linear", "cublas_autograd", load=_dora_composed, supports=triton_usable, priority=3, tunable=True)
# Per-row adapters (serving): the fused SGMV GEMM and, for decode-sized batches, base + BGMV.
register("multi_lora_linear", "triton", load=_kernel("multi_lora", "triton_backend"), supports=triton_usable, priority=10,
         tunable=True)
register("multi_lora_linear", "bgmv", load=_kernel("multi_lora", "bgmv_backend"), supports=triton_usable, priority=9, tunable=True)
register("multi_lora_linear", "bgmv_one", load=_kernel("multi_lora", "bgmv_one_backend"), supports=triton_usable,
         priority=8, tunable=True)
# Triton shrink and expand around cuBLAS's base GEMM (a prefill's groups of rows): measured against
# the fused SGMV kernel, whose main loop is slower than cuBLAS's, and against cublas_batched.
register("multi_lora_linear", "sgmv_cublas", load=_kernel("multi_lora", "sgmv_cublas_backend"), supports=triton_usable,
         priority=6, tunable=True)
# cuBLAS's GEMM over the weight with the bank's A stacked under it, then one expand (a decode's rows;
# a bank not so allocated runs bgmv's schedule).
register("multi_lora_linear", "stacked", load=_kernel("multi_lora", "stacked_backend"), supports=triton_usable,
         priority=7, tunable=True)
register("multi_ia3_linear", "triton", load=_kernel("multi_lora", "triton_backend"), supports=triton_usable, priority=10,
         tunable=True)
for _op in ("ia3_linear", "ssf_linear"):  # one implementation serves both rescaling methods
    register(_op, "triton", load=_kernel("rescale"), supports=triton_usable, priority=10, tunable=True)
