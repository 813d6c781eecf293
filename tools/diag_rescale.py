"""Host-side profile of the IA3 / SSF calls (GPU): per-call host time, compiled-kernel cache
growth, and the top of cProfile, for each variant of benchmarks.rescale at one shape.

    python -m tools.diag_rescale 16 4096 4096

and, with --kernels, each kernel of the steps timed alone (kernel_variants):

    python -m tools.diag_rescale --kernels 4096x4096x4096 8192x4096x14336
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import harness, rescale


def host_profiles(M=16, K=4096, N=4096):
    """Host time, compiled-kernel cache growth and cProfile's top of every fusedpeft variant of
    benchmarks.rescale at one shape, forward and training step."""
    from fusedpeft._kernels import triton_kernels

    cache = triton_kernels.fast_launch.COMPILED
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


def kernel_variants(M=4096, K=4096, N=4096, log=print):
    """Each GPU kernel of the IA3 / SSF steps timed alone (bf16), beside cuBLAS's x W^T and the
    core GEMM with nothing fused (rescale_kernel with a scale of ones), with the tuner's
    three best configs: where each variant's time goes. "flattened loop" forces the register-scaled
    loop into one flattened tile-and-K loop (settings.loop_form), whose wgmmas ptxas serialises;
    the core on per-tile K loops (the form the register-scaled loop takes on 16-bit 128-row tiles)
    separates the cost of the loop form from that of the scaling. "by pointer" reads the saved-z /
    reduced tiles by pointer instead of by tensor descriptor (settings.rescale_tma off)."""
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.settings import settings

    configs, layout, rescale = triton_kernels.configs, triton_kernels.layout, triton_kernels.rescale
    reduce_against = rescale._reduce_against

    def scaled_input(a, w, out, bias, scale):
        return rescale._rescaled(a, w, out, bias, scale, input_scale=True)

    def scaled_output(a, w, out, bias, scale, shift, z):
        return rescale._rescaled(a, w, out, bias, scale, input_scale=False, shift=shift, z=z)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, g = torch.randn(M, K, **bf16), torch.randn(M, N, **bf16)
    W = torch.randn(N, K, **bf16) / K**0.5
    l_k, l_n = 1 + 0.1 * torch.randn(K, **bf16), 1 + 0.1 * torch.randn(N, **bf16)
    ones_k, ones_n = torch.ones(K, **bf16), torch.ones(N, **bf16)
    y, z, gx = torch.empty(M, N, **bf16), torch.empty(M, N, **bf16), torch.empty(M, K, **bf16)

    core = lambda: scaled_output(x, W, y, None, ones_n, None, None)  # noqa: E731
    ff_fwd = lambda: scaled_input(x, W, y, None, l_k)  # noqa: E731
    # grad_x = (g W) * l and grad_l = sum_rows((g W) * x) in one launch
    ff_grad = lambda: reduce_against(g, W.T, x, out=gx, scale=l_k)  # noqa: E731
    out_fwd_z = lambda: scaled_output(x, W, y, None, l_n, None, z)  # noqa: E731
    out_grad_x = lambda: scaled_input(g, W.T, gx, None, l_n)  # noqa: E731
    recompute = lambda: reduce_against(x, W, g, sum_other=True)  # noqa: E731
    pointers = dict(rescale_tma=False)  # the z / reduced tiles by pointer loads, not tensor descriptors
    # name: (the call, the settings it runs under)
    variants = {
        "cuBLAS x W^T": (lambda: torch.mm(x, W.T, out=y), {}),
        "core x W^T": (core, {}),
        "ia3-ff fwd: x*l in the K loop": (ff_fwd, {}),
        "ia3-ff fwd, flattened loop": (ff_fwd, dict(loop_form="flattened")),
        "core x W^T, per-tile K loop": (core, dict(loop_form="per_tile")),
        "ia3-ff fwd as x*l pre-pass + core": (lambda: scaled_output(x * l_k, W, y, None, ones_n, None, None), {}),
        "core g W (grad_x's GEMM)": (lambda: scaled_output(g, W.T, gx, None, ones_k, None, None), {}),
        "ia3-ff grad_x + grad_l (g W, reduce h*x)": (ff_grad, {}),
        "ia3-ff grad_x + grad_l, x by pointer": (ff_grad, pointers),
        "ia3-out fwd, no z": (lambda: scaled_output(x, W, y, None, l_n, None, None), {}),
        "ia3-out fwd, saving z": (out_fwd_z, {}),
        "ia3-out fwd, saving z by pointer": (out_fwd_z, pointers),
        "ia3-out grad_x: (g*l) W in the K loop": (out_grad_x, {}),
        "ia3-out grad_l from saved z (column dot)": (lambda: rescale._column_dot(g, z, True), {}),
        "ia3-out grad_l recomputing z": (recompute, {}),
        "ia3-out grad_l recomputing z, g by pointer": (recompute, pointers),
    }
    base = None
    for name, (fn, overrides) in variants.items():
        n_log = len(configs.TUNE_LOG)
        with settings.override(**overrides):  # around the whole timing: the launch plans hold within it
            fn()
            ms = harness.median_ms(fn)
        base = base or ms
        log(f"{M}x{K}x{N} {name:44s} {ms:.4f} ms  {ms / base:.3f}x cuBLAS")
        for entry in configs.TUNE_LOG[n_log:]:
            for t, cfg in entry["all"][:3]:
                log(f"      {t:.4f} ms  {cfg}")
    # The column dot (grad_l from a saved z) reads 4MN bytes: its configs against the bandwidth.
    column_dot_kernel = rescale.column_dot_kernel

    for block_m, block_c, warps, stages, per_sm in [(32, 128, 4, 3, 4), (64, 128, 4, 3, 4), (32, 256, 4, 3, 4),
                                                     (64, 256, 8, 3, 2), (16, 512, 4, 4, 4), (128, 128, 8, 2, 2),
                                                     (32, 128, 4, 4, 8), (64, 64, 4, 4, 8)]:
        col_blocks, splits, rows = layout.split_rows(M, N, block_m, block_c, g.device, per_sm)
        partial = torch.empty(2, splits, N, dtype=torch.float32, device="cuda")
        fn = lambda: column_dot_kernel[(col_blocks, splits)](g, z, partial, M, N, rows, g.stride(0), z.stride(0),
                                                             SUM_G=True, BLOCK_M=block_m, BLOCK_C=block_c,
                                                             num_warps=warps, num_stages=stages)
        fn()
        ms = harness.median_ms(fn)
        log(f"{M}x{K}x{N} column dot {block_m}x{block_c} w{warps} s{stages} {per_sm}/SM: {ms:.4f} ms, "
            f"{4 * M * N / ms / 1e9:.2f} TB/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", help="M K N of the host profile (default 16 4096 4096); with --kernels, "
                        "MxKxN shapes (default 4096x4096x4096)")
    parser.add_argument("--kernels", action="store_true", help="time each kernel of the steps alone (kernel_variants)")
    args = parser.parse_args(argv)
    if args.kernels:
        for shape in args.sizes or ["4096x4096x4096"]:
            kernel_variants(*(int(v) for v in shape.split("x")))
    else:
        host_profiles(*(int(v) for v in args.sizes[:3]))


if __name__ == "__main__":
    main()
