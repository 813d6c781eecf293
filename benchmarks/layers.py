"""The layer table: every distinct linear layer of four model families, at training token counts,
fusedpeft's module against the cuBLAS base layer, HF peft's own layer and the plain torch
composition a user would write, on the same inputs in one run.

    python -m benchmarks.layers                                   # LoRA, all four families: 136 groups, 816 cases
    python -m benchmarks.layers --models llama3-8b --tokens 8192 --ranks 16 --out t.md --plot t.png --json t.json
    python -m benchmarks.layers --methods ia3,ssf                 # IA3 (output and feedforward) and SSF
    python -m benchmarks.layers --methods dora                    # DoRA: ours, peft's use_dora layer, the paper's formula
    python -m benchmarks.layers --shapes 4096x4096x1024,4096x896x128+b   # explicit MxKxN (+b: with bias)
    python -m benchmarks.layers --device cpu                      # smoke run of the code paths, tiny shapes

Shapes (in_features K -> out_features N; "x2" where a block has two such layers):

    llama3-8b      q/o 4096->4096 x2, k/v 4096->1024 x2, gate/up 4096->14336 x2, down 14336->4096
    llama3.2-1b    q/o 2048->2048 x2, k/v 2048->512 x2, gate/up 2048->8192 x2, down 8192->2048
    qwen2.5-0.5b   q 896->896 +bias, o 896->896, k/v 896->128 +bias x2, gate/up 896->4864 x2, down 4864->896
    phi3-mini      qkv 3072->9216, o 3072->3072, gate_up 3072->16384, down 8192->3072

at M tokens (--tokens, default 2048,8192), x of shape (M, K).

LoRA variants of each group (rank r from --ranks, dropout p from --dropouts, lora_alpha = 2r, so
scaling 2), all on the same random x (requires grad), frozen W (and bias), and random A and B (B
never zero):

- "base (cuBLAS)": F.linear(x, W, b), the floor;
- "fusedpeft": fusedpeft.LoraLinear(nn.Linear, r, lora_alpha=2r, lora_dropout=p) in train mode,
  the module as users get it: float32 adapters beside the base (autocast_adapter_dtype=True),
  the backend chosen automatically. The "path" column is fusedpeft.last_backend() after a call;
- "fusedpeft [triton]", "fusedpeft [cublas]", "fusedpeft [cublas_after]", "fusedpeft
  [cublas_autograd]" (at dropout 0): the same module under use_backend(...). A backend
  that is not registered, or cannot take the inputs, is skipped with a note when the cases are made;
- "peft": peft.tuners.lora.Linear on the same nn.Linear, train mode, its default float32 adapters
  (cast as peft.get_peft_model casts them);
- "torch composition": F.linear(x, W, b) + s * F.linear(F.linear(F.dropout(x, p), A), B) with A, B
  trainable in the compute dtype (the dropout call left out at p = 0, as peft's nn.Identity does);
- "torch composition, float32 adapters" (LoRA): the same with A, B float32 leaves cast to the compute
  dtype in the forward, the like-for-like composition for fusedpeft's and peft's float32 adapters
  (at host-bound shapes the four casts are launches the bf16 composition does not make).

IA3 / SSF (--methods ia3,ssf; ranks and dropouts do not apply: one group per shape and M, "ia3"
gives two, ia3-out and ia3-ff): base; fusedpeft.IA3Linear(is_feedforward=False/True) /
fusedpeft.SSFLinear with scales 1 + 0.1 randn (and SSF shift 0.1 randn), automatic and under
use_backend("triton") / ("torch"); peft.tuners.ia3.Linear (no SSF in peft); the torch composition
F.linear(x, W, b) * l, F.linear(x * l, W, b), F.linear(x, W, b) * scale + shift.

"train" is one training step: forward + backward with grad_x (x requires grad) and the adapter
gradients, the base frozen (harness.step_fn), the backward on the calling thread as it runs inside a
model's one backward (--backward-thread engine: on autograd's device thread, which adds the hand-off
to that thread to every step; tables before 2026-12-05's fifth sitting were timed so). "fwd" is the
forward alone as in training, with
autograd on (what it saves is saved), without the backward, as benchmarks/lora.py times it. Memory
is the peak one training step allocates above what was live before it. The summary at the end
counts, per (M, config), the groups where fusedpeft's step is slower than peft's or than the torch
composition, the worst ratios, the time-weighted Llama-3-8B block (q, k, v, o, gate, up, down once
each), and the targets at M = 8192, r = 16.

Run time (H200, fresh machine, the defaults): about 0.7 s per case to measure, plus the first calls
at each new shape key (fusedpeft's path tuning and Triton compiles, 15-60 s at the first shape,
seconds later; fusedpeft keeps its choices on disk): llama3.2-1b at one M, 96 cases, took 225 s.
The whole LoRA table is over 10 minutes: split it by --models / --tokens where runs are capped.
At M = 2048 and layers up to 2048 wide the base's step is ~0.1 ms and every adapter variant is
host-bound: do_bench times each call on its own (L2 flushed between calls), so those rows compare
the host's cost per call more than the GPU's.

--device cpu runs the tiny shapes 16x32x24 and 16x48x40+b at r = 4 (unless --shapes / --ranks)
with perf_counter timings, no memory, and without the forced triton / cublas variants (which would
run in Triton's interpreter) unless --forced-on-cpu."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import harness

BASE = "base (cuBLAS)"
OURS = "fusedpeft"
PEFT = "peft"
COMPOSITION = "torch composition"
# The same composition with float32 adapters cast in the forward, as a peft model (and fusedpeft's
# module) holds them beside a bf16 base: two casts forward and two back, which the bf16 one lacks.
COMPOSITION_FLOAT32 = "torch composition, float32 adapters"
COMPARE = [PEFT, COMPOSITION, COMPOSITION_FLOAT32]


@dataclasses.dataclass(frozen=True)
class Shape:
    family: str
    layers: str  # layer names, e.g. "k/v"
    K: int  # in_features
    N: int  # out_features
    bias: bool = False
    count: int = 1  # layers of this shape in one decoder block

    @property
    def label(self) -> str:
        return f"{self.family} {self.layers} {self.K}->{self.N}" + (" +bias" if self.bias else "")


MODELS = {
    "llama3-8b": [Shape("llama3-8b", "q/o", 4096, 4096, count=2), Shape("llama3-8b", "k/v", 4096, 1024, count=2),
                  Shape("llama3-8b", "gate/up", 4096, 14336, count=2), Shape("llama3-8b", "down", 14336, 4096)],
    "llama3.2-1b": [Shape("llama3.2-1b", "q/o", 2048, 2048, count=2), Shape("llama3.2-1b", "k/v", 2048, 512, count=2),
                    Shape("llama3.2-1b", "gate/up", 2048, 8192, count=2), Shape("llama3.2-1b", "down", 8192, 2048)],
    "qwen2.5-0.5b": [Shape("qwen2.5-0.5b", "q", 896, 896, bias=True), Shape("qwen2.5-0.5b", "o", 896, 896),
                     Shape("qwen2.5-0.5b", "k/v", 896, 128, bias=True, count=2),
                     Shape("qwen2.5-0.5b", "gate/up", 896, 4864, count=2), Shape("qwen2.5-0.5b", "down", 4864, 896)],
    "phi3-mini": [Shape("phi3-mini", "qkv", 3072, 9216), Shape("phi3-mini", "o", 3072, 3072),
                  Shape("phi3-mini", "gate_up", 3072, 16384), Shape("phi3-mini", "down", 8192, 3072)],
}
BLOCK_FAMILY = "llama3-8b"  # the weighted block of the summary
CPU_SHAPES = "16x32x24,16x48x40+b"
CPU_RANKS = "4"
OPS = {"lora": "lora_linear", "dora": "dora_linear", "ia3-out": "ia3_linear", "ia3-ff": "ia3_linear",
       "ssf": "ssf_linear"}
RANKED = ("lora", "dora")  # the methods with a rank and a dropout


@dataclasses.dataclass(frozen=True)
class Group:
    shape: Shape
    M: int
    method: str  # "lora", "dora", "ia3-out", "ia3-ff", "ssf"
    r: Optional[int] = None
    p: Optional[float] = None

    @property
    def config(self) -> str:
        if self.method in RANKED:
            return f"{'dora ' if self.method == 'dora' else ''}r={self.r} p={self.p:g}"
        return self.method

    @property
    def label(self) -> str:
        return f"{self.shape.label} M={self.M} {self.config}"


# ----------------------------------------------------------------------------- inputs
def _gen(group: Group, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(group.label.encode()))  # every variant of a group: the same tensors
    return gen


def _randn(gen, *shape, device, dtype=torch.float32, std=1.0, mean=0.0):
    t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
    return (t * std + mean).to(dtype)


def _base_inputs(group: Group, gen, device, dtype):
    M, K, N = group.M, group.shape.K, group.shape.N
    x = _randn(gen, M, K, device=device, dtype=dtype).requires_grad_()
    W = _randn(gen, N, K, device=device, dtype=dtype, std=K**-0.5)
    b = _randn(gen, N, device=device, dtype=dtype, std=0.1) if group.shape.bias else None
    g = _randn(gen, M, N, device=device, dtype=dtype)
    return x, W, b, g


def _lora_inputs(group: Group, device, dtype):
    gen = _gen(group, device)
    x, W, b, g = _base_inputs(group, gen, device, dtype)
    A = _randn(gen, group.r, group.shape.K, device=device, std=group.shape.K**-0.5)  # float32
    B = _randn(gen, group.shape.N, group.r, device=device, std=group.r**-0.5)
    return x, W, b, A, B, g


def _rescale_inputs(group: Group, device, dtype):
    gen = _gen(group, device)
    x, W, b, g = _base_inputs(group, gen, device, dtype)
    size = group.shape.K if group.method == "ia3-ff" else group.shape.N
    scale = _randn(gen, size, device=device, std=0.1, mean=1.0)  # float32, never the identity
    shift = _randn(gen, group.shape.N, device=device, std=0.1) if group.method == "ssf" else None
    return x, W, b, scale, shift, g


def _frozen_linear(W, b) -> nn.Linear:
    """An nn.Linear holding W (and b), frozen, without running its init."""
    N, K = W.shape
    lin = torch.nn.utils.skip_init(nn.Linear, K, N, bias=b is not None, device=W.device, dtype=W.dtype)
    lin.weight = nn.Parameter(W, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


def _trainable(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def _under(backend: Optional[str], fn):
    if backend is None:
        return fn
    import fusedpeft

    def run():
        with fusedpeft.use_backend(backend):
            return fn()

    return run


def _peft_float32(layer: nn.Module):
    """peft's default: float32 adapters beside a bf16 / fp16 base (what get_peft_model does with
    autocast_adapter_dtype=True; a layer built directly takes the base's dtype)."""
    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype

        cast_adapter_dtype(layer, "default", autocast_adapter_dtype=True)
    except ImportError:  # older peft: the same cast by hand
        for name in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, name)
            for key in list(container.keys()):
                item = container[key]
                if isinstance(item, nn.Parameter) and item.dtype in (torch.float16, torch.bfloat16):
                    container[key] = nn.Parameter(item.detach().float())
                elif isinstance(item, nn.Module):
                    item.float()
    return layer


