"""What the LoRA epilogue costs the GEMM core, config by config (GPU): the core alone
(y = x W^T) against the core with the rank-r epilogue (y += s u B^T, u precomputed), for every
large-M candidate of the tuner, whole-tile and half-tile epilogue, and with the LoRA term placed
before the K loop instead ("first", launch.LOWRANK_FIRST), with cuBLAS beside.

    python -m benchmarks.diag_epilogue [MxKxN ...] [--ranks 16,64]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from . import harness


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shapes", nargs="*", default=["4096x4096x4096"])
    parser.add_argument("--ranks", default="16,64")
    args = parser.parse_args(argv)
    os.environ["FUSEDPEFT_AUTOTUNE"] = "0"  # one forced candidate at a time, timed here
    from fusedpeft._kernels import triton_kernels

    launch = triton_kernels.launch
    all_candidates = launch._candidates
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        print(f"\n{shape}: cuBLAS {harness.median_ms(lambda: F.linear(x, W)):.4f} ms")
        # The 128-row tiles with 8 warps: the ones the tuner picks at these sizes.
        for cfg in [c for c in all_candidates(M, N, 2) if c.kwargs["BLOCK_M"] == 128 and c.num_warps == 8]:
            launch._candidates = lambda *a, cfg=cfg: [cfg]
            row = []
            variants = [(0, False)] + [(int(v), first) for v in args.ranks.split(",") for first in (False, True)]
            for r, first in variants:
                launch.LOWRANK_FIRST = first  # the LoRA term before the K loop instead of in the epilogue
                launch.TUNED.clear()
                launch._PLANS.clear()
                B = torch.randn(N, max(r, 1), device="cuda").bfloat16()
                u = torch.randn(M, max(r, 1), device="cuda")
                kw = dict(q=B, lr=u, lr_precomputed=True, lr_scale=0.5) if r else {}
                try:
                    launch.launch_fused_linear(x, W, y, **kw)
                    ms = harness.median_ms(lambda: launch.launch_fused_linear(x, W, y, **kw))
                    # A key that no config fits runs the rank-r update apart (launch._lowrank_apart).
                    apart = " (no fit: apart)" if any(isinstance(v, str) for v in launch.TUNED.values()) else ""
                    row.append(f"r={r}{' first' if first else ''}: {ms:.4f}{apart}")
                except RuntimeError as exc:
                    row.append(f"r={r}{' first' if first else ''}: failed ({str(exc).splitlines()[-1][:60]})")
            print(f"   {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: " + "  ".join(row))
    launch._candidates = all_candidates
    launch.LOWRANK_FIRST = False


if __name__ == "__main__":
    main()
