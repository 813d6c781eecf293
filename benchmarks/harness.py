"""One benchmark harness for every method: CUDA-event medians after warm-up, ratios to the cuBLAS
base layer measured in the same run, peak memory of one training step, a Markdown table for
RESULTS.md and a PNG plot. Methods add cases (benchmarks/lora.py, ...), not harnesses.

On a CPU device (``run(..., device="cpu")``, for smoke tests of the benchmark code) the timings
are perf_counter medians and memory is not measured (NaN, shown as "-")."""
from __future__ import annotations

import dataclasses
import gc
import math
import platform
import statistics
import time
from typing import Callable, Optional, Sequence, Union

import torch


@dataclasses.dataclass
class Case:
    """One variant at one shape: ``make()`` builds fresh inputs and returns (forward, train_step)
    closures; train_step runs forward + backward as in training."""

    group: str  # shape/config label, shared by the variants compared with each other
    variant: str  # "base (cuBLAS)", "fusedpeft", ...
    make: Callable[[], tuple[Callable, Callable]]
    flops: float = 0.0  # forward FLOPs, for achieved TFLOP/s
    # What ran, for the table's "path" column: a fixed label, or a callable asked right after the
    # first forward (e.g. ``lambda: fusedpeft.last_backend("lora_linear")``).
    path: Union[str, Callable[[], Optional[str]], None] = None


@dataclasses.dataclass
class Result:
    group: str
    variant: str
    fwd_ms: float
    train_ms: float
    train_mem_mib: float  # NaN where not measured (CPU)
    flops: float
    path: str = ""


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def synchronize(device="cuda"):
    if _is_cuda(device):
        torch.cuda.synchronize()


def median_ms(fn: Callable, warmup_ms: float = 25, rep_ms: float = 150, device="cuda") -> float:
    """Median of CUDA-event timings after warm-up (triton's do_bench flushes L2 between runs).
    Elsewhere (CPU): median of perf_counter timings, after warmup_ms of calls, over rep_ms of calls
    (at least 1 warm-up call and 3 timed ones)."""
    if _is_cuda(device):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    t_end = time.perf_counter() + warmup_ms * 1e-3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn: Callable) -> Callable:
    """fn captured in a CUDA graph, returned as its replay (fusedpeft.tuning.graphed): timing
    replays measures GPU time alone, as a server that captures its decode steps sees it."""
    from fusedpeft import tuning

    return tuning.graphed(fn)


def train_step_peak_mib(step: Callable, device="cuda") -> float:
    """Peak memory one training step allocates above what was live before it (CUDA only: NaN
    elsewhere)."""
    if not _is_cuda(device):
        return float("nan")
    step()  # warm: autotuning and caches out of the measurement
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def release(device="cuda"):
    """Free what the last case left before the next is built: on CUDA its memory must be gone
    before the next peak is measured. CPU runs measure no memory and skip the full collection
    (about 0.3 s with transformers loaded)."""
    if _is_cuda(device):
        gc.collect()
        torch.cuda.empty_cache()


def _path_of(case: Case) -> str:
    if case.path is None:
        return ""
    if callable(case.path):
        return case.path() or "?"
    return case.path


def run(cases: list[Case], log=print, device="cuda", warmup_ms: float = 25, rep_ms: float = 150,
        on_result: Optional[Callable[[list[Result]], None]] = None, backward_thread: str = "caller") -> list[Result]:
    """Time each case (forward, training step, peak memory of a step) on ``device``. Cases run one
    after another: each builds its inputs, is measured, and is freed before the next.
    ``on_result(results so far)`` is called after each (a report that a time limit may cut short).

    ``backward_thread``: "caller" runs each step's backward on the calling thread
    (torch.autograd.set_multithreading_enabled(False)), "engine" on autograd's device thread, as a
    lone ``.backward()`` does. A model's step hands its one backward to that thread once; a layer
    step timed alone would pay the hand-off (about 0.4 ms on the H200's host: tools/layer_split
    --backward-on-caller) at every layer, so "caller" is the default."""
    if backward_thread not in BACKWARD_THREADS:
        raise ValueError(f"backward_thread must be one of {BACKWARD_THREADS}, got {backward_thread!r}")
    with torch.autograd.set_multithreading_enabled(backward_thread == "engine"):
        return _run(cases, log, device, warmup_ms, rep_ms, on_result)


