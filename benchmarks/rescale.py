"""IA3 and SSF benchmark: cuBLAS base linear (the floor), fusedpeft (triton; for output scaling
both ways of getting grad_scale, "save" and "recompute"), the unfused torch backend and HF peft's
IA3 layer, on the same inputs in one run.

    python -m benchmarks.rescale                     # all shapes, ia3-out, ia3-ff, ssf, bf16
    python -m benchmarks.rescale --shapes 4096x4096x4096 --methods ssf --out /tmp/r.md

"fwd" is timed under torch.no_grad() (inference: nothing saved); "train" is forward + backward
with the base frozen and grad_x computed, as in fine-tuning."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import harness

DEFAULT_SHAPES = ["4096x4096x4096", "8192x4096x14336", "8192x14336x4096", "16x4096x4096"]
METHODS = ["ia3-out", "ia3-ff", "ssf"]


def _inputs(M, K, N, method, dtype):
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    size = K if method == "ia3-ff" else N
    scale = (1 + 0.1 * torch.randn(size, device="cuda")).to(dtype).requires_grad_()
    shift = (0.1 * torch.randn(N, device="cuda")).to(dtype).requires_grad_() if method == "ssf" else None
    g = torch.randn(M, N, device="cuda", dtype=dtype)
    return x, W, scale, shift, g


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def cases(M, K, N, method, dtype=torch.bfloat16, with_peft=True):
    import fusedpeft
    from fusedpeft.ops import ia3_linear, ssf_linear

    group = f"{M}x{K}x{N} {method}"
    flops = 2.0 * M * N * K

    def base():
        x, W, _, _, g = _inputs(M, K, N, method, dtype)
        fwd = lambda: F.linear(x, W)
        return _no_grad(fwd), harness.step_fn(fwd, g, [x])

    def ours(backend, mode):
        def make():
            x, W, scale, shift, g = _inputs(M, K, N, method, dtype)
            if method == "ssf":
                call = lambda: ssf_linear(x, W, None, scale, shift)
            else:
                call = lambda: ia3_linear(x, W, None, scale, method == "ia3-ff")

            def fwd():  # the mode decides what the forward saves for the backward
                with fusedpeft.settings.override(backend=backend, output_scale_grad=mode):
                    return call()

            return _no_grad(fwd), harness.step_fn(fwd, g, [x, scale] + ([shift] if shift is not None else []))

        return make

    def peft_layer():
        import peft

        x, W, scale, _, g = _inputs(M, K, N, method, dtype)
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=dtype)
        lin.weight.data.copy_(W)
        ff = ["0"] if method == "ia3-ff" else []
        model = peft.get_peft_model(
            torch.nn.Sequential(lin), peft.IA3Config(target_modules=["0"], feedforward_modules=ff),
            autocast_adapter_dtype=False,  # bf16 scales, as in the other variants
        )
        with torch.no_grad():
            model.base_model.model[0].ia3_l["default"].copy_(scale.detach().reshape(model.base_model.model[0].ia3_l["default"].shape))
        fwd = lambda: model(x)
        return _no_grad(fwd), harness.step_fn(fwd, g, [x] + [p for p in model.parameters() if p.requires_grad])

    out = [harness.Case(group, "base (cuBLAS)", base, flops=flops)]
    if method == "ia3-ff":
        out.append(harness.Case(group, "fusedpeft", ours("triton", "save"), flops=flops))
    else:
        out.append(harness.Case(group, "fusedpeft save", ours("triton", "save"), flops=flops))
        out.append(harness.Case(group, "fusedpeft recompute", ours("triton", "recompute"), flops=flops))
    out.append(harness.Case(group, "torch backend", ours("torch", "save"), flops=flops))
    if with_peft and method != "ssf":
        out.append(harness.Case(group, "peft", peft_layer, flops=flops))
    return out


def main(argv=None):
    return harness.cli(
        __doc__,
        lambda parser: parser.add_argument("--methods", default=",".join(METHODS)),
        lambda M, K, N, dtype, with_peft, args: [c for m in args.methods.split(",") for c in cases(M, K, N, m, dtype, with_peft)],
        "IA3 / SSF", argv, DEFAULT_SHAPES,
    )


if __name__ == "__main__":
    main()
