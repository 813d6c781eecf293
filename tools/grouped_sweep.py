"""The sgmv_cublas schedule of multi_lora_linear piece by piece, GPU time (each call captured in a
CUDA graph, replays timed by CUDA events): the base GEMM alone and accumulating onto y (beta = 1),
grouped_shrink_kernel over block and split choices, grouped_expand_kernel over column blocks and
warps, and the whole call beside cublas_batched, with each piece's HBM bytes and the time they take
at --gbps. For choosing the launchers' defaults by measurement.

    python -m tools.grouped_sweep [--groups 32] [--rows-per-group 128] [--hidden 4096] [--slots 32] [--rank 16]
"""
from __future__ import annotations

import argparse
import itertools

import torch

import fusedpeft
from benchmarks import harness
from fusedpeft.ops import multi_lora_linear
from fusedpeft.ops.multi_lora import stack_bank, stacked_weight


def _us(fn, warmup_ms, rep_ms):
    return 1e3 * harness.median_ms(harness.graphed(fn), warmup_ms, rep_ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=32, help="sequences (one slot each)")
    parser.add_argument("--rows-per-group", type=int, default=128, help="tokens per sequence (1: decode)")
    parser.add_argument("--hidden", type=int, default=4096, help="in_features = out_features")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gbps", type=float, default=3000.0, help="HBM bandwidth for the bytes column")
    parser.add_argument("--warmup-ms", type=float, default=5)
    parser.add_argument("--rep-ms", type=float, default=20)
    args = parser.parse_args(argv)
    from triton_kernels import multi_lora as kernels

    dev, dt = "cuda", torch.bfloat16
    G, L, K, S, R = args.groups, args.rows_per_group, args.hidden, args.slots, args.rank
    N, M = K, G * L
    x = torch.randn(M, K, device=dev, dtype=dt)
    # W and the A slots in one buffer, A's rows after W's, as the serving layers hold them (the
    # ``stacked`` backend's GEMM over both; the other backends read them as two tensors)
    W, A = stack_bank((torch.randn(N, K, device=dev) / K**0.5).to(dt), (torch.randn(S, R, K, device=dev) / K**0.5).to(dt))
    held = stacked_weight(W, A)
    B = (torch.randn(S, N, R, device=dev) / R**0.5).to(dt)
    scalings = torch.rand(S, device=dev) + 0.5
    ranks = torch.full((S,), R, dtype=torch.int32, device=dev)
    group = torch.arange(G, device=dev) % S
    y = torch.randn(M, N, device=dev, dtype=dt)
    t = lambda fn: _us(fn, args.warmup_ms, args.rep_ms)  # noqa: E731
    ideal = lambda nbytes: f"{nbytes / 2**20:7.1f} MiB {nbytes / args.gbps / 1e3:7.1f} us at {args.gbps:.0f} GB/s"  # noqa: E731
    print(f"{torch.cuda.get_device_name()}: {G} groups x {L} rows, {K} -> {N}, {S} slots, r = {R}, bf16")
    with torch.no_grad():
        print(f"base F.linear                         {t(lambda: torch.nn.functional.linear(x, W)):8.1f} us")
        print(f"base accumulating (y.addmm_, beta 1)  {t(lambda: y.addmm_(x, W.T)):8.1f} us")
        distinct = min(G, S)
        print(f"\nshrink: reads x and each row tile's A chunk   ({ideal(2 * M * K + 2 * distinct * R * K)})")
        for block_k, splits, stages in itertools.product((64, 128, 256), (None, 1, 2, 4, 8, 16, 32), (3, 4)):
            try:
                us = t(lambda: kernels.grouped_shrink(x, A, ranks, group, L, BLOCK_K=block_k, splits=splits,
                                                      num_stages=stages))
                print(f"  BLOCK_K {block_k:3d} splits {str(splits):4s} stages {stages}  {us:8.1f} us")
            except Exception as exc:  # a config that does not fit (shared memory) is reported
                print(f"  BLOCK_K {block_k:3d} splits {str(splits):4s} stages {stages}  {type(exc).__name__}")
        print(f"\nexpand: writes y, reads u (summing the shrink's splits) and B  "
              f"({ideal(2 * M * N + 2 * distinct * R * N)})")
        for splits in (None, 1, 8, 32):
            u = kernels.grouped_shrink(x, A, ranks, group, L, splits=splits)
            for block_n, warps in itertools.product((64, 128, 256), (4, 8)):
                us = t(lambda: kernels.grouped_expand(u, B, None, group, scalings, ranks, L, dt, BLOCK_N=block_n,
                                                      num_warps=warps))
                print(f"  u of {u.shape[0]:2d} splits  BLOCK_N {block_n:3d} warps {warps}  {us:8.1f} us")
        print("\nwhole calls")
        print(f"base with the A slots stacked under W  {t(lambda: x.view(M, K) @ held.T):8.1f} us   (x [W; A]^T)")
        for backend in ("sgmv_cublas", "cublas_batched", "triton", "cuda", "bgmv", "stacked"):
            with fusedpeft.use_backend(backend):
                us = t(lambda: multi_lora_linear(x.view(G, L, K), W, None, A, B, scalings, ranks, group))
            print(f"  {backend:15s} {us:8.1f} us")


if __name__ == "__main__":
    main()