BACKWARD_THREADS = ("caller", "engine")


def _run(cases, log, device, warmup_ms, rep_ms, on_result) -> list[Result]:
    results = []
    for case in cases:
        t0 = time.perf_counter()
        fwd, step = case.make()
        fwd()
        path = _path_of(case)  # asked right after the forward, before anything else runs
        step()
        synchronize(device)
        first_s = time.perf_counter() - t0  # inputs, and the first calls: compiles and tuning
        r = Result(case.group, case.variant, median_ms(fwd, warmup_ms, rep_ms, device),
                   median_ms(step, warmup_ms, rep_ms, device), train_step_peak_mib(step, device), case.flops, path)
        del fwd, step
        release(device)
        mem = f"{r.train_mem_mib:9.1f} MiB" if not math.isnan(r.train_mem_mib) else "        - MiB"
        log(f"{r.group:38s} {r.variant:18s} fwd {r.fwd_ms:8.4f} ms  train {r.train_ms:8.4f} ms  mem {mem}"
            + (f"  [{r.path}]" if r.path else "") + f"  (first {first_s:.1f} s, case {time.perf_counter() - t0:.1f} s)")
        results.append(r)
        if on_result is not None:
            on_result(results)
    return results


def after_each_group(cases: list[Case], callback: Callable[[list[Result]], None]):
    """An ``on_result`` for run(): callback(results so far) each time a group's last case is
    measured, but the run's last (the caller writes the whole report then). Benchmarks write
    their partial reports with it, so a run stopped by a time limit keeps the groups it finished."""

    def on_result(results: list[Result]) -> None:
        if len(results) < len(cases) and cases[len(results)].group != results[-1].group:
            callback(results)

    return on_result


