"""What the LoRA term costs the GEMM core (GPU).

Times the core alone (y = x W^T) against the core with a precomputed rank-r term in its epilogue
(y += lr q^T, lr pre-scaled in bf16), for each 128 x 256 tuner candidate, with the lr / q tiles by
pointer and by tensor descriptor (launch.LOWRANK_TMA), in both orientations the LoRA layer
launches: the forward (q = B, stored [N, r]) and grad_x (q = A^T, A stored [r, K]; w = W^T).
cuBLAS beside. A key no config can hold runs the update apart and is marked "(apart)".

    python -m tools.diag_epilogue [MxKxN ...] [--ranks 16,64] [--orient fwd,grad_x]
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F

from benchmarks import harness


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shapes", nargs="*", default=["4096x4096x4096"])
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--orient", default="fwd,grad_x")
    args = parser.parse_args(argv)
    os.environ["FUSEDPEFT_AUTOTUNE"] = "0"  # one forced candidate at a time, timed here
    from fusedpeft._kernels import triton_kernels

    launch = triton_kernels.launch
    all_candidates = launch._candidates
    saved = launch.LOWRANK_TMA
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        print(f"\n{shape}: cuBLAS {harness.median_ms(lambda: F.linear(x, W)):.4f} ms", flush=True)
        for cfg in [c for c in all_candidates(M, N, 2) if c.kwargs["BLOCK_N"] == 256 and not c.kwargs["WARP_SPECIALIZE"]]:
            launch._candidates = lambda *a, cfg=cfg: [cfg]
            launch.TUNED.clear()
            launch._PLANS.clear()
            core = [harness.median_ms(lambda: launch.launch_fused_linear(x, w_mat, y)) for w_mat in (W, W.T)]
            print(f"  {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: core {core[0]:.4f}, as grad_x {core[1]:.4f}",
                  flush=True)
            for orient, r in itertools.product(args.orient.split(","), [int(v) for v in args.ranks.split(",")]):
                if orient == "fwd":
                    q = torch.randn(N, r, device="cuda").bfloat16()  # B
                    a, w_mat = x, W
                else:  # grad_x: a = grad_y [M, N] (N = K here), w = W^T, q = A^T with A stored [r, K]
                    q = torch.randn(r, N, device="cuda").bfloat16().T
                    a, w_mat = x, W.T
                lr = torch.randn(M, r, device="cuda").bfloat16()
                row = []
                for tma in (False, True):
                    launch.LOWRANK_TMA = tma
                    launch.TUNED.clear()
                    launch._PLANS.clear()
                    kw = dict(q=q, lr=lr, lr_precomputed=True)
                    name = "tma" if tma else "pointers"
                    try:
                        launch.launch_fused_linear(a, w_mat, y, **kw)
                        ms = harness.median_ms(lambda: launch.launch_fused_linear(a, w_mat, y, **kw))
                        # A key that no config fits runs the rank-r update apart (launch._lowrank_apart).
                        apart = "(apart)" if any(isinstance(v, str) for v in launch.TUNED.values()) else ""
                        row.append(f"{name} {ms:.4f}{apart}")
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        row.append(f"{name} failed ({type(exc).__name__})")
                print(f"    {orient} r={r}: " + "  ".join(row), flush=True)
    launch._candidates = all_candidates
    launch.LOWRANK_TMA = saved


if __name__ == "__main__":
    main()
