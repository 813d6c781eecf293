"""Serving many adapters in one batch, layer level: one frozen linear layer, every row its own
LoRA adapter from a bank of slots (``fusedpeft.ops.multi_lora_linear``), forward only.

    python -m benchmarks.serving                                  # 4096 x 4096, r 16 and mixed 8-64
    python -m benchmarks.serving --rows 64,256,32x128 --adapters 1,8,32,128 --ranks 16,mixed --out s.md
    python -m benchmarks.serving --device cpu --hidden 64 --rows 8,2x8 --adapters 1,3   # smoke run
    python -m benchmarks.serving --model-level                    # generate tokens/s, mixed batch vs merged

Rows: decode batches of one row per sequence (64, 256), and prefill batches of sequences x tokens
(32x128: 4096 rows, the sequence's adapter on each of its tokens). Adapters: how many distinct
adapters the batch uses, rows assigned round-robin over sequences. Ranks: one rank for all, or
"mixed" (8, 16, 32, 64 in turn; the bank padded to 64, which the kernels do not pay for).

Variants, on the same inputs in one run:
- "base (cuBLAS)": F.linear(x, W), the floor;
- "fusedpeft": multi_lora_linear as a served model's layer calls it, x (sequences, tokens, K) with one
  slot per sequence (the backend chosen per shape by measurement), and each backend forced: "[triton]"
  (the fused SGMV GEMM), "[bgmv]" (the base GEMM, then a separate shrink and expand, vLLM's scheme: the
  baseline the fused kernel must beat), "[cuda]" (the CUDA C++ BGMV) and "[cublas_batched]" (the base
  GEMM, then per-sequence batched cuBLAS GEMMs) where they can run;
- "peft": peft's own mixed-batch forward (a LoRA layer holding every adapter, ``adapter_names=``).

Only the forward is timed (serving): the table's "train" columns repeat the forward.

--model-level: generate throughput of a random 8-layer Llama-3.2-1B-shaped model (hidden 2048, vocab
32000) for a batch of --sequences sequences, each with its own LoRA adapter (r 16 on every linear layer;
--model-adapters of them, in as many slots) through ``fusedpeft.serving.MultiAdapterModel``, against
the same batch on the same base with one adapter merged into its weights (the cost of one fine-tune
served alone), and against the served model with the first adapter on every sequence (what the
serving layers cost without a mixed batch): tokens/s of each, greedy decoding of --new-tokens after a
--prompt-len prompt, the median of --repeats timed calls after one warm-up call, the variants taking turns.
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


def cases(rows, n_adapters, ranks_mode, hidden, dtype, device, with_peft, graphs=False):
    import fusedpeft
    from fusedpeft.ops import multi_lora_linear
    from fusedpeft.ops.multi_lora import stack_bank

    label, seqs, tokens = rows
    K = N = hidden
    M = seqs * tokens
    group = f"{label} rows, {n_adapters} adapters, r={ranks_mode}"
    base_flops = 2.0 * M * N * K

    def inputs():
        gen = torch.Generator(device=device)
        gen.manual_seed(hash(group) % 2**31)
        # As a served model's layer gets them: x (sequences, tokens, K), one slot per sequence.
        x = torch.randn(seqs, tokens, K, generator=gen, device=device).to(dtype)
        W = (torch.randn(N, K, generator=gen, device=device) / K**0.5).to(dtype)
        seq_slot = torch.arange(seqs, device=device) % n_adapters
        A, *bank = _bank(n_adapters, ranks_mode, K, N, dtype, device, gen)
        # The A slots right after W's rows in one buffer, as a served model's layers hold them
        # (fusedpeft.serving.layers: the ``stacked`` backend's GEMM takes the shrink there).
        W, A = stack_bank(W, A)
        return x, W, seq_slot, (A, *bank)

    def base():
        x, W, _, _ = inputs()
        fwd = lambda: F.linear(x, W)  # noqa: E731
        return fwd, fwd

    def ours(backend):
        def make():
            x, W, idx, (A, B, scalings, ranks, _) = inputs()

            def fwd():
                # graphed: the tuner's pick timed as graph replays where the table times them so
                with torch.no_grad(), (fusedpeft.use_backend(backend) if backend else _nothing()):
                    return multi_lora_linear(x, W, None, A, B, scalings, ranks, idx, graphed=graphs)

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
        seq_names = [names[int(i)] for i in idx.tolist()]  # peft takes one name per sequence of x

        def fwd():
            with torch.no_grad():
                return layer(x, adapter_names=seq_names)

        return fwd, fwd

    out = [harness.Case(group, "base (cuBLAS)", base, flops=base_flops, path="cuBLAS"),
           harness.Case(group, "fusedpeft", ours(None), flops=base_flops,
                        path=lambda: fusedpeft.last_backend("multi_lora_linear"))]
    if device != "cpu":  # every registered GPU candidate (the torch reference aside)
        for name in fusedpeft.backends.registered("multi_lora_linear"):
            if name != "torch":
                out.append(harness.Case(group, f"fusedpeft [{name}]", ours(name), flops=base_flops, path=name))
    if with_peft and not graphs:  # peft's mixed batch reads the adapter names on the host: no capture
        out.append(harness.Case(group, "peft", peft_layer, flops=base_flops, path="peft"))
    if graphs:
        for case in out:
            case.make = _captured(case.make)
    return out


def _captured(make):
    """make, its forward captured in a CUDA graph: the case then times graph replays (GPU time)."""
    def captured():
        fwd, _ = make()
        replay = harness.graphed(fwd)
        return replay, replay

    return captured


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _target_modules(text: str):
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def model_level_setup(args, device, dtype, root):
    """The model-level case: a random Llama-3.2-1B-shaped model (tiny on CPU) served with
    ``args.model_adapters`` random r = 16 adapters written under ``root``, the same base with the
    first adapter merged, the prompt and one adapter name per sequence. Returns (served, merged,
    input_ids, names, generate kwargs)."""
    import copy

    import fusedpeft
    from fusedpeft.serving import MultiAdapterModel
    from fusedpeft.serving.demo import tiny_llama, write_random_lora

    tiny = device == "cpu"
    shape = (dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if tiny else
             dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096))
    base = tiny_llama(0, device="cpu", dtype=torch.float32, **shape)
    prompt = torch.randint(1, shape["vocab_size"], (args.sequences, args.prompt_len))
    n = args.model_adapters
    paths = []
    for i in range(n):
        path = f"{root}/a{i}"
        write_random_lora(base, path, seed=i, r=16, lora_alpha=32, target_modules=args.target_modules)
        paths.append(path)
    compiled = getattr(args, "static_cache", False)
    served = MultiAdapterModel(copy.deepcopy(base).to(device=device, dtype=dtype), target_modules=args.target_modules,
                               max_adapters=n, max_rank=16, max_batch_size=args.sequences, cuda_graphs=compiled)
    for i, path in enumerate(paths):
        served.load_adapter(f"a{i}", path)
    merged = copy.deepcopy(base)
    fusedpeft.load_adapter(merged, paths[0])
    fusedpeft.merge(merged)
    fusedpeft.eject(merged, merge=False)
    merged = merged.to(device=device, dtype=dtype)
    names = [f"a{i % n}" for i in range(args.sequences)]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    if compiled:  # transformers compiles the decode steps of both models (CUDA graphs) with a static cache
        gen["cache_implementation"] = "static"
    return served, merged, prompt.to(device), names, gen


def _decode_bytes_bound(model, target_modules, r, adapters, dtype) -> float:
    """Weight bytes of a decode step over weight plus adapter bytes: every linear weight is read once per
    step (the embedding only by row), and each distinct adapter's A (r x in) and B (out x r) of every
    target layer once more. peft's "all-linear" leaves the output layer out."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = adapter = 0
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weights += module.weight.numel() * size
        leaf = name.rsplit(".", 1)[-1]
        if (module is not output_layer) if target_modules == "all-linear" else leaf in target_modules:
            adapter += adapters * r * (module.in_features + module.out_features) * size
    return weights / (weights + adapter)