def environment(device="cuda") -> str:
    if _is_cuda(device):
        parts = [f"GPU: {torch.cuda.get_device_name()}"]
    else:
        parts = [f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    parts.append(f"torch {torch.__version__}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton not installed")
    parts.append(f"python {platform.python_version()}")
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        parts.append("peft not installed")
    return ", ".join(parts)


def fmt(value: Optional[float], spec: str = ".3f") -> str:
    """``value`` in the format ``spec``; "-" for a value not measured (None, NaN or infinite)."""
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def ratio(a: Optional[float], b: Optional[float]) -> float:
    """a / b; NaN where either is missing (None or NaN) or b is not positive."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return float("nan")
    return a / b


def table(results: list[Result], base: str, compare: Union[str, Sequence[str], None] = None) -> str:
    """Markdown table: times, ratios to the base variant of the same group, and to each variant
    named in ``compare`` (one name or several). A "path" column (what ran) appears when any result
    has one. Memory not measured (NaN) shows as "-"."""
    compares = [compare] if isinstance(compare, str) else list(compare or [])
    with_path = any(r.path for r in results)
    by_group: dict[str, dict[str, Result]] = {}
    for r in results:
        by_group.setdefault(r.group, {})[r.variant] = r
    head = "| case | variant |" + (" path |" if with_path else "")
    head += " fwd ms | fwd / base | train ms | train / base | train MiB | mem / base | TFLOP/s fwd |"
    sep = "|---|---|" + ("---|" if with_path else "") + "---:|---:|---:|---:|---:|---:|---:|"
    for c in compares:
        head += f" fwd / {c} | train / {c} |"
        sep += "---:|---:|"
    lines = [head, sep]
    for group, variants in by_group.items():
        b = variants.get(base)
        for name, r in variants.items():
            tflops = r.flops / (r.fwd_ms * 1e-3) / 1e12 if r.flops and r.fwd_ms > 0 else float("nan")
            row = f"| {group} | {name} |" + (f" {r.path or '-'} |" if with_path else "")
            row += (f" {r.fwd_ms:.4f} | {fmt(ratio(r.fwd_ms, b.fwd_ms if b else None))} | {r.train_ms:.4f} | "
                    f"{fmt(ratio(r.train_ms, b.train_ms if b else None))} | {fmt(r.train_mem_mib, '.1f')} | "
                    f"{fmt(ratio(r.train_mem_mib, max(b.train_mem_mib, 1e-9) if b else None))} | {fmt(tflops, '.0f')} |")
            for cname in compares:
                c = variants.get(cname)
                row += (f" {r.fwd_ms / c.fwd_ms:.3f} | {r.train_ms / c.train_ms:.3f} |" if c else " - | - |")
            lines.append(row)
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_bars(ax, groups: Sequence, variants: Sequence[str], value: Callable, ylabel: str, labels=None):
    """One bar per group and variant, value(group, variant) high (0 where it is None), the variants
    of a group side by side, with a line at 1.0: the plot of ratios to a reference."""
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        ys = [value(g, v) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [0 if y is None else y for y in ys], width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups if labels is None else labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def save_figure(fig, path: str):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot(results: list[Result], base: str, path: str, title: str, variants: Optional[Sequence[str]] = None,
         panels=(("fwd_ms", "forward"), ("train_ms", "forward + backward")), log: bool = False):
    """Bars of time / base per group, one panel per (Result attribute, title) of ``panels`` (the
    forward and the training step by default), on a log scale with ``log`` (ratios that span
    orders of magnitude); ``variants``: which to draw, default all but the base."""
    groups = list(dict.fromkeys(r.group for r in results))
    present = [v for v in dict.fromkeys(r.variant for r in results) if v != base]
    variants = present if variants is None else [v for v in variants if v in present]
    index = {(r.group, r.variant): r for r in results}
    # 1.3 inch per group up to 60 inches; past that the groups share the width (bars get thinner).
    fig, axes = pyplot().subplots(1, len(panels), figsize=(min(60, max(10, 1.3 * len(groups))), 5), sharey=False,
                                  squeeze=False)
    for ax, (attr, label) in zip(axes.flat, panels):
        ratio_bars(ax, groups, variants,
                   lambda g, v: getattr(index[(g, v)], attr) / getattr(index[(g, base)], attr) if (g, v) in index else None,
                   f"time / {base}" + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
        ax.set_title(label)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


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


def host_ms(fn: Callable, calls: int, warmup: int = 1, device="cuda") -> float:
    """Host time of fn per call, in ms: the mean over ``calls`` calls after ``warmup`` calls, with
    no sync inside the timed loop (what the host spends when the device work is short). On CUDA
    the device is synchronised before and after the timed loop."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - t0) / calls * 1e3
    synchronize(device)
    return ms


def median_wall_s(calls: dict, repeats: int, device="cuda") -> dict:
    """{label: median wall time in seconds} of each of ``calls`` ({label: fn}, a whole call such as
    a generate, end to end, the device synchronised around each), after one warm-up call each. The
    calls take turns, the order mirrored every other round (a, b, c, c, b, a, ...): a host whose
    speed drifts during the run (a shared machine) then weighs on every variant alike, where
    timing one variant's calls back to back would hand the drift to whichever ran then."""
    for fn in calls.values():
        fn()
    times: dict = {label: [] for label in calls}
    order = list(calls)
    for round_ in range(repeats):
        for label in (order if round_ % 2 == 0 else order[::-1]):
            synchronize(device)
            t0 = time.perf_counter()
            calls[label]()
            synchronize(device)
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(values) for label, values in times.items()}


def host_profile(label: str, fn: Callable, calls: int = 50, profiled_calls: int = 20, top: int = 6) -> float:
    """Host time of fn per call (host_ms, on CUDA), then the top of cProfile over a few more
    calls. Returns ms/call."""
    host = host_ms(fn, calls)
    print(f"{label} host {host:.3f} ms/call (no sync inside)")
    if not top:
        return host
    for ln in profile_rows(fn, profiled_calls, top):
        print("     ", ln[:150])
    return host


def profile_rows(fn: Callable, calls: int, top: int) -> list[str]:
    """The top rows of cProfile (by own time) over ``calls`` calls of fn, device synchronised after."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return [ln for ln in text.getvalue().splitlines() if ln.strip() and ln.strip()[0].isdigit()][:top]


def step_times_ms(step: Callable[[int], None], steps: int, cuda: bool = True) -> list[float]:
    """Times of ``steps`` calls step(0), step(1), ... one by one, in ms. On CUDA: events recorded on
    the current stream around each call, one synchronize after the loop (no host sync inside it, so
    the host can run ahead as in training). Otherwise time.perf_counter around each call."""
    if not cuda:
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for i, (start, end) in enumerate(events):
        start.record()
        step(i)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]
