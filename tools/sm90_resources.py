"""Registers, spills, shared memory and ptxas's pipelining advisories of the LoRA, IA3 and SSF
launches on Hopper, from a CPU-only machine.

Triton's compiler and ptxas run without a GPU: this records the launches a training step's forward
and backward make (shapes, strides, dtypes and flags as the real launchers pass them, with the GPU
stubbed out), compiles each for sm_90 under every tile config the tuner would try, and prints what
`cuobjdump -res-usage` reports for the cubin, beside the dynamic shared memory Triton asks for
(227 KB is the H100's limit), any "Potential Performance Loss" advisory of ptxas (C7515:
wgmmas serialised, which costs a register-scaled loop about a third of its time), and any
instruction that overwrites a register operand of a wgmma still in flight (a race that gives wrong
results: register_operand_hazards). It prices a kernel change on Hopper before any device time is
spent (benchmarks/RESULTS.md quotes it); the figures are the installed Triton's, which may differ
from the device image's (3.6).

    python -m tools.sm90_resources [--shape 4096x4096x4096] [--method lora|dora|ia3-ff|ia3-out|ssf]
                                   [--recompute] [--rank 16] [--dtype bf16|fp16|fp32] [--dropout 0.1]
                                   [--launches forward,grad_x]
                                   [--block-n 256] [--stages 3] [--json] [--dump DIR]
    python -m tools.sm90_resources --flags-only [...]     # the launches' flags; nothing compiled
    python -m tools.sm90_resources --sass FILE [FILE ...]  # the hazard check on SASS listings

--shape, --method, --rank and --dtype take comma-separated lists: every combination is reported,
and with --json each row names its shape, method, rank and dtype.

Triton compiles only when its language module was loaded without the interpreter; under
TRITON_INTERPRET=1 (as in CI) main() re-runs itself in a fresh process without it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int8: "i8", torch.int64: "i64"}
H100_SHARED_LIMIT = 232448


def _signature(kernel, args, constexprs):
    """ASTSource's signature, constants and attributes for a call, specialised as Triton's JIT
    would: an int equal to 1 becomes a constant, an int or pointer divisible by 16 gets the
    divisibility attribute (do_not_specialize arguments get neither)."""
    names = kernel.arg_names
    plain = [n for n in names if n not in constexprs]
    skip = {names[n] if isinstance(n, int) else n for n in getattr(kernel, "do_not_specialize", [])}
    sig, consts, attrs = {}, dict(constexprs), {}
    for name, value in zip(plain, args):
        index = names.index(name)
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in skip:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in skip:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    for name in constexprs:
        sig[name] = "constexpr"
    return {n: sig[n] for n in names}, consts, attrs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compile_for_sm90(kernel, args, constexprs, num_warps, num_stages, dump=None):
    """Compile one launch for sm_90; returns (cuobjdump's resource fields plus ptxas's performance
    advisories under "advisories" and register_operand_hazards under "hazards", Triton's shared
    bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreting():
        raise RuntimeError("compile_for_sm90 needs Triton's compiler: run without TRITON_INTERPRET "
                           "(main() re-runs itself that way)")
    sig, consts, attrs = _signature(kernel, args, constexprs)
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout.strip().splitlines()[-1].strip()
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
        # ptxas again on Triton's PTX, verbosely: its "Potential Performance Loss" advisories (say
        # C7515, wgmmas serialised) are the loss of pipelining that registers and shared memory
        # do not show. Triton's own ptxas call keeps them to itself.
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        verbose = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                                  os.path.join(tmp, "v.cubin")], capture_output=True, text=True).stderr
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(os.path.join(dump, f"kernel.{ext}"), "w") as f:
                f.write(text)
    fields = dict(item.split(":") for item in usage.split() if ":" in item)
    fields["hazards"] = register_operand_hazards(sass)
    fields["advisories"] = [line.split("Potential Performance Loss:", 1)[1].strip().split(" in the function")[0]
                            for line in verbose.splitlines() if "Potential Performance Loss" in line]
    return fields, compiled.metadata.shared


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_REG = re.compile(r"\bR(\d+)\b")
_WIDTH = re.compile(r"\.(64|128)\b|\.x?([24])$|M88\.([124])")


