"""One benchmark harness for every method: CUDA-event medians after warm-up, ratios to the cuBLAS
base layer measured in the same run, peak memory of one training step, a Markdown table for
RESULTS.md and a PNG plot. Methods add cases (benchmarks/lora.py, ...), not harnesses."""
from __future__ import annotations

import dataclasses
import gc
import platform
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Case:
    """One variant at one shape: ``make()`` builds fresh inputs and returns (forward, train_step)
    closures; train_step runs forward + backward as in training."""

    group: str  # shape/config label, shared by the variants compared with each other
    variant: str  # "base (cuBLAS)", "fusedpeft", ...
    make: Callable[[], tuple[Callable, Callable]]
    flops: float = 0.0  # forward FLOPs, for achieved TFLOP/s


@dataclasses.dataclass
class Result:
    group: str
    variant: str
    fwd_ms: float
    train_ms: float
    train_mem_mib: float
    flops: float


def median_ms(fn: Callable, warmup_ms: float = 25, rep_ms: float = 150) -> float:
    """Median of CUDA-event timings after warm-up (triton's do_bench flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def train_step_peak_mib(step: Callable) -> float:
    """Peak memory one training step allocates above what was live before it."""
    step()  # warm: autotuning and caches out of the measurement
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run(cases: list[Case], log=print) -> list[Result]:
    results = []
    for case in cases:
        fwd, step = case.make()
        fwd()
        step()
        torch.cuda.synchronize()
        r = Result(case.group, case.variant, median_ms(fwd), median_ms(step), train_step_peak_mib(step), case.flops)
        log(f"{r.group:38s} {r.variant:18s} fwd {r.fwd_ms:8.4f} ms  train {r.train_ms:8.4f} ms  mem {r.train_mem_mib:9.1f} MiB")
        results.append(r)
        del fwd, step
        gc.collect()
        torch.cuda.empty_cache()
    return results


def environment() -> str:
    import triton

    parts = [f"GPU: {torch.cuda.get_device_name()}", f"torch {torch.__version__}", f"triton {triton.__version__}",
             f"python {platform.python_version()}"]
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        parts.append("peft not installed")
    return ", ".join(parts)


def table(results: list[Result], base: str, compare: Optional[str] = None) -> str:
    """Markdown table: times, ratios to the base variant of the same group (and to ``compare``)."""
    by_group: dict[str, dict[str, Result]] = {}
    for r in results:
        by_group.setdefault(r.group, {})[r.variant] = r
    head = "| case | variant | fwd ms | fwd / base | train ms | train / base | train MiB | mem / base | TFLOP/s fwd |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    if compare:
        head += f" fwd / {compare} | train / {compare} |"
        sep += "---:|---:|"
    lines = [head, sep]
    for group, variants in by_group.items():
        b = variants.get(base)
        c = variants.get(compare) if compare else None
        for name, r in variants.items():
            tflops = r.flops / (r.fwd_ms * 1e-3) / 1e12 if r.flops else float("nan")
            row = (f"| {group} | {name} | {r.fwd_ms:.4f} | {r.fwd_ms / b.fwd_ms:.3f} | {r.train_ms:.4f} | "
                   f"{r.train_ms / b.train_ms:.3f} | {r.train_mem_mib:.1f} | {r.train_mem_mib / max(b.train_mem_mib, 1e-9):.3f} | {tflops:.0f} |")
            if compare:
                row += (f" {r.fwd_ms / c.fwd_ms:.3f} | {r.train_ms / c.train_ms:.3f} |" if c else " - | - |")
            lines.append(row)
    return "\n".join(lines)


def plot(results: list[Result], base: str, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in results))
    variants = [v for v in dict.fromkeys(r.variant for r in results) if v != base]
    index = {(r.group, r.variant): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(groups)), 5), sharey=False)
    width = 0.8 / max(len(variants), 1)
    for ax, attr, label in ((axes[0], "fwd_ms", "forward"), (axes[1], "train_ms", "forward + backward")):
        for i, v in enumerate(variants):
            ys = [getattr(index[(g, v)], attr) / getattr(index[(g, base)], attr) if (g, v) in index else 0 for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=v)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"time / {base}")
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cli(doc: str, add_args: Callable, make_cases: Callable, title: str, argv=None, default_shapes=()) -> list[Result]:
    """The command line every method's benchmark shares: --shapes MxKxN,... --dtype --out --plot,
    plus the method's own options (add_args(parser)); make_cases(M, K, N, dtype, with_peft, args)
    returns that shape's cases. Prints the table and writes it (and the plot) when asked."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(default_shapes), help="tokens x in x out, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        import peft  # noqa: F401

        with_peft = True
    except ImportError:
        with_peft = False
    dtype = getattr(torch, args.dtype)
    all_cases = []
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.lower().split("x"))
        all_cases += make_cases(M, K, N, dtype, with_peft, args)
    results = run(all_cases)
    md = f"{environment()}, {args.dtype}\n\n" + table(results, "base (cuBLAS)", "peft" if with_peft else None)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
    if args.plot:
        plot(results, "base (cuBLAS)", args.plot, f"{title}, {environment()}")
    return results


def step_fn(forward: Callable, grad: torch.Tensor, params) -> Callable:
    """A training step: clear the gradients of params, forward, backward with grad."""

    def step():
        for p in params:
            p.grad = None
        forward().backward(grad)

    return step


def host_profile(label: str, fn: Callable, calls: int = 50, profiled_calls: int = 20, top: int = 6) -> float:
    """Host time of fn per call, timed without a sync inside the loop (what the CPU spends when
    the GPU work is short), then the top of cProfile over a few more calls. Returns ms/call."""
    import cProfile
    import io
    import pstats
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    print(f"{label} host {host_ms:.3f} ms/call (no sync inside)")
    if not top:
        return host_ms
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(profiled_calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    rows = [ln for ln in text.getvalue().splitlines() if ln.strip() and ln.strip()[0].isdigit()][:top]
    for ln in rows:
        print("     ", ln[:150])
    return host_ms
