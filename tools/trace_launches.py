"""Run one LoRA training step with every Triton launch printed and synchronised, so that a launch
that faults (an illegal memory access is sticky: the process cannot go on) is the last line
printed. Tuning runs as usual, so every tile config the tuner tries is traced too. Launches go
through fast_launch.cached_launch (settings.fast_launch on, as by default), which is wrapped here;
a launch replayed from a plan would bypass it, but one step makes no launch twice with the same
plan key.

    python -m tools.trace_launches --shape 8192x5120x5120 --rank 16 --dtype float32 --backend triton
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192x5120x5120", help="tokens x in x out")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--backend", default="triton")
    args = parser.parse_args(argv)
    import fusedpeft
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.ops import lora_linear
    from fusedpeft.settings import settings

    fast_launch = triton_kernels.fast_launch
    real = fast_launch.cached_launch

    def traced(kernel, grid, call_args, constexprs, num_warps, num_stages):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        shapes = [tuple(a.shape) for a in call_args if isinstance(a, torch.Tensor)]
        flags = {k: v for k, v in constexprs.items() if v not in (False, None)}
        print(f"launch {name} grid={grid} warps={num_warps} stages={num_stages} tensors={shapes} {flags}", flush=True)
        entry = real(kernel, grid, call_args, constexprs, num_warps, num_stages)
        torch.cuda.synchronize()
        return entry

    M, K, N = (int(v) for v in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    W = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
    A = (torch.randn(args.rank, K, device=dev) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, args.rank, device=dev) / args.rank**0.5).to(dtype).requires_grad_()
    fast_launch.cached_launch = traced
    try:
        with settings.override(fast_launch=True):
            with fusedpeft.use_backend(args.backend):
                y = lora_linear(x, W, None, A, B, 0.5, dropout_p=args.dropout, training=True)
            torch.cuda.synchronize()
            print("forward ok", flush=True)
            y.backward(torch.randn_like(y))
            torch.cuda.synchronize()
            print("backward ok", flush=True)
    finally:
        fast_launch.cached_launch = real
    return 0


if __name__ == "__main__":
    sys.exit(main())