def model_level(args, device, dtype, log=print) -> list[dict]:
    """[{variant, tokens_per_s, seconds}] of the mixed batch, the merged single adapter and the served
    model with one adapter on every sequence."""
    import tempfile

    n = args.model_adapters
    with tempfile.TemporaryDirectory() as root:
        served, merged, ids, names, gen = model_level_setup(args, device, dtype, root)
        # The same served model with every sequence on one adapter separates the mixed batch's cost
        # from the serving layers' own (their host time and launches at decode).
        same = [names[0]] * len(names)
        calls = {"fusedpeft mixed batch": lambda: served.generate(input_ids=ids, adapter_names=names, **gen),
                 "one adapter merged": lambda: merged.generate(input_ids=ids, **gen),
                 "fusedpeft, one adapter for every sequence": lambda: served.generate(input_ids=ids,
                                                                                      adapter_names=same, **gen)}
        with torch.no_grad():
            seconds = harness.median_wall_s(calls, args.repeats, device)
        rows = [{"variant": variant, "seconds": s, "tokens_per_s": args.sequences * args.new_tokens / s}
                for variant, s in seconds.items()]
    ref = rows[1]["tokens_per_s"]
    bound = _decode_bytes_bound(merged, args.target_modules, r=16, adapters=min(n, args.sequences), dtype=dtype)
    cache = ", static cache (compiled decode)" if args.static_cache else ""
    lines = [f"{harness.environment(device)}, {args.dtype}; {args.sequences} sequences, {n} adapters, prompt "
             f"{args.prompt_len}, {args.new_tokens} new tokens{cache}", "",
             "| variant | tokens/s | / merged single adapter |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref:.3f} |" for r in rows]
    lines += ["", f"Target modules {args.target_modules}: a decode step of the mixed batch reads the distinct "
                  f"adapters' A and B beside the weights; if bandwidth-bound it runs at most {bound:.3f}x the "
                  "merged model's speed."]
    log("\n".join(lines))
    return rows


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096, help="in_features = out_features of the layer")
    parser.add_argument("--rows", default="64,256,32x128", help="decode row counts and prefill SEQSxTOKENS")
    parser.add_argument("--adapters", default="1,8,32,128", help="distinct adapters in the batch")
    parser.add_argument("--ranks", default="16,mixed", help="a rank, or 'mixed' (8-64), comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke run)")
    parser.add_argument("--no-peft", action="store_true", help="leave peft's layer out")
    parser.add_argument("--warmup-ms", type=float, default=None, help="warm-up per timing (default 25; cpu 1)")
    parser.add_argument("--rep-ms", type=float, default=None, help="timed span per timing (default 150; cpu 5)")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    parser.add_argument("--model-level", action="store_true", help="generate tokens/s instead of the layer table")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--model-adapters", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-modules", type=_target_modules, default="all-linear",
                        help="--model-level: the adapters' target modules, 'all-linear' or comma-separated names "
                             "(peft's default for Llama: q_proj,v_proj)")
    parser.add_argument("--graphs", action="store_true",
                        help="time every variant's forward captured in a CUDA graph (replays: GPU time only, as a "
                             "server that captures its decode steps sees it; peft's layer left out: it cannot be "
                             "captured)")
    parser.add_argument("--static-cache", action="store_true",
                        help="--model-level with a static KV cache: transformers' generate then compiles the decode "
                             "steps of the served and the merged model alike (mode reduce-overhead: CUDA graphs); the "
                             "served model is wrapped with cuda_graphs=True")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.model_level:
        return model_level(args, device, dtype, log)
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
                all_cases += cases(rows, n, ranks_mode.strip(), args.hidden, dtype, device, with_peft,
                                   graphs=args.graphs and device != "cpu")
    warm, rep = (1, 5) if device == "cpu" else (25, 150)
    warm = warm if args.warmup_ms is None else args.warmup_ms
    rep = rep if args.rep_ms is None else args.rep_ms

    def write(results, partial=None):
        captured = "; every forward captured in a CUDA graph (GPU time)" if args.graphs and device != "cpu" else ""
        md = (f"{harness.environment(device)}, {args.dtype}, hidden {args.hidden}; forward only{captured}\n\n"
              + (f"**Partial: {partial} so far.**\n\n" if partial else "")
              + harness.table(results, "base (cuBLAS)", ["fusedpeft [bgmv]"] if device != "cpu" else None))
        if args.out:
            with open(args.out, "w") as f:
                f.write(md + "\n")
        return md

    results = harness.run(all_cases, log=log, device=device, warmup_ms=warm, rep_ms=rep,
                          on_result=harness.after_each_group(
                              all_cases, lambda done: write(done, f"{len(done)} of {len(all_cases)} cases"))
                          if args.out else None)
    log(write(results))
    if args.plot:
        # forward only (the serving ops have no backward); log scale: peft's mixed batch runs 10-1000x the base
        harness.plot(results, "base (cuBLAS)", args.plot, f"many adapters, {harness.environment(device)}",
                     panels=(("fwd_ms", "forward"),), log=True)
    return results


if __name__ == "__main__":
    main()