def _dest_regs(op: str, args: str) -> set:
    """Registers an instruction writes: its first operand, widened for vector loads (LDS.128,
    LDSM...x4, LDG.E.64), 0 for stores, branches and barriers."""
    if op.split(".")[0] in ("ST", "STS", "STG", "STL", "STSM", "BRA", "BAR", "EXIT", "RET", "WARPSYNC", "DEPBAR",
                            "WARPGROUP", "SYNCS", "UTMALDG", "UTMASTG", "UTMACMDFLUSH", "ARRIVES", "MEMBAR",
                            "FENCE", "NOP", "CCTL", "LDGDEPBAR", "UBLKCP", "ELECT", "RED", "ATOMS"):
        return set()
    first = args.split(",")[0].strip()
    m = _REG.fullmatch(first)
    if not m:
        return set()
    width = 1
    for w in _WIDTH.findall(op):
        n = next(int(v) for v in w if v)
        width = {64: 2, 128: 4}.get(n, n)
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def register_operand_hazards(sass: str) -> list:
    """Instructions that overwrite a register A operand of an HGMMA that may still be reading it.

    An HGMMA with A in registers (RS form: "HGMMA... R24, R164, gdesc[...]") reads R164..R167
    until a later WARPGROUP.DEPBAR.LE gsb0, N leaves at most N younger HGMMAs pending; PTX makes
    keeping those registers unchanged until then the program's job. Each loop holding RS HGMMAs is
    walked twice in a row (its back edge taken once), so a write at the top of one iteration
    against the previous iteration's pending HGMMAs shows. Returns "address: instruction" lines."""
    code = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    index = {addr: i for i, (addr, _) in enumerate(code)}
    loops = []
    for i, (addr, text) in enumerate(code):
        m = re.search(r"\bBRA\s+(?:\w+\s+)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            body = code[index[int(m.group(1), 16)]:i + 1]
            if any("HGMMA" in t and re.search(r"HGMMA\S*\s+R\d+,\s*R\d+", t) for _, t in body):
                loops.append(body)
    found = []
    for body in loops:
        pending = []  # register sets of the RS HGMMAs in flight, oldest first (None: SS form)
        for addr, text in body + body:
            text = re.sub(r"^@!?U?P\w+\s+", "", text)
            op, _, args = text.partition(" ")
            if op.startswith("HGMMA"):
                m = re.match(r"\s*R\d+,\s*R(\d+)", args)
                pending.append(set(range(int(m.group(1)), int(m.group(1)) + 4)) if m else None)
                continue
            m = re.match(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", text)
            if m:
                keep = int(m.group(1), 16)
                pending = pending[max(0, len(pending) - keep):] if keep else []
                continue
            written = _dest_regs(op, args)
            if written and any(regs and regs & written for regs in pending):
                line = f"{addr:#06x}: {text}"
                if line not in found:
                    found.append(line)
    return found


def record_launches(step):
    """The (kernel, args, constexprs, warps, stages, candidates) of each launch that step() makes
    through the Triton backend's launchers, built as for a GPU; nothing runs. candidates: for a
    tuned launch, [(config, constexprs)] of every tile config the tuner would time, each as its
    launcher would pass it (the first is the one recorded); None for a launch of fixed tiles. The
    launchers' GPU queries are stood in for (an H100's 132 SMs)."""
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.settings import settings

    buffers, configs, fast_launch, layout = (triton_kernels.buffers, triton_kernels.configs,
                                             triton_kernels.fast_launch, triton_kernels.layout)
    recorded = []
    state = {"group": None, "swallow": False}

    def record(kernel, grid, args, constexprs, num_warps, num_stages):
        launch = (kernel, args, dict(constexprs), num_warps, num_stages)
        if state["group"] is not None:  # the tuner trying one candidate
            state["group"].append(launch)
        elif state["swallow"]:  # the launch with the config the tuner returned: recorded already
            state["swallow"] = False
        else:
            recorded.append((*launch, None))

    def tune_by_recording(key, M_, N_, size, launch_with):
        cands = configs.candidates(M_, N_, size)
        state["group"] = []
        for cand in cands:
            launch_with(cand)
        group, state["group"], state["swallow"] = state["group"], None, True
        recorded.append((*group[0], [(cand, launch[2]) for cand, launch in zip(cands, group)]))
        return cands[0]

    stand_ins = [(layout, "interpreting", lambda: False), (layout, "num_sms", lambda index: 132),
                 (buffers, "ensure_allocator", lambda: None), (fast_launch, "cached_launch", record),
                 (configs, "tuned_config", tune_by_recording), (torch.cuda, "current_device", lambda: 0)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in stand_ins]
    try:
        for obj, name, value in stand_ins:
            setattr(obj, name, value)
        with settings.override(fast_launch=False):  # no launch plans: every call goes through the launchers
            step()
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return recorded


def record_lora_launches(M, K, N, r, dtype=torch.bfloat16, dropout_p=0.0):
    """The launches of one LoRA training step (LAUNCH_NAMES at large M)."""
    from fusedpeft._kernels import triton_kernels

    lora = triton_kernels.lora

    def step():
        x, W = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
        A, B = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        _, saved_u = lora.forward(x, W, None, A, B, 2.0, dropout_p, seed)
        lora.backward(torch.randn(M, N, dtype=dtype), x, W, A, B, 2.0, dropout_p, seed,
                      (True, False, False, True, True), saved_u)

    return record_launches(step)


RESCALE_KINDS = ("ia3-ff", "ia3-out", "ssf")


def record_rescale_launches(M, K, N, kind, dtype=torch.bfloat16, save_unscaled=True):
    """The launches of one IA3 / SSF training step (RESCALE_NAMES), bias included: forward, then
    the backward's GEMM(s) (grad_x; and the recomputed z when not save_unscaled)."""
    from fusedpeft._kernels import triton_kernels

    rescale = triton_kernels.rescale
    input_scale = kind == "ia3-ff"

    def step():
        x, W, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
        scale = torch.randn(K if input_scale else N, dtype=dtype)
        shift = torch.randn(N, dtype=dtype) if kind == "ssf" else None
        save = save_unscaled and not input_scale
        _, z = rescale.forward(x, W, b, scale, shift, input_scale, save)
        rescale.backward(torch.randn(M, N, dtype=dtype), x, W, b, scale, shift, input_scale, z,
                         (True, False, False, True, shift is not None))

    return [launch for launch in record_launches(step) if launch[5] is not None]  # the tuned GEMMs


def record_dora_launches(M, K, N, r, dtype=torch.bfloat16, save_z=True):
    """The launches of one DoRA training step at p = 0, named by kernel: the forward with its DoRA
    epilogue, the LoRA backward on the scaled operands, and the magnitude's gradient (column_dot
    over the saved z, or dora_magnitude_grad_kernel recomputing z in recompute mode)."""
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.ops import dora as dora_op

    dora = triton_kernels.dora

    def step():
        x, W, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
        A, B = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
        m, norm = torch.rand(N) + 0.5, torch.rand(N) + 0.5
        z_source = dora_op.Z_SAVED if save_z else dora_op.Z_RECOMPUTED
        _, saved = dora.forward(x, W, b, A, B, m, 2.0, norm, 0.0, None, z_source)
        dora.backward(torch.randn(M, N, dtype=dtype), x, W, b, A, B, m, saved, 2.0, norm, 0.0, None, z_source,
                      (True, False, True, True, True, True))

    return record_launches(step)


LAUNCH_NAMES = ["u", "forward", "g", "grad_x", "grad_A", "grad_B"]  # the split schedule (large M)
FUSED_LAUNCH_NAMES = ["forward", "grad_x", "grad_A", "grad_B"]  # the fused schedule (decode sizes)
RESCALE_NAMES = ["forward", "grad_x", "recomputed_z"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tensor_dtypes(kernel, args, constexprs) -> dict:
    """{argument name: Triton dtype} of a launch's tensor arguments."""
    plain = [n for n in kernel.arg_names if n not in constexprs]
    return {n: _TRITON_TYPES[v.dtype] for n, v in zip(plain, args) if isinstance(v, torch.Tensor)}


def report(M, K, N, r, launches=None, block_n=None, stages=None, dump=None, method="lora", recompute=False,
           dtype=torch.bfloat16, compile=True, dropout_p=0.0):
    """[{launch, kernel, flags, tensors, tuned, configs: [{config, warps, stages, FLATTEN,
    registers, stack, shared, over_shared_limit, advisories, hazards, error}]}] for the launches
    of one training step of ``method`` ("lora", named as LAUNCH_NAMES or FUSED_LAUNCH_NAMES by the
    schedule it takes, or one of RESCALE_KINDS, named as RESCALE_NAMES; ``recompute``: output
    scaling's recompute mode), each under every tuner candidate (filtered by BLOCK_N and stages if
    given). ``tensors`` gives each tensor argument's dtype, ``tuned`` whether the tuner picks the
    launch's config, and FLATTEN the loop form a config of the fused GEMM kernel gets. With
    ``compile`` (the default) each config is compiled for sm_90 and its resources filled in;
    without, nothing is compiled."""
    if method == "lora":
        recorded = record_lora_launches(M, K, N, r, dtype, dropout_p)
        names = FUSED_LAUNCH_NAMES if len(recorded) == len(FUSED_LAUNCH_NAMES) else LAUNCH_NAMES
    elif method in RESCALE_KINDS:
        recorded, names = record_rescale_launches(M, K, N, method, dtype, not recompute), RESCALE_NAMES
    elif method == "dora":
        recorded = record_dora_launches(M, K, N, r, dtype, not recompute)
        names = [getattr(launch[0], "__name__", None) or launch[0].fn.__name__ for launch in recorded]
    else:
        raise ValueError(f"method must be 'lora', 'dora' or one of {RESCALE_KINDS}, got {method!r}")
    rows = []
    for i, (kernel, call_args, constexprs, warps, num_stages, candidates) in enumerate(recorded):
        name = names[i] if i < len(names) else f"launch {i}"
        if launches and name not in launches:
            continue
        configs = ([(c.kwargs, c.num_warps, c.num_stages, flags) for c, flags in candidates] if candidates
                   else [({}, warps, num_stages, constexprs)])
        row = {"launch": name, "kernel": kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__,
               "flags": {k: v for k, v in constexprs.items() if isinstance(v, (bool, int))},
               "tensors": _tensor_dtypes(kernel, call_args, constexprs), "tuned": candidates is not None,
               "configs": []}
        for j, (kw, w, st, flags) in enumerate(configs):
            if (block_n and kw.get("BLOCK_N") != block_n) or (stages and st != stages):
                continue
            entry = {"config": kw, "warps": w, "stages": st}
            if "FLATTEN" in flags:  # the loop form the launcher gives this config
                entry["FLATTEN"] = flags["FLATTEN"]
            try:
                if compile:
                    fields, shared = compile_for_sm90(kernel, call_args, flags, w, st,
                                                      os.path.join(dump, f"{i}_{j}") if dump else None)
                    entry.update(registers=int(fields["REG"]), stack=int(fields["STACK"]), shared=shared,
                                 over_shared_limit=shared > H100_SHARED_LIMIT, advisories=fields["advisories"],
                                 hazards=fields["hazards"])
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[-1][:200] if str(exc) else ''}"
            row["configs"].append(entry)
        rows.append(row)
    return rows


def _print_rows(rows, flags=False):
    for row in rows:
        print(f"{row['launch']} ({row['kernel']}):")
        if flags:
            print("  flags: " + " ".join(k if v is True else f"{k}={v}" for k, v in row["flags"].items() if v is not False)
                  + "; " + " ".join(f"{n}: {t}" for n, t in row["tensors"].items()))
        for c in row["configs"]:
            tag = " ".join(f"{k}={v}" for k, v in c["config"].items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "EPI_SUBTILE"))
            head = f"  {tag or 'fixed config'} w{c['warps']} s{c['stages']}: "
            if "error" in c:
                print(head + f"does not compile ({c['error'][:100]})")
            elif "registers" not in c:  # --flags-only
                print(head + ("flattened loop" if c.get("FLATTEN") else "per-tile K loops" if "FLATTEN" in c else "recorded"))
            else:
                over = "  (over the H100's shared memory)" if c["over_shared_limit"] else ""
                print(head + f"{c['registers']} registers, stack {c['stack']}, shared {c['shared'] / 1024:.0f} KB{over}")
                for advisory in c["advisories"]:
                    print(f"      ptxas: {advisory}")
                for hazard in c["hazards"]:
                    print(f"      register operand overwritten in flight: {hazard}")


def main(argv=None):
    import itertools
    import json
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096x4096", help="M x K x N, or several, comma-separated")
    parser.add_argument("--method", default="lora",
                        help=f"lora, dora or one of {', '.join(RESCALE_KINDS)}, or several, comma-separated")
    parser.add_argument("--recompute", action="store_true",
                        help="output scaling's (and DoRA's) recompute mode (no saved z)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA's dropout probability")
    parser.add_argument("--rank", default="16", help="LoRA's rank, or several, comma-separated")
    parser.add_argument("--dtype", default="bf16", help=f"one of {', '.join(DTYPES)}, or several, comma-separated")
    parser.add_argument("--launches", default=None,
                        help=f"comma-separated subset of {','.join(LAUNCH_NAMES)} (LoRA) or {','.join(RESCALE_NAMES)}")
    parser.add_argument("--block-n", type=int, default=None, help="only configs with this BLOCK_N")
    parser.add_argument("--stages", type=int, default=None, help="only configs with this many stages")
    parser.add_argument("--flags-only", action="store_true",
                        help="record the launches and report their flags, tensor dtypes and loop forms; compile nothing")
    parser.add_argument("--sass", nargs="+", default=None, metavar="FILE",
                        help="only run register_operand_hazards on these SASS listings (cuobjdump -sass)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (one line)")
    parser.add_argument("--dump", default=None, help="write each compiled launch's TTGIR, PTX and SASS below this folder")
    args = parser.parse_args(argv)
    if args.sass:
        found = {}
        for path in args.sass:
            with open(path) as f:
                found[path] = register_operand_hazards(f.read())
        if args.json:
            print(json.dumps(found))
        for path, lines in ([] if args.json else found.items()):
            print(f"{path}: " + ("no register operand overwritten in flight" if not lines else ""))
            for line in lines:
                print(f"  {line}")
        return
    methods = args.method.split(",")
    unknown = [m for m in methods if m not in ("lora", "dora", *RESCALE_KINDS)] + [d for d in args.dtype.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown --method or --dtype: {unknown}")
    if _interpreting() and not args.flags_only:
        # triton.language itself was loaded for the interpreter: start afresh without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else argv
        raise SystemExit(subprocess.run([sys.executable, "-m", "tools.sm90_resources", *argv], env=env).returncode)
    rows = []
    for shape, method, dtype in itertools.product(args.shape.split(","), methods, args.dtype.split(",")):
        M, K, N = (int(v) for v in shape.split("x"))
        for r in [int(v) for v in args.rank.split(",")] if method in ("lora", "dora") else [None]:
            part = report(M, K, N, r, args.launches.split(",") if args.launches else None, args.block_n,
                          args.stages, args.dump, method, args.recompute, DTYPES[dtype], compile=not args.flags_only,
                          dropout_p=args.dropout)
            if not args.json:
                print(f"== {shape} {method}" + (f" r={r}" if r else "") + f" {dtype}")
                _print_rows(part, flags=args.flags_only)
            rows += [{"shape": shape, "method": method, "rank": r, "dtype": dtype, **row} for row in part]
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
