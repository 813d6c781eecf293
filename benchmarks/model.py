"""Model-level training benchmark: the model is the measure.

It trains random-initialised transformers causal LMs shaped like four families (llama3-8b,
llama3.2-1b, qwen2.5-0.5b, phi3-mini; 8 decoder layers each, vocab 32000, bf16, SDPA attention;
configs built in code, nothing downloaded) with a LoRA (r=16, alpha=32, all-linear, dropout 0 or
0.05) or IA3 adapter, in four variants, each on a fresh model built from the same seed:

- "peft": ``peft.get_peft_model(base, config)``, peft's defaults (float32 adapters beside the bf16
  base, LoRA B zero at start), which is what users run;
- "fusedpeft (from_peft)": the same peft model after ``fusedpeft.from_peft`` (peft's layers
  swapped for fusedpeft's in place, same Parameter objects);
- "fusedpeft (inject)": the base with ``fusedpeft.inject`` of the same config;
- "floor": the base with nothing trainable, after ``enable_input_require_grads()``, so that the
  backward still runs through every layer: the cost of a frozen model, below any adapter.

A training step is forward (labels = input_ids), backward, AdamW step, zero_grad(set_to_none=True).
On the same random token batches per shape it reports:

- tokens/s from the median of CUDA-event timed steps after warm-up steps (--device cpu:
  perf_counter; no host sync inside the timed loop, Python's gc paused during it, as timeit does).
  With --rounds R (default 3) every variant of a case stays built after its own pass, and the
  figure is the median of R x --timed-steps further steps taken in turn, one step of each variant
  per turn, the order rotated each turn: a drift of the machine (a host-bound step's time moved by
  half between two variants timed seconds apart, on the lent H100 host) then falls on every
  variant alike. The pass of a variant alone stays in --json as "step_ms_alone";
- "first step s": the first warm-up step's wall time. It holds fusedpeft's first-run autotuning,
  so it shows on the first fused variant to meet a shape; later ones reuse the tuned configs (and
  later processes too, from fusedpeft's tuning file, where that exists);
- peak memory (torch.cuda.max_memory_allocated over the variant's own timed steps, whole model
  included, less what was allocated before the variant was built: the other variants, the batches);
- ratios to peft: tokens/s, memory, and (time - floor's time) / (peft's time - floor's time),
  the adapter's own cost relative to peft's (left out where peft's step is < 5% above the floor's);
  "least mem / peft", the floor's peak plus the adapters and their AdamW moments over peft's peak:
  no implementation of the same adapters can go under it (add_ratios).

The loss-curve check trains peft, from_peft and inject from the same initial weights (the inject
model gets peft's initial adapter tensors copied in) on the same two random batches, alternated,
at a learning rate that makes the loss fall (CURVE_LR), and reports max_t |loss_peft - loss| /
loss_peft. Above the tolerance (2e-2, or 5e-2 with dropout, whose masks differ by design) the row
says FAIL, and with --check the exit status is 1. A variant that raises is logged with its
traceback, listed under the tables, and makes the exit status 1; the run goes on.

    python -m benchmarks.model                                   # everything (a few minutes on an H200)
    python -m benchmarks.model --models llama3-8b --batches 4x2048 --adapters lora --out t.md --plot t.png
    python -m benchmarks.model --device cpu --tiny --batches 2x16 --timed-steps 1 --warmup-steps 1 --curve-steps 3

--json writes every row, the loss curves, fusedpeft.backend_counts() deltas per variant (which
backend ran how often over all of that variant's steps, loss curve included; each of its rows
carries the same delta) and fusedpeft.tuning.entries() (the tuned configs).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from typing import Optional

import torch

from . import harness

MODELS = ["llama3-8b", "llama3.2-1b", "qwen2.5-0.5b", "phi3-mini"]
ADAPTERS = ["lora", "lora-dropout", "ia3", "dora"]
# --variants name -> label in the table
VARIANTS = {"peft": "peft", "from_peft": "fusedpeft (from_peft)", "inject": "fusedpeft (inject)", "floor": "floor"}
CURVE_VARIANTS = ("peft", "from_peft", "inject")
CURVE_BATCHES = 2  # distinct batches in the loss-curve run, cycled (so the loss visibly falls)
# High enough that the loss visibly falls, low enough that it stays well above zero over 20 steps: at
# 1e-3 LoRA memorises the two batches within 10 steps (loss ~0.01), where a relative difference
# measures noise. IA3's vectors need the larger step to move the loss.
CURVE_LR = {"lora": 2e-4, "lora-dropout": 2e-4, "ia3": 1e-2, "dora": 2e-4}
TIMING_LR = 1e-4
ABOVE_FLOOR_MIN = 0.05  # "above floor / peft's" only where peft's step is at least 5% above the floor's


# ----------------------------------------------------------------------------- models and adapters
def family_config(name: str, layers: int, tiny: bool, max_seq: int):
    """The transformers config of one family (random init, built in code)."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    shapes = {  # cls, hidden, intermediate, heads, kv heads, head_dim
        "llama3-8b": (LlamaConfig, 4096, 14336, 32, 8, 128),
        "llama3.2-1b": (LlamaConfig, 2048, 8192, 32, 8, 64),
        "qwen2.5-0.5b": (Qwen2Config, 896, 4864, 14, 2, 64),  # Qwen2 has biases on q/k/v
        "phi3-mini": (Phi3Config, 3072, 8192, 32, 32, 96),  # fused qkv_proj and gate_up_proj
    }
    cls, hidden, inter, heads, kv, head_dim = shapes[name]
    vocab = 32000
    if tiny:
        hidden, inter, heads, kv, head_dim, vocab = 64, 128, 4, 2, 16, 128
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(4096, max_seq),
        tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2, use_cache=False,
    )
    if cls is LlamaConfig:
        kwargs["head_dim"] = head_dim  # Qwen2 and Phi3 take hidden / heads
    return cls(**kwargs)


