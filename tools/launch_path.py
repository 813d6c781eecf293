"""Which path the Triton launches take on this machine: fast_launch's direct call of the compiled
kernel's launcher, or Triton's own entry (``kernel[grid]``, taken where this Triton's
CompiledKernel is laid out otherwise, or while a launch hook is installed). It runs one LoRA
training step with dropout through the ``triton`` backend (every launch a Triton kernel), then
prints the compiled-kernel cache's entries, whether a launch hook is installed and the step's host
time: before and after a torch.profiler session (which tools.layer_split runs before it times the
host), and with an empty hook installed (every launch through Triton's entry).

    python -m tools.launch_path [--shape 8192x2048x512] [--r 16]
"""
from __future__ import annotations

import argparse

import torch

from tools.layer_split import host_us
from tools.profile_kernels import profile_step


def describe(label: str, step) -> None:
    from fusedpeft._kernels import triton_kernels

    fast_launch = triton_kernels.fast_launch
    step()
    direct = sum(entry.run is not None for entry in fast_launch.COMPILED.values())
    print(f"{label}: fast_launch enabled {fast_launch.enabled()}, compiled entries {len(fast_launch.COMPILED)} "
          f"(direct launcher {direct}), launch hooks installed {fast_launch.launch_hooks_installed()}, "
          f"step host {host_us(step):.1f} us")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192x2048x512")
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    import fusedpeft

    M, K, N = (int(v) for v in args.shape.split("x"))
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    A = (torch.randn(args.r, K, device=device) / K**0.5).requires_grad_()
    B = torch.randn(N, args.r, device=device).requires_grad_()
    g = torch.randn(M, N, device=device, dtype=dtype)

    def step():
        with fusedpeft.use_backend("triton"):
            torch.autograd.grad(fusedpeft.ops.lora_linear(x, W, None, A, B, 2.0, 0.05, True), (x, A, B), g)

    print(torch.cuda.get_device_name(), "torch", torch.__version__, end=" ")
    import triton

    print("triton", triton.__version__)
    describe("before torch.profiler", step)
    profile_step(step)
    describe("after torch.profiler ", step)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime.launch_enter_hook, "add"):
        def hook(*args):
            return None

        knobs.runtime.launch_enter_hook.add(hook)  # every launch through Triton's entry, as a profiler makes it
        try:
            describe("with a launch hook   ", step)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)


if __name__ == "__main__":
    main()