def _peft_lora_layer(lin, r, p, use_dora=False):
    import peft
    from peft.tuners import lora

    if "config" in inspect.signature(lora.Linear.__init__).parameters:  # peft >= 0.17 or so
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False, use_dora=use_dora)
        return lora.Linear(lin, "default", config=config, r=r, lora_alpha=2 * r)
    return lora.Linear(lin, "default", r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False,
                       use_dora=use_dora)


def _peft_ia3_layer(lin, feedforward):
    import peft
    from peft.tuners import ia3

    if "config" in inspect.signature(ia3.Linear.__init__).parameters:
        return ia3.Linear(lin, "default", config=peft.IA3Config(), is_feedforward=feedforward)
    return ia3.Linear(lin, "default", is_feedforward=feedforward)


# ----------------------------------------------------------------------------- cases
_NOTES: dict = {}


def _forced_reason(op: str, backend: str, device, dtype) -> Optional[str]:
    """None when ``backend`` is registered for ``op`` and accepts tensors of this device and dtype
    (asked through backends.select under use_backend, as a call would ask), else why not."""
    import fusedpeft
    from fusedpeft import backends

    if backend not in backends.registered(op):
        return f"{op} has no {backend!r} backend (registered: {backends.registered(op)})"
    probe = torch.empty(2, 2, device=device, dtype=dtype)
    try:
        with fusedpeft.use_backend(backend):
            backends.select(op, probe, probe)
    except RuntimeError as exc:
        return str(exc)
    return None


