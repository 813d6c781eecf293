"""GPU time of every kernel one fusedpeft LoRA training step launches (torch.profiler, CUDA
activity), beside the step's wall time: which launch is short of its roofline, and how much of
the step is the GPU idling on the host.

    python -m tools.profile_kernels [MxKxN ...] [--ranks 16,64] [--dropouts 0,0.05] [--backend triton]
"""
from __future__ import annotations

import argparse
import collections

import torch

import fusedpeft
from fusedpeft.ops import lora_linear

from benchmarks import harness
from benchmarks.lora import _inputs


def profile_step(step, steps: int = 10):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    # Each launch in the order the step makes them, its time the mean over the profiled steps.
    launches = [evt for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA]
    launches.sort(key=lambda evt: evt.time_range.start)
    per_step = len(launches) // steps
    table = collections.OrderedDict()
    for i in range(per_step):
        same = launches[i::per_step]
        us = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in same)
        table[f"{i:2d} {same[0].name[:90]}"] = (1, us / len(same))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", default=["4096x4096x4096", "8192x4096x14336", "16x4096x4096"])
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--dropouts", default="0", help="lora_dropout values, each profiled in training mode")
    parser.add_argument("--backend", default="triton")
    args = parser.parse_args(argv)
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        for r, p in [(int(r), float(p)) for r in args.ranks.split(",") for p in args.dropouts.split(",")]:
            x, W, A, B, g = _inputs(M, K, N, r, torch.bfloat16)

            def step():
                with fusedpeft.use_backend(args.backend):
                    x.grad = A.grad = B.grad = None
                    lora_linear(x, W, None, A, B, 2.0, dropout_p=p, training=True).backward(g)

            wall = harness.median_ms(step)
            kernels = profile_step(step)
            gpu_us = sum(us for _, us in kernels.values())
            print(f"\n{shape} r={r} p={p} {args.backend}: step {wall:.4f} ms (CUDA events), kernels {gpu_us / 1e3:.4f} ms, "
                  f"GPU idle {max(wall - gpu_us / 1e3, 0):.4f} ms")
            for name, (_, us) in kernels.items():
                print(f"   {us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
