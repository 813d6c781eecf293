"""Which tile configs of a fused LoRA launch fault (GPU): each candidate config of the forward or
grad_x kernel at one shape runs alone in a fresh process (a fault is a sticky CUDA error that
ends the process's context), optionally under compute-sanitizer's memcheck, which names the
faulting access. Each run also checks the launch's output against a float64 reference.

    python -m tools.config_faults 960x195x13 --r 32 --dropout 0.1 [--launch grad_x] [--dtype bf16]
                                  [--in-loop] [--sanitize]

--in-loop: the rank-r product computed beside the main loop (the 'fused' schedule, as at M <= 64)
instead of read from memory.

The shape is M x K -> N of the layer (x [M, K], W [N, K]); grad_x's GEMM is then M x N -> K.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_one(args) -> None:
    """The child: one launch with settings.tile_config = args.child, synchronised and checked."""
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.settings import settings

    lora = triton_kernels.lora
    M, K, N = (int(v) for v in args.shape.split("x"))
    dtype, r, p, s = DTYPES[args.dtype], args.r, args.dropout, 0.75
    torch.manual_seed(0)
    d = args.device
    x = torch.randn(M, K, device=d).to(dtype)
    W = (torch.randn(N, K, device=d) / K**0.5).to(dtype)
    A = (torch.randn(r, K, device=d) / K**0.5).to(dtype)
    B = (torch.randn(N, r, device=d) / r**0.5).to(dtype)
    seed = torch.tensor([1234], device=d, dtype=torch.int64)
    keep = lora.dropout_mask(seed, (M, K), p, d).double() if p > 0 else torch.ones(M, K, device=d, dtype=torch.float64)
    in_loop = args.in_loop
    with settings.override(tile_config=args.child):
        if args.launch == "forward":
            y = torch.empty(M, N, device=d, dtype=dtype)
            u_s = (s * (x.double() * keep) @ A.double().T).to(dtype)
            lr = torch.empty_like(u_s) if in_loop else u_s  # written by the launch in the loop
            lora._launch_lora(lora._FORWARD, x, W, y, A, B, lr, s, seed, p if in_loop else 0.0, bias=None,
                              in_loop=in_loop, dropout_arg=False)
            ref = x.double() @ W.double().T + u_s.double() @ B.double().T
            got = y
        else:
            grad_y = torch.randn(M, N, device=d).to(dtype)
            g_s = (s * grad_y.double() @ B.double()).to(dtype)
            grad_x = torch.empty(M, K, device=d, dtype=dtype)
            lr = torch.empty_like(g_s) if in_loop else g_s
            lora._launch_lora(lora._GRAD_X, grad_y, W.T, grad_x, B.T, A.T, lr, s, seed, p, bias=None,
                              in_loop=in_loop, dropout_arg=True)
            ref = grad_y.double() @ W.double() + keep * (g_s.double() @ A.double())
            got = grad_x
        if d == "cuda":
            torch.cuda.synchronize()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    print(f"ran: relative error {err:.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--launch", default="grad_x", choices=["forward", "grad_x"])
    parser.add_argument("--in-loop", action="store_true", help="the rank-r product beside the main loop")
    parser.add_argument("--sanitize", action="store_true", help="run each under compute-sanitizer --tool memcheck")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the child under the interpreter
    args = parser.parse_args(argv)
    if args.child is not None:
        return run_one(args)
    from fusedpeft._kernels import triton_kernels

    M, K, N = (int(v) for v in args.shape.split("x"))
    out_cols = N if args.launch == "forward" else K
    cands = triton_kernels.configs.candidates(M, out_cols, DTYPES[args.dtype].itemsize)
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1" if args.sanitize else "0", "FUSEDPEFT_CACHE_DIR": ""}
    base = [sys.executable, "-m", "tools.config_faults", args.shape, "--r", str(args.r), "--dropout",
            str(args.dropout), "--dtype", args.dtype, "--launch", args.launch] + (["--in-loop"] if args.in_loop else [])
    for index, cand in enumerate(cands):
        command = base + ["--child", str(index)]
        if args.sanitize:
            command = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3"] + command
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and "warn" not in line.lower()]
        print(f"[{index}] {cand}: rc {proc.returncode}", flush=True)
        for line in lines[-(12 if proc.returncode else 1):]:
            print("    " + line[:300], flush=True)


if __name__ == "__main__":
    main()