def _forced_variants(op: str, names, device, dtype, args) -> list[str]:
    """The forced backends of ``names`` this run can time; a printed note for each skipped one."""
    out = []
    for name in names:
        key = (op, name, str(device), dtype)
        if key not in _NOTES:
            if str(device) == "cpu" and name != "torch" and not args.forced_on_cpu:
                reason = "CPU run: it would run in Triton's interpreter (--forced-on-cpu times it)"
            else:
                reason = _forced_reason(op, name, device, dtype)
            _NOTES[key] = reason
            if reason:
                print(f"note: skipping 'fusedpeft [{name}]' for {op}: {reason}", file=sys.stderr)
        if _NOTES[key] is None:
            out.append(name)
    return out


def _path(op: str):
    import fusedpeft

    return lambda: fusedpeft.last_backend(op)


def _module_step(m: nn.Module, x, g, backend: Optional[str] = None):
    """(forward, training step) of an adapter module in train mode, under ``backend`` if named."""
    m.train()
    fwd = _under(backend, lambda: m(x))
    return fwd, harness.step_fn(fwd, g, [x] + _trainable(m))


def _base_case(inputs, group: Group, device, dtype):
    """The floor of every group: the cuBLAS base layer on the group's inputs."""

    def make():
        x, W, b, _, _, g = inputs(group, device, dtype)
        fwd = lambda: F.linear(x, W, b)
        return fwd, harness.step_fn(fwd, g, [x])

    return make


