"""Serving many adapters in one batch, layer level: one frozen linear layer, every row its own
LoRA adapter from a bank of slots (``fusedpeft.ops.multi_lora_linear``), forward only.

    python -m benchmarks.serving                                  # 4096 x 4096, r 16 and mixed 8-64
    python -m benchmarks.serving --rows 64,256,32x128 --adapters 1,8,32,128 --ranks 16,mixed --out s.md
    python -m benchmarks.serving --device cpu --hidden 64 --rows 8,2x8 --adapters 1,3   # smoke run

Rows: decode batches of one row per sequence (64, 256), and prefill batches of sequences x tokens
(32x128: 4096 rows, the sequence's adapter on each of its tokens). Adapters: how many distinct
adapters the batch uses, rows assigned round-robin over sequences. Ranks: one rank for all, or
"mixed" (8, 16, 32, 64 in turn; the bank padded to 64, which the kernels do not pay for).

Variants, on the same inputs in one run:
- "base (cuBLAS)": F.linear(x, W), the floor;
- "fusedpeft": multi_lora_linear as a server calls it (the backend chosen per shape by measurement),
  and each backend forced: "[triton]" (the fused SGMV GEMM), "[bgmv]" (the base GEMM, then a separate
  shrink and expand, vLLM's scheme: the baseline the fused kernel must beat) and "[cuda]" (the CUDA
  C++ BGMV) where they can run;
- "peft": peft's own mixed-batch forward (a LoRA layer holding every adapter, ``adapter_names=``).

Only the forward is timed (serving): the table's "train" columns repeat the forward.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import harness

MIXED = (8, 16, 32, 64)


def _parse_rows(text: str) -> list[tuple[str, int, int]]:
    """[(label, sequences, tokens per sequence)]: "64" is 64 one-token sequences, "32x128" 32 of 128."""
    out = []
    for item in text.split(","):
        seqs, _, tokens = item.strip().lower().partition("x")
        out.append((item.strip(), int(seqs), int(tokens or 1)))
    return out


def _bank(n_adapters, ranks_mode, K, N, dtype, device, gen):
    ranks = [MIXED[i % len(MIXED)] for i in range(n_adapters)] if ranks_mode == "mixed" else [int(ranks_mode)] * n_adapters
    R = max(ranks)
    A = torch.randn(n_adapters, R, K, generator=gen, device=device) / K**0.5
    B = torch.randn(n_adapters, N, R, generator=gen, device=device) / R**0.5
    for s, r in enumerate(ranks):
        A[s, r:] = 0
        B[s, :, r:] = 0
    scalings = torch.full((n_adapters,), 2.0, device=device)
    return A.to(dtype), B.to(dtype), scalings, torch.tensor(ranks, dtype=torch.int32, device=device), ranks


def cases(rows, n_adapters, ranks_mode, hidden, dtype, device, with_peft):
    import fusedpeft
    from fusedpeft.ops import multi_lora_linear

    label, seqs, tokens = rows
    K = N = hidden
    M = seqs * tokens
    group = f"{label} rows, {n_adapters} adapters, r={ranks_mode}"
    base_flops = 2.0 * M * N * K

    def inputs():
        gen = torch.Generator(device=device)
        gen.manual_seed(hash(group) % 2**31)
        x = torch.randn(M, K, generator=gen, device=device).to(dtype)
        W = (torch.randn(N, K, generator=gen, device=device) / K**0.5).to(dtype)
        seq_slot = torch.arange(seqs, device=device) % n_adapters
        idx = seq_slot.repeat_interleave(tokens)
        return x, W, idx, _bank(n_adapters, ranks_mode, K, N, dtype, device, gen)

    def base():
        x, W, _, _ = inputs()
        fwd = lambda: F.linear(x, W)  # noqa: E731
        return fwd, fwd

    def ours(backend):
        def make():
            x, W, idx, (A, B, scalings, ranks, _) = inputs()

            def fwd():
                with torch.no_grad(), (fusedpeft.use_backend(backend) if backend else _nothing()):
                    return multi_lora_linear(x, W, None, A, B, scalings, ranks, idx)

            return fwd, fwd

        return make

    def peft_layer():
        import peft
        from peft.tuners import lora

        x, W, idx, (A, B, scalings, ranks, rank_list) = inputs()
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        lin.weight.data.copy_(W)
        names = [f"a{i}" for i in range(n_adapters)]
        layer = None
        for i, name in enumerate(names):
            config = peft.LoraConfig(r=rank_list[i], lora_alpha=2 * rank_list[i], init_lora_weights=False)
            if layer is None:
                layer = lora.Linear(lin, name, config=config, r=rank_list[i], lora_alpha=2 * rank_list[i])
            else:
                layer.update_layer(name, rank_list[i], lora_alpha=2 * rank_list[i], config=config)
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(A[i, :rank_list[i]])
                layer.lora_B[name].weight.copy_(B[i, :, :rank_list[i]])
        layer.to(device=device, dtype=dtype).eval()
        row_names = [names[int(i)] for i in idx.tolist()]

        def fwd():
            with torch.no_grad():
                return layer(x, adapter_names=row_names)

        return fwd, fwd

    out = [harness.Case(group, "base (cuBLAS)", base, flops=base_flops, path="cuBLAS"),
           harness.Case(group, "fusedpeft", ours(None), flops=base_flops,
                        path=lambda: fusedpeft.last_backend("multi_lora_linear"))]
    registered = fusedpeft.backends.registered("multi_lora_linear")
    if device != "cpu":
        for name in ("triton", "bgmv", "cuda"):
            if name in registered:
                out.append(harness.Case(group, f"fusedpeft [{name}]", ours(name), flops=base_flops, path=name))
    if with_peft:
        out.append(harness.Case(group, "peft", peft_layer, flops=base_flops, path="peft"))
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096, help="in_features = out_features of the layer")
    parser.add_argument("--rows", default="64,256,32x128", help="decode row counts and prefill SEQSxTOKENS")
    parser.add_argument("--adapters", default="1,8,32,128", help="distinct adapters in the batch")
    parser.add_argument("--ranks", default="16,mixed", help="a rank, or 'mixed' (8-64), comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke run)")
    parser.add_argument("--no-peft", action="store_true", help="leave peft's layer out")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    with_peft = not args.no_peft
    if with_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            with_peft = False
    all_cases = []
    for rows in _parse_rows(args.rows):
        for n in (int(v) for v in args.adapters.split(",")):
            for ranks_mode in args.ranks.split(","):
                all_cases += cases(rows, n, ranks_mode.strip(), args.hidden, dtype, device, with_peft)
    warm, rep = (1, 5) if device == "cpu" else (25, 150)
    results = harness.run(all_cases, log=log, device=device, warmup_ms=warm, rep_ms=rep)
    md = (f"{harness.environment(device)}, {args.dtype}, hidden {args.hidden}; forward only\n\n"
          + harness.table(results, "base (cuBLAS)", ["fusedpeft [bgmv]"] if device != "cpu" else None))
    log(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
    if args.plot:
        harness.plot(results, "base (cuBLAS)", args.plot, f"many adapters, {harness.environment(device)}")
    return results


if __name__ == "__main__":
    main()
