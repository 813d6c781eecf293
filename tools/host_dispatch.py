"""Host time of a small layer's call through fusedpeft's entry with the dispatch made as on CUDA, on
the CPU machine: the tunable backends accept CPU tensors, every call measures (``tuning.measures``),
the composable ops run their compositions here, and the tuner's pick is set to the backend named
(timing a candidate needs CUDA events, so each measurement answers a constant). Beside each op, the
same arithmetic as plain torch ops, on the same tensors.

    python -m tools.host_dispatch [--rows 16 --in 64 --out 48 --r 8] [--lora cublas_autograd] [--ia3 torch]
                                  [--layers]

``--layers`` adds peft's own LoRA and IA3 layers (peft installed) against the same layers after
``fusedpeft.from_peft``, on x of shape (2, rows / 2, in): the call as a model makes it.

Meant for comparing two versions of the host code (RESULTS.md quotes it); each process changes the
registry and the tuner for itself, so run it on its own."""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton-backed candidates load on CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def best_us(fn, calls: int = 5000, rounds: int = 7) -> float:
    """Best of ``rounds`` mean times of ``calls`` calls, in us (the least disturbed round)."""
    for _ in range(min(calls, 300)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def cuda_like_dispatch(picks: dict):
    """Make this process choose as on CUDA, with ``picks`` {op: backend} as the tuner's winners."""
    from fusedpeft import backends, tuning
    from fusedpeft.ops import _autograd

    _autograd.COMPOSED_DEVICES.add("cpu")
    tuning.measures = lambda x: True
    tuning.time_ms = lambda step: 1.0  # every candidate ties; the picks are written below
    for op in picks:
        for name, backend in backends._REGISTRY[op].items():
            if name != "torch":
                backend.supports = lambda *tensors, forced=False: None
    backends._CHOICE.clear()

    def pick():
        for key in list(tuning._PATHS):
            if key[0] in picks:
                tuning._PATHS[key] = picks[key[0]]
        tuning.generation += 1  # the entries' remembered choices are dropped

    return pick


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--in", dest="k", type=int, default=64)
    parser.add_argument("--out", dest="n", type=int, default=48)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora", default="cublas_autograd", help="the LoRA backend the tuner is made to pick")
    parser.add_argument("--ia3", default="torch", help="the IA3 backend the tuner is made to pick")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--layers", action="store_true", help="also peft's layers against the same after from_peft")
    args = parser.parse_args(argv)

    from fusedpeft import last_backend
    from fusedpeft.ops import ia3_linear, lora_linear

    pick = cuda_like_dispatch({"lora_linear": args.lora, "ia3_linear": args.ia3})
    torch.manual_seed(0)
    M, K, N, r = args.rows, args.k, args.n, args.r
    x = torch.randn(M, K, requires_grad=True)
    W, b = torch.randn(N, K) / K**0.5, torch.randn(N)
    scale = (1 + torch.randn(N, 1)).requires_grad_()
    A, B = (torch.randn(r, K) / K**0.5).requires_grad_(), torch.randn(N, r).requires_grad_()
    g = torch.randn(M, N)
    ia3_linear(x, W, b, scale, False)
    lora_linear(x, W, b, A, B, 2.0)
    pick()
    rows = [
        ("ia3_linear, output scaling", lambda: ia3_linear(x, W, b, scale, False),
         lambda: F.linear(x, W, b) * scale.flatten()),
        ("lora_linear, p = 0", lambda: lora_linear(x, W, b, A, B, 2.0),
         lambda: F.linear(x, W, b) + 2.0 * F.linear(F.linear(x, A), B)),
    ]
    print(f"{M} x {K} -> {N}, r = {r}, float32; us a call, best of 7 rounds of {args.calls}")
    for label, ours, plain in rows:
        fwd, step = best_us(ours, args.calls), best_us(lambda: ours().backward(g), args.calls)
        plain_fwd, plain_step = best_us(plain, args.calls), best_us(lambda: plain().backward(g), args.calls)
        print(f"{label:28s} fusedpeft forward {fwd:6.1f}  fwd + bwd {step:6.1f}   "
              f"plain torch forward {plain_fwd:6.1f}  fwd + bwd {plain_step:6.1f}")
    print(f"backends that ran: lora_linear {last_backend('lora_linear')}, ia3_linear {last_backend('ia3_linear')}")
    if args.layers:
        layer_rows(M, K, N, r, pick, args.calls)


def layer_rows(M: int, K: int, N: int, r: int, pick, calls: int):
    """peft's LoRA and IA3 layers against the same layers after fusedpeft.from_peft, trained
    weights random (B and the IA3 vector never their initial zeros / ones), x (2, M / 2, K)."""
    import copy

    import peft

    import fusedpeft

    x = torch.randn(2, max(M // 2, 1), K, requires_grad=True)
    g = torch.randn(*x.shape[:-1], N)
    configs = {"LoRA": peft.LoraConfig(r=r, target_modules=["0"]),
               "IA3": peft.IA3Config(target_modules=["0"], feedforward_modules=[])}
    print(f"layers, x {tuple(x.shape)}: us a call, best of 7 rounds of {calls}")
    for label, config in configs.items():
        peft_model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(K, N)), config)
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p)
        ours = fusedpeft.from_peft(copy.deepcopy(peft_model))
        peft_layer, our_layer = peft_model.base_model.model[0], ours.base_model.model[0]
        our_layer(x)
        pick()
        err = (our_layer(x) - peft_layer(x)).abs().max().item()
        timings = [best_us(f, calls) for layer in (our_layer, peft_layer)
                   for f in (lambda: layer(x), lambda: layer(x).backward(g))]
        print(f"{label:5s} {type(our_layer).__name__:15s} forward {timings[0]:6.1f}  fwd + bwd {timings[1]:6.1f}   "
              f"peft forward {timings[2]:6.1f}  fwd + bwd {timings[3]:6.1f}   (max difference {err:.1e})")


if __name__ == "__main__":
    main()