def lora_cases(group: Group, device, dtype, with_peft: bool, args) -> list[harness.Case]:
    import fusedpeft

    M, K, N, r, p = group.M, group.shape.K, group.shape.N, group.r, group.p
    label, s = group.label, 2.0
    dora = group.method == "dora"
    base_flops = 2.0 * M * N * K
    flops = base_flops + 2.0 * M * K * r + 2.0 * M * N * r

    base = _base_case(_lora_inputs, group, device, dtype)

    def ours(backend):
        def make():
            from fusedpeft.modules.dora import DoraVariant

            x, W, b, A, B, g = _lora_inputs(group, device, dtype)
            m = fusedpeft.LoraLinear(_frozen_linear(W, b), r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False,
                                     variant=DoraVariant if dora else None)
            with torch.no_grad():
                m.lora_A["default"].weight.copy_(A)
                m.lora_B["default"].weight.copy_(B)
            return _module_step(m, x, g, backend)

        return make

    def peft_layer():
        x, W, b, A, B, g = _lora_inputs(group, device, dtype)
        m = _peft_float32(_peft_lora_layer(_frozen_linear(W, b), r, p, use_dora=dora))
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(A)
            m.lora_B["default"].weight.copy_(B)
        return _module_step(m, x, g)

    def composition():
        x, W, b, A, B, g = _lora_inputs(group, device, dtype)
        A, B = A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()
        if dora:  # DoRA as a user writes it from the paper: the merged weight's row norms, then the rescale
            m = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach().requires_grad_()

            def fwd():
                x_d = F.dropout(x, p, training=True) if p > 0 else x
                c = m / torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
                out = F.linear(x, W) + (c - 1) * F.linear(x_d, W) + c * s * F.linear(F.linear(x_d, A), B)
                return out if b is None else out + b

            return fwd, harness.step_fn(fwd, g, [x, A, B, m])
        return _lora_composition_step(x, W, b, A, B, g, p, s)

    def composition_float32_adapters():
        x, W, b, A, B, g = _lora_inputs(group, device, dtype)
        A, B = A.float().requires_grad_(), B.float().requires_grad_()
        return _lora_composition_step(x, W, b, A, B, g, p, s)

    op = OPS[group.method]
    out = [harness.Case(label, BASE, base, flops=base_flops, path="cuBLAS"),
           harness.Case(label, OURS, ours(None), flops=flops, path=_path(op))]
    # cublas_autograd only without dropout: with it, it runs cublas_after's Function.
    forced = (["triton", "cublas"] if dora else ["triton", "cublas", "cublas_after"]) + (["cublas_autograd"] if p == 0 else [])
    for name in _forced_variants(op, forced, device, dtype, args):
        out.append(harness.Case(label, f"{OURS} [{name}]", ours(name), flops=flops, path=_path(op)))
    if args.auto_again:  # the automatic choice once more, last: shows whether its place in the run matters
        out.append(harness.Case(label, f"{OURS} (again)", ours(None), flops=flops, path=_path(op)))
    if with_peft:
        out.append(harness.Case(label, PEFT, peft_layer, flops=flops, path="peft"))
    out.append(harness.Case(label, COMPOSITION, composition, flops=flops, path="torch"))
    if not dora:
        out.append(harness.Case(label, COMPOSITION_FLOAT32, composition_float32_adapters, flops=flops, path="torch"))
    return out


