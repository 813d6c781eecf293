"""Host-side profile of the IA3 / SSF calls (GPU): per-call host time, compiled-kernel cache
growth, and the top of cProfile, for each variant of benchmarks.rescale at one shape.

    python -m benchmarks.diag_rescale 16 4096 4096
"""
from __future__ import annotations

import sys

import torch

from . import harness, rescale


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    M, K, N = (int(v) for v in argv[:3]) if argv else (16, 4096, 4096)
    from fusedpeft._kernels import triton_kernels

    cache = triton_kernels.launch._COMPILED
    for method in rescale.METHODS:
        for case in rescale.cases(M, K, N, method, with_peft=False):
            if "fusedpeft" not in case.variant:
                continue
            fwd, step = case.make()
            for fn, what in ((fwd, "fwd"), (step, "train")):
                fn()
                n0 = len(cache)
                harness.host_profile(f"{case.group:28s} {case.variant:20s} {what:5s}", fn)
                print(f"      compiled-kernel cache grew by {len(cache) - n0}")


def scale_a_alternatives(M=4096, K=4096, N=4096):
    """Input scaling three ways: in the K loop (SCALE_A), or a pre-pass over x or over W."""
    from fusedpeft._kernels import triton_kernels

    launch = triton_kernels.launch.launch_fused_linear
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
    l = (1 + 0.1 * torch.randn(K, device="cuda")).bfloat16()
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    variants = {
        "plain core": lambda: launch(x, W, y),
        "SCALE_A in loop": lambda: launch(x, W, y, scale=l, scale_a=True),
        "x*l pre-pass + core": lambda: launch(x * l, W, y),
        "W*l pre-pass + core": lambda: launch(x, W * l, y),
        "cuBLAS": lambda: torch.mm(x, W.T, out=y),
    }
    for name, fn in variants.items():
        fn()
        print(f"{M}x{K}x{N} {name:22s} {harness.median_ms(fn):.4f} ms")


if __name__ == "__main__":
    scale_a_alternatives()
    main()
