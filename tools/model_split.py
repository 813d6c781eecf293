"""Where a model's training step goes, for each variant of benchmarks.model (peft, from_peft,
inject, floor): the CUDA-event time of a step (the model table's figure), the GPU time of the step's
kernels (torch.profiler, summed over the step) and the share of the step the GPU spends in them. A
step whose kernels fill a small share of its time waits on the host (Python, launches): faster
kernels do not make it faster, fewer host microseconds per layer do.

    python -m tools.model_split --models qwen2.5-0.5b --batches 4x2048 --adapters lora,lora-dropout
    python -m tools.model_split --device cpu --tiny --models qwen2.5-0.5b --batches 1x16 --adapters lora

Options are benchmarks.model's (--models, --batches, --adapters, --variants, --layers, --tiny,
--device, --seed, --warmup-steps, --timed-steps, --rounds). The step times are taken in turns with
the other variants (a host-bound step drifts by tens of percent over seconds on the lent machines).
On a CPU device the kernel columns are left out.
"""
from __future__ import annotations

import sys
import warnings

import torch

from benchmarks import harness
from benchmarks import model as bench_model
from tools.profile_kernels import profile_step


def kernels_row(step, cuda: bool) -> dict:
    """kernels ms and launches per step (torch.profiler; None off CUDA)."""
    if not cuda:
        return {"kernels_ms": None, "launches": None}
    kernels = profile_step(lambda: step(0), steps=2)
    return {"kernels_ms": sum(us for _, us in kernels.values()) / 1e3, "launches": len(kernels)}


def train_steps(model, opt, batches):
    """step(i): one training step of benchmarks.model on batches[i], cycled."""
    return lambda i: bench_model.train_step(model, opt, batches[i % len(batches)])


def main(argv=None, log=print) -> list[dict]:
    """The rows: the variants of one (model, adapter) are built together, warmed up, and timed in
    interleaved turns as benchmarks.model times them (max(--rounds, 1) x --timed-steps steps each),
    then each is profiled on its own."""
    args = bench_model.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    log(bench_model.environment(device))
    log(f"{'model':13s} {'batch':7s} {'adapter':12s} {'variant':22s} {'event ms':>9s} {'kernels ms':>10s} "
        f"{'GPU busy':>8s} {'launches':>8s}")
    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for model_name in args.model_names:
            vocab = bench_model.family_config(model_name, 1, args.tiny, 1).vocab_size
            for adapter in args.adapter_names:
                runs = {}
                for variant in args.variant_keys:
                    model = bench_model.build_variant(variant, model_name, adapter, args, device)
                    runs[variant] = (model, bench_model.make_optimizer(model, bench_model.TIMING_LR))
                for shape in args.batch_shapes:
                    batches = bench_model.random_batches(shape, args.warmup_steps + args.timed_steps, vocab, args.seed,
                                                         device)
                    for model, opt in runs.values():
                        for i in range(args.warmup_steps):
                            bench_model.train_step(model, opt, batches[i])
                    events = bench_model.time_interleaved(runs, batches, max(args.rounds, 1) * args.timed_steps, device)
                    for variant, (model, opt) in runs.items():
                        row = dict(model=model_name, batch=f"{shape[0]}x{shape[1]}", adapter=adapter,
                                   variant=bench_model.VARIANTS[variant], event_ms=events[variant],
                                   **kernels_row(train_steps(model, opt, batches), cuda))
                        rows.append(row)
                        busy = "-" if row["kernels_ms"] is None else f"{row['kernels_ms'] / row['event_ms']:8.0%}"
                        kernels = "-" if row["kernels_ms"] is None else f"{row['kernels_ms']:10.2f}"
                        log(f"{model_name:13s} {row['batch']:7s} {adapter:12s} {row['variant']:22s} "
                            f"{row['event_ms']:9.2f} {kernels:>10s} {busy:>8s} {row['launches'] or '-':>8}")
                del runs
                harness.release(device)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
