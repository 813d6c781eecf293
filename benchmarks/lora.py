"""LoRA benchmark: cuBLAS base linear (the floor), fusedpeft's GEMM core alone, fusedpeft LoRA
(triton), the unfused torch backend and HF peft's LoRA layer, on the same inputs in one run.

    python -m benchmarks.lora                      # all shapes, r in {16, 64}, bf16
    python -m benchmarks.lora --shapes 4096x4096x4096 --ranks 16 --out /tmp/r.md --plot /tmp/r.png

Shapes are tokens x in_features x out_features. "train" is forward + backward with the base frozen
and grad_x computed, as in fine-tuning."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import harness

DEFAULT_SHAPES = ["4096x4096x4096", "8192x4096x14336", "8192x14336x4096", "16x4096x4096"]


def _inputs(M, K, N, r, dtype):
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    A = (torch.randn(r, K, device="cuda") / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, device="cuda") / r**0.5).to(dtype).requires_grad_()
    g = torch.randn(M, N, device="cuda", dtype=dtype)
    return x, W, A, B, g


def _step(forward, g, params):
    def step():
        for p in params:
            p.grad = None
        forward().backward(g)

    return step


def cases(M, K, N, r, dtype=torch.bfloat16, with_peft=True):
    import fusedpeft
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.ops import lora_linear

    group = f"{M}x{K}x{N} r={r}"
    flops = 2.0 * M * N * K + 2.0 * M * K * r + 2.0 * M * N * r
    scaling = 2.0

    def base():
        x, W, _, _, g = _inputs(M, K, N, r, dtype)
        fwd = lambda: F.linear(x, W)
        return fwd, _step(fwd, g, [x])

    def core():
        x, W, _, _, g = _inputs(M, K, N, r, dtype)
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        gx = torch.empty(M, K, device="cuda", dtype=dtype)
        launch = triton_kernels.launch.launch_fused_linear
        fwd = lambda: launch(x, W, out)

        def step():  # the same two GEMMs the base's training step runs
            launch(x, W, out)
            launch(g, W.T, gx)

        return fwd, step

    def ours(backend):
        def make():
            x, W, A, B, g = _inputs(M, K, N, r, dtype)

            def fwd():
                with fusedpeft.use_backend(backend):
                    return lora_linear(x, W, None, A, B, scaling)

            def step():
                with fusedpeft.use_backend(backend):
                    for p in (x, A, B):
                        p.grad = None
                    lora_linear(x, W, None, A, B, scaling).backward(g)

            return fwd, step

        return make

    def peft_layer():
        import peft

        x, W, A, B, g = _inputs(M, K, N, r, dtype)
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=dtype)
        lin.weight.data.copy_(W)
        model = peft.get_peft_model(
            torch.nn.Sequential(lin),
            peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["0"], init_lora_weights=False),
            autocast_adapter_dtype=False,  # bf16 adapters, as in the other variants
        )
        fwd = lambda: model(x)
        return fwd, _step(fwd, g, [x] + [p for p in model.parameters() if p.requires_grad])

    out = [
        harness.Case(group, "base (cuBLAS)", base, flops=2.0 * M * N * K),
        harness.Case(group, "core alone", core, flops=2.0 * M * N * K),
        harness.Case(group, "fusedpeft", ours("triton"), flops=flops),
        harness.Case(group, "torch backend", ours("torch"), flops=flops),
    ]
    if with_peft:
        out.append(harness.Case(group, "peft", peft_layer, flops=flops))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
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
        for r in (int(v) for v in args.ranks.split(",")):
            all_cases += cases(M, K, N, r, dtype, with_peft)
    results = harness.run(all_cases)
    md = f"{harness.environment()}, {args.dtype}\n\n" + harness.table(results, "base (cuBLAS)", "peft" if with_peft else None)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
    if args.plot:
        harness.plot(results, "base (cuBLAS)", args.plot, f"LoRA, {harness.environment()}")
    return results


if __name__ == "__main__":
    main()