def _lora_composition_step(x, W, b, A, B, g, p, s):
    """(forward, training step) of the plain LoRA composition on these leaves; adapters of another
    dtype than x are cast to it in the forward (autograd casts their gradients back)."""
    def low_rank(t):
        return F.linear(F.linear(t, A.to(x.dtype)), B.to(x.dtype))

    if p > 0:
        fwd = lambda: F.linear(x, W, b) + s * low_rank(F.dropout(x, p, training=True))
    else:
        fwd = lambda: F.linear(x, W, b) + s * low_rank(x)
    return fwd, harness.step_fn(fwd, g, [x, A, B])


def rescale_cases(group: Group, device, dtype, with_peft: bool, args) -> list[harness.Case]:
    import fusedpeft

    method, label = group.method, group.label
    ff = method == "ia3-ff"
    flops = 2.0 * group.M * group.shape.N * group.shape.K

    base = _base_case(_rescale_inputs, group, device, dtype)

    def ours(backend):
        def make():
            x, W, b, scale, shift, g = _rescale_inputs(group, device, dtype)
            if method == "ssf":
                m = fusedpeft.SSFLinear(_frozen_linear(W, b))
                with torch.no_grad():
                    m.ssf_scale["default"].copy_(scale)
                    m.ssf_shift["default"].copy_(shift)
            else:
                m = fusedpeft.IA3Linear(_frozen_linear(W, b), is_feedforward=ff)
                with torch.no_grad():
                    m.ia3_l["default"].copy_(scale.reshape(m.ia3_l["default"].shape))
            return _module_step(m, x, g, backend)

        return make

    def peft_layer():
        x, W, b, scale, _, g = _rescale_inputs(group, device, dtype)
        m = _peft_float32(_peft_ia3_layer(_frozen_linear(W, b), ff))
        with torch.no_grad():
            m.ia3_l["default"].copy_(scale.reshape(m.ia3_l["default"].shape))
        return _module_step(m, x, g)

    def composition():
        x, W, b, scale, shift, g = _rescale_inputs(group, device, dtype)
        l = scale.to(dtype).requires_grad_()
        params = [x, l]
        if method == "ssf":
            t = shift.to(dtype).requires_grad_()
            params.append(t)
            fwd = lambda: F.linear(x, W, b) * l + t
        elif ff:
            fwd = lambda: F.linear(x * l, W, b)
        else:
            fwd = lambda: F.linear(x, W, b) * l
        return fwd, harness.step_fn(fwd, g, params)

    op = OPS[method]
    out = [harness.Case(label, BASE, base, flops=flops, path="cuBLAS"),
           harness.Case(label, OURS, ours(None), flops=flops, path=_path(op))]
    for name in _forced_variants(op, ["triton", "torch"], device, dtype, args):
        out.append(harness.Case(label, f"{OURS} [{name}]", ours(name), flops=flops, path=_path(op)))
    if args.auto_again:  # the automatic choice once more, last: shows whether its place in the run matters
        out.append(harness.Case(label, f"{OURS} (again)", ours(None), flops=flops, path=_path(op)))
    if with_peft and method != "ssf":
        out.append(harness.Case(label, PEFT, peft_layer, flops=flops, path="peft"))
    out.append(harness.Case(label, COMPOSITION, composition, flops=flops, path="torch"))
    return out


