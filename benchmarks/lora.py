"""LoRA benchmark: cuBLAS base linear (the floor), fusedpeft's GEMM core alone, fusedpeft LoRA
(triton), the unfused torch backend and HF peft's LoRA layer, on the same inputs in one run.

    python -m benchmarks.lora                      # all shapes, r in {16, 64}, bf16
    python -m benchmarks.lora --shapes 4096x4096x4096 --ranks 16 --out /tmp/r.md --plot /tmp/r.png

Shapes are tokens x in_features x out_features. "train" is forward + backward with the base frozen
and grad_x computed, as in fine-tuning."""
from __future__ import annotations

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
        return fwd, harness.step_fn(fwd, g, [x])

    def core():
        x, W, _, _, g = _inputs(M, K, N, r, dtype)
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        gx = torch.empty(M, K, device="cuda", dtype=dtype)
        # The GEMM core with nothing fused: the output-scaling kernel with a scale of ones.
        rescaled = triton_kernels.rescale._rescaled
        ones_n, ones_k = torch.ones(N, device="cuda", dtype=dtype), torch.ones(K, device="cuda", dtype=dtype)
        fwd = lambda: rescaled(x, W, out, None, ones_n, input_scale=False)

        def step():  # the same two GEMMs the base's training step runs: x W^T and grad_y W
            rescaled(x, W, out, None, ones_n, input_scale=False)
            rescaled(g, W.T, gx, None, ones_k, input_scale=False)

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
        return fwd, harness.step_fn(fwd, g, [x] + [p for p in model.parameters() if p.requires_grad])

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
    return harness.cli(
        __doc__,
        lambda parser: parser.add_argument("--ranks", default="16,64"),
        lambda M, K, N, dtype, with_peft, args: [c for r in args.ranks.split(",") for c in cases(M, K, N, int(r), dtype, with_peft)],
        "LoRA", argv, DEFAULT_SHAPES,
    )


if __name__ == "__main__":
    main()