def build_base(name: str, args, device: torch.device):
    """A fresh random-initialised bf16 causal LM, built directly on the device from args.seed."""
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = family_config(name, args.layers, args.tiny, max(s for _, s in args.batch_shapes))
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", **{dtype_key: torch.bfloat16})
    model.config.use_cache = False
    return model.train()


def ia3_targets(model_name: str) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules): attention k, v (phi3: qkv_proj) and the down projection."""
    attn = ["qkv_proj"] if model_name.startswith("phi3") else ["k_proj", "v_proj"]
    return attn + ["down_proj"], ["down_proj"]


def adapter_fields(adapter: str, model_name: str) -> dict:
    if adapter in ("lora", "lora-dropout", "dora"):
        return dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05 if adapter == "lora-dropout" else 0.0,
                    use_dora=adapter == "dora")
    targets, ff = ia3_targets(model_name)
    return dict(target_modules=targets, feedforward_modules=ff)


def build_variant(variant: str, model_name: str, adapter: str, args, device):
    """The model a variant trains (peft's wrapper or the base itself)."""
    import fusedpeft

    base = build_base(model_name, args, device)
    fields = adapter_fields(adapter, model_name)
    if variant == "floor":
        base.requires_grad_(False)
        base.enable_input_require_grads()
        return base
    if variant == "inject":
        cfg = fusedpeft.LoraConfig(**fields) if adapter != "ia3" else fusedpeft.IA3Config(**fields)
        return fusedpeft.inject(base, cfg)
    import peft

    cls = peft.LoraConfig if adapter != "ia3" else peft.IA3Config
    model = peft.get_peft_model(base, cls(task_type="CAUSAL_LM", **fields))
    return fusedpeft.from_peft(model) if variant == "from_peft" else model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, with peft's wrapper prefix taken off (peft's and fusedpeft's
    parameter names then agree)."""
    prefix = "base_model.model."
    return {n[len(prefix):] if n.startswith(prefix) else n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    # One empty group for the floor: AdamW refuses an empty parameter list, and the step still runs.
    return torch.optim.AdamW(params if params else [{"params": []}], lr=lr)


def train_step(model, opt, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- measurements
def random_batches(shape, count: int, vocab: int, seed: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, shape, generator=gen).to(device) for _ in range(count)]


def time_batch(model, opt, batches, warmup: int, device, resident: int = 0) -> dict:
    """First-step wall time, median step time and peak memory of training on ``batches``
    (warm-up steps first, the rest timed); ``resident``: bytes allocated before the model was
    built, left out of its peak."""
    harness.synchronize(device)
    t0 = time.perf_counter()
    train_step(model, opt, batches[0])
    harness.synchronize(device)
    first_s = time.perf_counter() - t0
    for b in batches[1:warmup]:
        train_step(model, opt, b)
    timed = batches[warmup:]
    cuda = device.type == "cuda"
    if cuda:
        harness.synchronize(device)
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    gc.disable()  # as timeit does: a full collection (0.1-0.3 s with transformers loaded) is no step's cost
    try:
        times = harness.step_times_ms(lambda i: train_step(model, opt, timed[i]), len(timed), cuda=cuda)
    finally:
        gc.enable()
    step_ms = statistics.median(times)
    tokens = batches[0].numel()
    return dict(step_ms=step_ms, tokens_per_s=tokens / (step_ms * 1e-3), first_step_s=first_s,
                peak_gib=(torch.cuda.max_memory_allocated() - resident) / 2**30 if cuda else None)


def time_interleaved(runs: dict, batches, rounds: int, device) -> dict:
    """Median step ms of each variant in ``runs`` ({variant: (model, opt)}) over ``rounds`` turns on
    ``batches`` (each turn one step of every variant, the order rotated by one each turn, gc paused;
    each step timed on its own by harness.step_times_ms: between CUDA events and synchronized, so
    no variant's queued work runs into the next one's time)."""
    cuda = device.type == "cuda"
    order, times = list(runs), {v: [] for v in runs}
    gc.collect()
    gc.disable()
    try:
        for turn in range(rounds):
            batch = batches[turn % len(batches)]
            turn_order = order[turn % len(order):] + order[:turn % len(order)]
            taken = {}
            for v in turn_order:
                model, opt = runs[v]
                taken[v] = harness.step_times_ms(lambda i: train_step(model, opt, batch), 1, cuda=cuda)[0]
            for v, ms in taken.items():
                times[v].append(ms)
    finally:
        gc.enable()
    return {v: statistics.median(t) for v, t in times.items()}


def loss_curve(model, init: dict[str, torch.Tensor], batches, steps: int, lr: float, seed: int) -> list[float]:
    """Train ``steps`` steps from the adapter tensors ``init`` (the base is frozen and built from the
    same seed) with a fresh AdamW, cycling ``batches``; the losses."""
    state = adapter_state(model)
    if set(state) != set(init):
        missing, extra = sorted(set(init) - set(state)), sorted(set(state) - set(init))
        raise ValueError(f"trainable parameters differ from peft's: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for name, p in state.items():
            p.copy_(init[name])
    opt = make_optimizer(model, lr)
    torch.manual_seed(seed + 1)  # dropout masks: the same stream for each variant (peft's and fusedpeft's masks still differ)
    losses = [train_step(model, opt, batches[i % len(batches)]) for i in range(steps)]
    del opt
    return torch.stack(losses).float().tolist()


def counts_delta(before: dict, after: dict) -> dict[str, int]:
    return {f"{op}/{backend}": n - before.get((op, backend), 0) for (op, backend), n in after.items()
            if n != before.get((op, backend), 0)}


def run_variant(variant: str, model_name: str, adapter: str, args, device, data: dict, log) -> list[dict]:
    """Build one variant's model, time it on every batch shape, then run its loss curve from peft's
    initial adapter tensors (``data["init"]``, taken here when the variant is peft)."""
    label = VARIANTS[variant]
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t_build = time.perf_counter()
    model = build_variant(variant, model_name, adapter, args, device)
    build_s = time.perf_counter() - t_build
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, trainable_bytes = sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    if variant == "peft":
        data["init"] = {n: p.detach().clone() for n, p in adapter_state(model).items()}
    rows = []
    opt = make_optimizer(model, TIMING_LR)
    for shape in args.batch_shapes:
        r = time_batch(model, opt, data["timing"][shape], args.warmup_steps, device, resident)
        batch = f"{shape[0]}x{shape[1]}"
        rows.append(dict(model=model_name, batch=batch, adapter=adapter, variant=label, trainable=trainable,
                         trainable_bytes=trainable_bytes, build_s=build_s, **r))
        mem = f"{r['peak_gib']:7.2f} GiB" if r["peak_gib"] is not None else "-"
        log(f"{model_name:13s} {batch:7s} {adapter:12s} {label:22s} {r['tokens_per_s']:10.0f} tok/s  "
            f"step {r['step_ms']:8.2f} ms  first {r['first_step_s']:6.2f} s  {mem}")
    if args.curve_steps and variant in CURVE_VARIANTS and "init" in data:
        try:
            data["curves"][variant] = loss_curve(model, data["init"], data["curve"], args.curve_steps, CURVE_LR[adapter], args.seed)
        except Exception as exc:  # a failed check, not a crash of the whole run
            data["curves"][variant] = f"{type(exc).__name__}: {exc}"
    if args.rounds:
        data["runs"][variant] = (model, opt)  # kept for the interleaved turns (the curve left other weights: timing only)
    return rows


def run_case(model_name: str, adapter: str, args, device, log) -> tuple[list[dict], list[dict], list[dict]]:
    """Every variant of one (model, adapter): timing rows, loss-curve comparisons, and errors (a
    variant that raised is logged and reported, and the run goes on with the next)."""
    import fusedpeft

    vocab = family_config(model_name, 1, args.tiny, 1).vocab_size
    steps = args.warmup_steps + args.timed_steps
    data = dict(
        timing={shape: random_batches(shape, steps, vocab, args.seed + i, device) for i, shape in enumerate(args.batch_shapes)},
        curve=random_batches(args.curve_shape, CURVE_BATCHES, vocab, args.seed + 100, device),
        curves={},
        runs={},
    )
    rows, errors = [], []
    for variant in args.variant_keys:
        counts_before = fusedpeft.backend_counts()
        try:
            new = run_variant(variant, model_name, adapter, args, device, data, log)
        except Exception as exc:
            log(traceback.format_exc())
            errors.append(dict(model=model_name, adapter=adapter, variant=VARIANTS[variant], error=f"{type(exc).__name__}: {exc}"))
            new = []
        delta = counts_delta(counts_before, fusedpeft.backend_counts())  # which backends ran, how often
        for row in new:
            row["backend_counts"] = delta
        rows += new
        if not args.rounds:
            harness.release(device)
    if args.rounds and len(data["runs"]) > 0:
        for shape in args.batch_shapes:
            batch = f"{shape[0]}x{shape[1]}"
            medians = time_interleaved(data["runs"], data["timing"][shape], args.rounds * args.timed_steps, device)
            by_label = {VARIANTS[v]: ms for v, ms in medians.items()}
            for row in rows:
                if row["batch"] == batch and row["variant"] in by_label:
                    row["step_ms_alone"] = row["step_ms"]
                    row["step_ms"] = by_label[row["variant"]]
                    row["tokens_per_s"] = shape[0] * shape[1] / (row["step_ms"] * 1e-3)
            log(f"{model_name:13s} {batch:7s} {adapter:12s} interleaved ms: "
                + ", ".join(f"{VARIANTS[v]} {ms:.2f}" for v, ms in medians.items()))
        data["runs"].clear()
        harness.release(device)
    return rows, compare_curves(model_name, adapter, data["curves"], args), errors


def compare_curves(model_name: str, adapter: str, curves: dict, args) -> list[dict]:
    """max_t |loss_peft - loss_variant| / loss_peft for each fused variant, against the tolerance."""
    ref = curves.get("peft")
    tol = 5e-2 if adapter == "lora-dropout" else 2e-2
    out = []
    for variant in ("from_peft", "inject"):
        if variant not in curves or ref is None:
            continue
        losses, rel, error = curves[variant], float("nan"), None
        if not isinstance(ref, list):
            error = f"peft's run: {ref}"
        elif not isinstance(losses, list):
            error = losses
        else:
            rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, losses))
        ok = math.isfinite(rel) and rel <= tol  # NaN losses fail too
        out.append(dict(model=model_name, adapter=adapter, variant=VARIANTS[variant], batch=f"{args.curve_shape[0]}x{args.curve_shape[1]}",
                        steps=args.curve_steps, lr=CURVE_LR[adapter], max_rel_diff=rel, tol=tol, ok=ok, error=error,
                        loss_peft=ref if isinstance(ref, list) else None, loss=losses if isinstance(losses, list) else None))
    return out


# ----------------------------------------------------------------------------- report
def add_ratios(rows: list[dict]):
    """Each row's ratios to the peft row of its (model, batch, adapter): speed_vs_peft (tokens/s),
    mem_vs_peft, and above_floor_vs_peft = (t - t_floor) / (t_peft - t_floor). The last is None
    where peft's step is less than ABOVE_FLOOR_MIN above the floor's: the ratio of two differences
    within the noise of host-bound steps means nothing.

    mem_bound_vs_peft: the least peak any implementation of the same adapters can have, over peft's:
    the floor's peak (the same base, nothing trainable) plus the trainable tensors and AdamW's two
    moments of them (3 x their bytes), which every variant holds throughout (their gradients, not
    all alive at the floor's peak, are left out: a lower bound). Where the floor is most of the peak
    (small batches) it says how far a memory target can be met at all."""
    index = {(r["model"], r["batch"], r["adapter"], r["variant"]): r for r in rows}
    for r in rows:
        key = (r["model"], r["batch"], r["adapter"])
        peft_row, floor = index.get(key + ("peft",)), index.get(key + ("floor",))
        r["speed_vs_peft"] = r["mem_vs_peft"] = r["above_floor_vs_peft"] = r["mem_bound_vs_peft"] = None
        if not peft_row:
            continue
        r["speed_vs_peft"] = r["tokens_per_s"] / peft_row["tokens_per_s"]
        if r["peak_gib"] is not None:
            r["mem_vs_peft"] = r["peak_gib"] / peft_row["peak_gib"]
        if floor and r["variant"] != "floor" and peft_row["step_ms"] > floor["step_ms"] * (1 + ABOVE_FLOOR_MIN):
            r["above_floor_vs_peft"] = (r["step_ms"] - floor["step_ms"]) / (peft_row["step_ms"] - floor["step_ms"])
        if floor and r["variant"] != "floor" and floor["peak_gib"] is not None and peft_row["peak_gib"]:
            bound_gib = floor["peak_gib"] + 3 * peft_row["trainable_bytes"] / 2**30
            r["mem_bound_vs_peft"] = bound_gib / peft_row["peak_gib"]


def table(rows: list[dict]) -> str:
    """One block per (model, batch, adapter), the variants in a fixed order."""
    head = ("| model | batch | adapter | variant | tokens/s | tokens/s / peft | step ms | first step s | peak GiB | "
            "mem / peft | least mem / peft | above floor / peft's |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    batches, variants = list(dict.fromkeys(r["batch"] for r in rows)), list(VARIANTS.values())

    def key(r):
        return (MODELS.index(r["model"]), batches.index(r["batch"]), ADAPTERS.index(r["adapter"]), variants.index(r["variant"]))

    for r in sorted(rows, key=key):
        lines.append(f"| {r['model']} | {r['batch']} | {r['adapter']} | {r['variant']} | {r['tokens_per_s']:.0f} | "
                     f"{harness.fmt(r['speed_vs_peft'], '.3f')} | {r['step_ms']:.2f} | {r['first_step_s']:.2f} | "
                     f"{harness.fmt(r['peak_gib'], '.2f')} | {harness.fmt(r['mem_vs_peft'], '.3f')} | "
                     f"{harness.fmt(r['mem_bound_vs_peft'], '.3f')} | {harness.fmt(r['above_floor_vs_peft'], '.3f')} |")
    return "\n".join(lines)


def curve_table(curves: list[dict]) -> str:
    lines = ["| model | adapter | variant | batch | steps | lr | loss peft start -> end | loss start -> end | max rel diff | tol | check |",
             "|---|---|---|---|---:|---:|---|---|---:|---:|---|"]
    for c in curves:
        ref, losses = c["loss_peft"], c["loss"]
        theirs = f"{ref[0]:.4f} -> {ref[-1]:.4f}" if ref else c["error"]
        ours = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else c["error"]
        lines.append(f"| {c['model']} | {c['adapter']} | {c['variant']} | {c['batch']} | {c['steps']} | {c['lr']:g} | "
                     f"{theirs} | {ours} | {harness.fmt(c['max_rel_diff'], '.2e')} | {c['tol']:g} | "
                     f"{'ok' if c['ok'] else '**FAIL**'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str):
    index = {(r["model"], r["batch"], r["adapter"], r["variant"]): r for r in rows}
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    groups = sorted({(r["model"], r["batch"], r["adapter"]) for r in rows if (r["model"], r["batch"], r["adapter"], "peft") in index},
                    key=lambda g: (MODELS.index(g[0]), batches.index(g[1]), ADAPTERS.index(g[2])))  # the table's order
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "peft"]
    if not groups or not variants:
        return
    fig, ax = harness.pyplot().subplots(figsize=(max(8, 0.9 * len(groups)), 5))
    harness.ratio_bars(ax, groups, variants,
                       lambda g, v: index[g + (v,)]["tokens_per_s"] / index[g + ("peft",)]["tokens_per_s"] if g + (v,) in index else None,
                       "tokens/s / peft's", labels=[" ".join(g) for g in groups])
    ax.set_title(title, fontsize=8)
    harness.save_figure(fig, path)


def environment(device: torch.device) -> str:
    import transformers

    return f"{harness.environment(device.type)}, transformers {transformers.__version__}"


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    parser.add_argument("--batches", default="4x2048,1x512", help="batch x seq, comma-separated")
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help=f"comma list of {ADAPTERS}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3, help="at least 1; the first one is 'first step s'")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved turns per timed step after the variants' own "
                        "passes, whose median is the step time (0: each variant's own pass, one model built at a time)")
    parser.add_argument("--curve-steps", type=int, default=20, help="loss-curve check steps (0: skip)")
    parser.add_argument("--curve-batch", default=None, help="batch x seq of the loss-curve run (default: the smallest of --batches)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8, 2 with --tiny)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (hidden 64, 2 layers, vocab 128) for CPU tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 when a loss curve is off peft's by more than the tolerance "
                        "(a variant that raises always gives exit 1)")
    parser.add_argument("--out", default=None, help="write the Markdown tables here")
    parser.add_argument("--plot", default=None, help="write a PNG of tokens/s relative to peft here")
    parser.add_argument("--json", default=None, help="write rows, loss curves, backend counts and tuning entries here")
    args = parser.parse_args(argv)

    def names(text, allowed, what):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            parser.error(f"--{what}: unknown {bad}, choose from {list(allowed)}")
        return items

    def shape(text):
        b, s = (int(v) for v in text.lower().split("x"))
        return (b, s)

    args.model_names = names(args.models, MODELS, "models")
    args.adapter_names = names(args.adapters, ADAPTERS, "adapters")
    chosen = names(args.variants, VARIANTS, "variants")
    args.variant_keys = [v for v in VARIANTS if v in chosen]  # peft first: the others compare to it
    args.batch_shapes = [shape(s) for s in args.batches.split(",") if s.strip()]
    args.curve_shape = shape(args.curve_batch) if args.curve_batch else min(args.batch_shapes, key=lambda s: s[0] * s[1])
    if args.layers is None:
        args.layers = 2 if args.tiny else 8
    if args.warmup_steps < 1 or args.timed_steps < 1:
        parser.error("--warmup-steps and --timed-steps must be at least 1")
    if args.rounds < 0:
        parser.error("--rounds must be at least 0")
    return args


def main(argv=None, log=print) -> dict:
    """Run the benchmark; returns the report (what --json writes) with "status": 1 when a variant
    raised, or with --check when a loss curve is off peft's; else 0."""
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    log(env)
    rows, curves, errors = [], [], []
    cases = [(m, a) for m in args.model_names for a in args.adapter_names]
    with warnings.catch_warnings():
        # peft calls transformers 5's deprecated is_gradient_checkpointing once per model: noise here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for done, (model_name, adapter) in enumerate(cases, 1):
            r, c, e = run_case(model_name, adapter, args, device, log)
            rows += r
            curves += c
            errors += e
            if done < len(cases):  # a run stopped by a time limit keeps the cases it finished
                write_report(args, env, rows, curves, errors, f"{done} of {len(cases)} (model, adapter) cases")
    return write_report(args, env, rows, curves, errors, None, log=log)


def write_report(args, env: str, rows: list, curves: list, errors: list, partial: Optional[str], log=None) -> dict:
    """The report of the rows so far, to --out and --json (and, when complete, --plot and the log);
    ``partial``: how much of the run it holds, or None for the whole run."""
    import fusedpeft
    from fusedpeft import tuning

    add_ratios(rows)
    layers = f"{args.layers} layers" + (", tiny" if args.tiny else "")
    timing = (f"median of {args.rounds * args.timed_steps} interleaved steps per variant" if args.rounds
              else f"{args.timed_steps} timed steps after {args.warmup_steps} warm-up")
    md = f"{env}, bf16, {layers}, {timing}\n\n"
    if partial:
        md += f"**Partial: {partial} so far.**\n\n"
    md += f"{table(rows)}\n"
    if curves:
        md += f"\nLoss curves from the same initial weights ({args.curve_steps} steps, {CURVE_BATCHES} batches cycled):\n\n{curve_table(curves)}\n"
    if errors:
        md += "\nVariants that raised (traceback above in the log):\n\n" + "\n".join(
            f"- {e['model']} / {e['adapter']} / {e['variant']}: {e['error']}" for e in errors) + "\n"
    failed = [c for c in curves if not c["ok"]]
    if log is not None:
        log(md)
        if failed:
            log(f"loss-curve check FAILED for {len(failed)} of {len(curves)}: " + ", ".join(f"{c['model']}/{c['adapter']}/{c['variant']}" for c in failed))
    report = dict(environment=env, args={k: v for k, v in vars(args).items()}, rows=rows, curves=curves, errors=errors,
                  backend_counts_total={f"{op}/{b}": n for (op, b), n in fusedpeft.backend_counts().items()},
                  tuning_entries=tuning.entries(), partial=partial,
                  status=1 if errors or (args.check and failed) else 0)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.plot and not partial:
        plot(rows, args.plot, f"training step, tokens/s relative to peft; {env}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    sys.exit(main()["status"])