# ----------------------------------------------------------------------------- groups
def _parse_shapes(text: str) -> list[tuple[int, Shape]]:
    """"MxKxN[+b],..." -> [(M, Shape)]; "+b" gives the layer a bias."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        bias = item.endswith("+b")
        M, K, N = (int(v) for v in item.removesuffix("+b").split("x"))
        out.append((M, Shape("custom", "linear", K, N, bias=bias)))
    return out


def groups_of(args) -> list[Group]:
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    else:
        tokens = [int(t) for t in args.tokens.split(",")]
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
        shapes = [(M, s) for M in tokens for m in models for s in MODELS[m]]
    methods = []
    for m in (m.strip() for m in args.methods.split(",")):
        if m not in ("lora", "dora", "ia3", "ssf"):
            raise SystemExit(f"unknown method {m!r}; choose from lora, dora, ia3, ssf")
        methods += ["ia3-out", "ia3-ff"] if m == "ia3" else [m]
    ranks = [int(r) for r in args.ranks.split(",")]
    dropouts = [float(p) for p in args.dropouts.split(",")]
    groups = []
    for method in methods:
        for M, shape in shapes:
            if method in RANKED:
                groups += [Group(shape, M, method, r, p) for r in ranks for p in dropouts]
            else:
                groups.append(Group(shape, M, method))
    return groups


def cases_of(groups: list[Group], device, dtype, with_peft: bool, args) -> list[harness.Case]:
    cases = []
    for group in groups:
        make = lora_cases if group.method in RANKED else rescale_cases
        cases += make(group, device, dtype, with_peft, args)
    return cases


# ----------------------------------------------------------------------------- summary
def summary(results: list[harness.Result], groups: list[Group]) -> str:
    index = {(r.group, r.variant): r for r in results}
    by_key: dict = {}
    for g in groups:
        by_key.setdefault((g.M, g.config), []).append(g)
    lines = ["## Summary", "",
             f"Per (M, config): groups where {OURS}'s training step is slower than each of {', '.join(COMPARE)}, "
             "and the worst train ratios (group in brackets).", "",
             "| M | config | groups | " + " | ".join(f"slower than {v} | worst train / {v}" for v in COMPARE) + " |",
             "|---:|---|---:|" + "---:|---|" * len(COMPARE)]
    for (M, config), gs in by_key.items():
        cells = []
        for other in COMPARE:
            ratios = [(harness.ratio(index[(g.label, OURS)].train_ms, index[(g.label, other)].train_ms), g) for g in gs
                      if (g.label, OURS) in index and (g.label, other) in index]
            if not ratios:
                cells += ["-", "-"]
                continue
            worst, wg = max(ratios, key=lambda t: t[0])
            cells += [f"{sum(1 for v, _ in ratios if v > 1)} / {len(ratios)}", f"{worst:.3f} ({wg.shape.label})"]
        lines.append(f"| {M} | {config} | {len(gs)} | " + " | ".join(cells) + " |")

    # The Llama-3-8B block: each linear layer once (q, k, v, o, gate, up, down), time-weighted.
    block = {k: [g for g in gs if g.shape.family == BLOCK_FAMILY] for k, gs in by_key.items()}
    block = {k: gs for k, gs in block.items() if len(gs) == len(MODELS[BLOCK_FAMILY])}
    if block:
        lines += ["", f"{BLOCK_FAMILY} block (linear layers only: q, k, v, o, gate, up, down once each), "
                      "sum of times / sum of the base's times:", "",
                  "| M | config | " + " | ".join(f"{v} train / base" for v in [OURS] + COMPARE) + " | "
                  + " | ".join(f"{v} fwd / base" for v in [OURS] + COMPARE) + " |",
                  "|---:|---|" + "---:|" * (2 * (1 + len(COMPARE)))]
        for (M, config), gs in block.items():
            cells = []
            for attr in ("train_ms", "fwd_ms"):
                for v in [OURS] + COMPARE:
                    if all((g.label, v) in index and (g.label, BASE) in index for g in gs):
                        num = sum(g.shape.count * getattr(index[(g.label, v)], attr) for g in gs)
                        den = sum(g.shape.count * getattr(index[(g.label, BASE)], attr) for g in gs)
                        cells.append(harness.fmt(num / den))
                    else:
                        cells.append("-")
            lines.append(f"| {M} | {config} | " + " | ".join(cells) + " |")
    lines += ["", targets(results, groups)]
    return "\n".join(lines)


def targets(results: list[harness.Result], groups: list[Group], M_target: int = 8192, r_target: int = 16) -> str:
    """fusedpeft (LoRA) against the base at M = 8192, r = 16: train <= 1.10 where N and K >= 2048,
    <= 1.25 elsewhere; fwd <= 1.05 / 1.15; train memory <= 1.05."""
    index = {(r.group, r.variant): r for r in results}
    lora = [g for g in groups if g.method == "lora" and (g.label, OURS) in index and (g.label, BASE) in index]
    if not lora:
        return "Targets: no LoRA groups measured."
    Ms, rs = {g.M for g in lora}, {g.r for g in lora}
    M_at = M_target if M_target in Ms else max(Ms)
    r_at = r_target if r_target in rs else min(rs)
    note = "" if (M_at, r_at) == (M_target, r_target) else f" (M={M_target}, r={r_target} not measured: at M={M_at}, r={r_at})"
    lines = [f"Targets, {OURS} / base at M={M_at}, r={r_at}{note}: train <= 1.10 where N and K >= 2048, <= 1.25 "
             "elsewhere; fwd <= 1.05 / 1.15; train memory <= 1.05.", "",
             "| dropout | groups | train met | fwd met | memory met | missed |", "|---:|---:|---:|---:|---:|---|"]
    for p in sorted({g.p for g in lora}):
        gs = [g for g in lora if g.M == M_at and g.r == r_at and g.p == p]
        met = {"train": 0, "fwd": 0, "mem": 0}
        mem_measured = 0
        missed = []
        for g in gs:
            ours, base = index[(g.label, OURS)], index[(g.label, BASE)]
            large = g.shape.N >= 2048 and g.shape.K >= 2048
            train = harness.ratio(ours.train_ms, base.train_ms)
            fwd = harness.ratio(ours.fwd_ms, base.fwd_ms)
            mem = harness.ratio(ours.train_mem_mib, base.train_mem_mib)
            ok_train, ok_fwd = train <= (1.10 if large else 1.25), fwd <= (1.05 if large else 1.15)
            met["train"] += ok_train
            met["fwd"] += ok_fwd
            if not math.isnan(mem):
                mem_measured += 1
                met["mem"] += mem <= 1.05
            miss = [f"train {train:.2f}"] * (not ok_train) + [f"fwd {fwd:.2f}"] * (not ok_fwd) \
                + [f"mem {mem:.2f}"] * (not math.isnan(mem) and mem > 1.05)
            if miss:
                missed.append(f"{g.shape.label}: {', '.join(miss)}")
        mem_cell = f"{met['mem']} / {mem_measured}" if mem_measured else "n/a"
        lines.append(f"| {p:g} | {len(gs)} | {met['train']} / {len(gs)} | {met['fwd']} / {len(gs)} | {mem_cell} | "
                     + ("; ".join(missed) or "-") + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--tokens", default="2048,8192", help="token counts M, comma-separated")
    parser.add_argument("--shapes", default=None,
                        help="explicit MxKxN[+b] list (+b: with bias), replacing --models and --tokens")
    parser.add_argument("--methods", default="lora", help="comma-separated: lora, dora, ia3 (output and feedforward), ssf")
    parser.add_argument("--ranks", default=None, help="LoRA ranks (default 16,64; cpu 4)")
    parser.add_argument("--dropouts", default="0,0.05", help="LoRA dropout probabilities")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke run)")
    parser.add_argument("--warmup-ms", type=float, default=None, help="warm-up per timing (default 10; cpu 2)")
    parser.add_argument("--rep-ms", type=float, default=None, help="timed span per timing (default 50; cpu 10)")
    parser.add_argument("--forced-on-cpu", action="store_true",
                        help="on cpu, also time the forced triton / cublas backends (Triton's interpreter: slow)")
    parser.add_argument("--no-peft", action="store_true", help="leave peft's layers out")
    parser.add_argument("--backward-thread", default="caller", choices=harness.BACKWARD_THREADS,
                        help="where each step's backward runs: the calling thread (default; a model pays "
                             "autograd's hand-off to its device thread once per step, not per layer) or "
                             "that device thread, as a lone .backward() does")
    parser.add_argument("--auto-again", action="store_true",
                        help="time the automatic choice a second time at the end of each group")
    parser.add_argument("--out", default=None, help="write the Markdown table and summary here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    parser.add_argument("--json", default=None, help="write every row (with its group's shape and config) here")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    if cpu and args.shapes is None:
        args.shapes = CPU_SHAPES
    if args.ranks is None:
        args.ranks = CPU_RANKS if cpu else "16,64"
    if args.warmup_ms is None:
        args.warmup_ms = 2.0 if cpu else 10.0
    if args.rep_ms is None:
        args.rep_ms = 10.0 if cpu else 50.0
    return args


def main(argv=None) -> list[harness.Result]:
    args = parse_args(argv)
    _NOTES.clear()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # only for --forced-on-cpu; set before triton loads
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    with_peft = not args.no_peft
    if with_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("note: peft is not installed: no peft rows", file=sys.stderr)
            with_peft = False
    groups = groups_of(args)
    cases = cases_of(groups, device, dtype, with_peft, args)
    print(f"{len(groups)} groups, {len(cases)} cases on {args.device}", file=sys.stderr)
    env = harness.environment(args.device)
    compare = [c for c in COMPARE if with_peft or c != PEFT]

    def write(results, partial=None):
        head = (f"{env}, {args.dtype}; warm-up {args.warmup_ms:g} ms, timed {args.rep_ms:g} ms per measurement. "
                f"train = forward + backward (grad_x and adapter grads, base frozen; backward on the "
                f"{'calling thread' if args.backward_thread == 'caller' else 'autograd device thread'}); "
                f"fwd = forward with autograd on.")
        if partial:
            head += f"\n\n**Partial: {partial} so far.**"
        done = {r.group for r in results}
        md = head + "\n\n" + harness.table(results, BASE, compare) + "\n\n" \
            + summary(results, [g for g in groups if g.label in done] if partial else groups)
        if args.out:
            with open(args.out, "w") as f:
                f.write(md + "\n")
        if args.json:
            write_json(args, env, groups, results, partial)
        return md

    t0 = time.perf_counter()
    results = harness.run(cases, log=lambda line: print(line, file=sys.stderr), device=args.device,
                          warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, backward_thread=args.backward_thread,
                          on_result=harness.after_each_group(
                              cases, lambda done: write(done, f"{len({r.group for r in done})} of {len(groups)} groups"))
                          if args.out or args.json else None)
    print(f"measured {len(cases)} cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(write(results))
    if args.plot:
        harness.plot(results, BASE, args.plot, f"Layers, {env}, {args.dtype}", variants=[OURS] + COMPARE)
    return results


def write_json(args, env: str, groups, results, partial) -> None:
    """Every row with its group's shape and config (--json); ``partial``: how much of the run it holds."""
    meta = {g.label: g for g in groups}
    rows = []
    for r in results:
        g = meta[r.group]
        row = dataclasses.asdict(r)
        row["train_mem_mib"] = None if math.isnan(r.train_mem_mib) else r.train_mem_mib
        row.update(family=g.shape.family, layers=g.shape.layers, K=g.shape.K, N=g.shape.N, bias=g.shape.bias,
                   count_per_block=g.shape.count, M=g.M, method=g.method, r=g.r, dropout=g.p)
        rows.append(row)
    with open(args.json, "w") as f:
        json.dump({"environment": env, "dtype": args.dtype, "device": args.device, "warmup_ms": args.warmup_ms,
                   "rep_ms": args.rep_ms, "partial": partial, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
