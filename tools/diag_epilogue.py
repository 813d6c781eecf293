"""What the LoRA term costs the GEMM core (GPU).

Times the core alone (y = x W^T: rescale_kernel with a scale of ones) against the core with
a precomputed rank-r term in its epilogue (lora._launch_lora with lr precomputed: y += lr q^T, lr
pre-scaled in bf16), for each 128 x 256 tuner candidate (settings.tile_config), with the lr / q
tiles by pointer and by tensor descriptor (settings.lowrank_tma), in both orientations the LoRA
layer launches: the forward (lora_forward_kernel, q = B stored [N, r]) and grad_x
(lora_grad_x_kernel, q = A^T with A stored [r, K]; w = W^T, so the grad_x rows need K = N).
cuBLAS beside. A config that cannot hold the rank-r epilogue is timed as the layer's fallback runs
it (settings.separate_lowrank: cuBLAS GEMM, then the rank-r update) and marked "(apart)".

    python -m tools.diag_epilogue [MxKxN ...] [--ranks 16,64] [--orient fwd,grad_x]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks import harness


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", default=["4096x4096x4096"])
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--orient", default="fwd,grad_x")
    args = parser.parse_args(argv)
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.settings import settings

    configs, fast_launch, lora, rescale = (triton_kernels.configs, triton_kernels.fast_launch, triton_kernels.lora,
                                           triton_kernels.rescale)
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        ones = torch.ones(N, device="cuda", dtype=torch.bfloat16)
        print(f"\n{shape}: cuBLAS {harness.median_ms(lambda: F.linear(x, W)):.4f} ms", flush=True)
        for index, cfg in enumerate(configs.candidates(M, N, 2)):
            if cfg.kwargs["BLOCK_N"] != 256 or cfg.kwargs["WARP_SPECIALIZE"]:
                continue
            # Plan keys carry settings.generation: each override below plans afresh; the old plans
            # are dropped so that the cache does not grow with every config.
            fast_launch.clear_plans()
            with settings.override(tile_config=index):
                core = [harness.median_ms(lambda: rescale._rescaled(x, w_mat, y, None, ones, input_scale=False))
                        for w_mat in (W, W.T)]
            print(f"  {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: core {core[0]:.4f}, as grad_x {core[1]:.4f}",
                  flush=True)
            for orient, r in itertools.product(args.orient.split(","), [int(v) for v in args.ranks.split(",")]):
                if orient == "fwd":  # y = x W^T + lr B^T; p = A (read only by the in-loop product)
                    gemm, w_mat = lora._FORWARD, W
                    p = torch.randn(r, K, device="cuda").bfloat16()  # A
                    q = torch.randn(N, r, device="cuda").bfloat16()  # B
                else:  # grad_x: a = grad_y [M, N] (N = K here), w = W^T, p = B^T, q = A^T with A stored [r, K]
                    gemm, w_mat = lora._GRAD_X, W.T
                    p = torch.randn(N, r, device="cuda").bfloat16().T
                    q = torch.randn(r, N, device="cuda").bfloat16().T
                lr = torch.randn(M, r, device="cuda").bfloat16()
                call = lambda: lora._launch_lora(gemm, x, w_mat, y, p, q, lr, 1.0, None, 0.0,  # noqa: E731
                                                 bias=None, in_loop=False, dropout_arg=orient != "fwd")

                def timed(**overrides):
                    with settings.override(tile_config=index, **overrides):
                        call()
                        return harness.median_ms(call)

                row = []
                for tma in (False, True):
                    name = "tma" if tma else "pointers"
                    try:
                        row.append(f"{name} {timed(lowrank_tma=tma):.4f}")
                    except configs.ForcedConfigDoesNotFit:  # it cannot hold the epilogue: the layer's fallback
                        try:
                            row.append(f"{name} {timed(lowrank_tma=tma, separate_lowrank=True):.4f}(apart)")
                        except Exception as exc:  # noqa: BLE001 - report and go on
                            row.append(f"{name} failed ({type(exc).__name__})")
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        row.append(f"{name} failed ({type(exc).__name__})")
                print(f"    {orient} r={r}: " + "  ".join(row), flush=True)
    fast_launch.clear_plans()


if __name__ == "__main__":
    main()
