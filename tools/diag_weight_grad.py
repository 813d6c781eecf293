"""The LoRA weight-gradient reduction (lowrank.weight_grad: lowrank_weight_grad_kernel) tile by tile
(GPU).

grad_A = g_s^T drop(x) reads x [M, K]; grad_B = grad_y^T u_s (and grad_bias) reads grad_y [M, N]:
memory-bound passes, so each time is printed beside the time to read l once at 3.0 TB/s. Every
(rows per step, columns per program) tile (settings.weight_grad_tile) and programs-per-SM target
(settings.weight_grad_programs_per_sm) is timed.

With ``--dropout P`` the reduction masks l (grad_A = g_s^T drop(x)), and ``--update`` times it
writing grad_x's masked rank-r term beside (LoRA's ``cublas`` backward), against the two passes
apart (the reduction, then lowrank_into), each drawing the mask.

    python -m tools.diag_weight_grad [MxC ...] [--ranks 16,64] [--per-sm 2,4,8] [--dropout P] [--update]
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks import harness

TILES = [(64, 64), (128, 64), (64, 128), (128, 128), (32, 64), (256, 64)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", default=["4096x4096", "8192x14336"])
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--per-sm", default="2,4,8")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--update", action="store_true", help="also write the masked rank-r term of grad_x")
    args = parser.parse_args(argv)
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.settings import settings

    lowrank = triton_kernels.lowrank
    for shape, r in itertools.product(args.shapes, [int(v) for v in args.ranks.split(",")]):
        M, C = (int(v) for v in shape.split("x"))
        l = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
        s = torch.randn(M, r, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(C, r, device="cuda", dtype=torch.bfloat16)
        colsum = torch.empty(C, device="cuda", dtype=torch.bfloat16)
        seed = torch.tensor([1234], device="cuda", dtype=torch.int64)
        p = args.dropout
        update = None
        passes = 1
        if args.update:
            update, passes = (torch.empty(M, C, device="cuda", dtype=torch.bfloat16), torch.randn(r, C, device="cuda",
                              dtype=torch.bfloat16).T), 2
            colsum = None
        floor_us = passes * l.numel() * l.element_size() / 3.0e12 * 1e6
        print(f"\n{shape} r={r} p={p}: {passes} pass(es) over l at 3.0 TB/s take {floor_us:.1f} us", flush=True)
        call = lambda: lowrank.weight_grad(l, s, out, scale=1.0, transpose_out=False, colsum=colsum,  # noqa: E731
                                           seed=seed, dropout_p=p, update=update)
        if update is not None:
            def apart():
                lowrank.weight_grad(l, s, out, scale=1.0, transpose_out=False, seed=seed, dropout_p=p)
                lowrank.lowrank_into(update[0], s, update[1], 1.0, seed, p, accumulate=False)

            apart()
            print(f"  apart (the reduction, then lowrank_into): {harness.median_ms(apart) * 1e3:6.1f} us", flush=True)
        call()
        print(f"  the default tile: {harness.median_ms(call) * 1e3:6.1f} us", flush=True)
        for tile in TILES:
            row = []
            for per_sm in (int(v) for v in args.per_sm.split(",")):
                try:
                    # Plan keys carry settings.generation: the override plans this tile afresh.
                    with settings.override(weight_grad_tile=tile, weight_grad_programs_per_sm=per_sm):
                        call()
                        row.append(f"{per_sm}/SM {harness.median_ms(call) * 1e3:6.1f} us")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row.append(f"{per_sm}/SM failed ({type(exc).__name__})")
            print(f"  tile {tile}: " + "  ".join(row), flush=True)
    triton_kernels.fast_launch.clear_plans()


if __name__ == "__main__":
    main()
