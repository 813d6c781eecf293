"""Where one layer's training step goes, for every variant of benchmarks.layers at a shape: the
CUDA-event time the layer table reports, the GPU time of its kernels (torch.profiler) and the
host time of issuing it (the device kept busy by a sleep kernel, so no launch waits for it). A
variant whose event time follows its host time, not its kernels, is host-bound.

    python -m tools.layer_split 8192x4096x1024 8192x3072x3072 [--r 16] [--p 0,0.05] [--top 12]
        [--backward-on-caller]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks import harness, layers
from fusedpeft import tuning
from tools.profile_kernels import profile_step


def host_us(step, calls: int = 30) -> float:
    """Host time of one step in us: calls issued behind a long sleep kernel, so the host never
    waits for the device (a host sync inside the step would show as the sleep's length)."""
    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~0.1 s of device time ahead of the loop
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


HEADER = f"  {'variant':34s} {'event ms':>9s} {'kernels ms':>10s} {'host ms':>8s} launches"


def split_row(label: str, step, each: bool = False) -> str:
    """One row of the split: the step's CUDA-event time, its kernels' GPU time, its host time and
    its launch count; with ``each``, every kernel below it (us, in launch order)."""
    event = harness.median_ms(step, 10, 50)
    kernels = profile_step(step)
    gpu = sum(us for _, us in kernels.values()) / 1e3
    row = f"  {label:34s} {event:9.3f} {gpu:10.3f} {host_us(step) / 1e3:8.3f} {len(kernels):4d}"
    if each:
        row += "".join(f"\n      {us:8.2f} us  {name[:100]}" for name, (_, us) in kernels.items())
    return row


def tuner_line(entry: dict, digits: int = 3) -> str:
    """A tuning.LOG entry as "name ms, ... -> winner", the fastest candidate first."""
    ms = ", ".join(f"{name} {t:.{digits}f}" for name, t in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
    return f"{ms} -> {entry['winner']}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", default=["8192x4096x1024", "8192x3072x3072", "2048x2048x512"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--p", default="0,0.05")
    parser.add_argument("--method", default="lora", choices=["lora", "dora"])
    parser.add_argument("--top", type=int, default=12, help="cProfile rows of fusedpeft's automatic step (0: none)")
    parser.add_argument("--backward-on-caller", action="store_true",
                        help="torch.autograd.set_multithreading_enabled(False): the backward runs on the calling "
                             "thread, not autograd's device thread (shows the cost of that hand-off and of taking the "
                             "GIL there for a Python backward)")
    args = parser.parse_args(argv)
    if args.backward_on_caller:
        torch.autograd.set_multithreading_enabled(False)
    opts = layers.parse_args(["--device", "cuda"])
    for text in args.shapes:
        M, K, N = (int(v) for v in text.split("x"))
        for p in (float(v) for v in args.p.split(",")):
            group = layers.Group(layers.Shape("shape", "-", K, N), M, args.method, args.r, p)
            print(f"\n{group.label}")
            print(HEADER)
            measured = len(tuning.LOG)
            for case in layers.lora_cases(group, torch.device("cuda"), torch.bfloat16, True, opts):
                _, step = case.make()
                print(split_row(case.variant, step))
                if args.top and case.variant == layers.OURS:
                    print("\n".join("     " + row[:150] for row in harness.profile_rows(step, 20, args.top)))
                del step
                torch.cuda.empty_cache()
            for entry in tuning.LOG[measured:]:  # what the tuner measured for the automatic variant
                print(f"  tuner, {entry['op']}: {tuner_line(entry)}")


if __name__ == "__main__":
    main()
