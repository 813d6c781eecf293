"""``python -m fusedpeft serve-demo``: many LoRA adapters served in mixed batches, checked one by one.

1. builds a random small ``LlamaForCausalLM`` from a ``LlamaConfig`` (no download; tiny by default,
   seconds on a CPU);
2. writes --adapters random LoRA adapters in peft's format (``fusedpeft.save_adapter``) to a
   temporary directory, removed at the end: ranks 4, 8 and 16 in turn, three target sets (every
   linear layer; q/v; the attention and down_proj with a rank_pattern and alpha_pattern), some with
   use_rslora, random non-zero A and B;
3. wraps a copy of the model in ``MultiAdapterModel`` with --max-adapters slots (fewer than the
   adapters, so adapters are evicted to the host and copied back) and loads every adapter;
4. generates greedily for mixed batches that together use every adapter: each batch has up to
   --max-adapters distinct adapters, base rows (None) and a second row of one adapter;
5. checks every sequence against the same prompt generated alone by a copy of the base model with
   that adapter loaded by ``fusedpeft.load_adapter`` and merged into its weights
   (``fusedpeft.merge``): the same tokens, and logits that agree to a tolerance at every step
   (where two logits tie within the tolerance, rounding may pick either token: the row is
   compared up to that step and the tie is reported);
6. prints a short report, and exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

RANKS = (4, 8, 16)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--adapters", type=int, default=32, help="how many adapters to write and load (default 32)")
    parser.add_argument("--max-adapters", type=int, default=8, help="device slots per layer (default 8)")
    parser.add_argument("--new-tokens", type=int, default=6, help="tokens generated per sequence (default 6)")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt length (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="keep the adapters in this directory (default: a temporary "
                                                         "one, removed at the end)")


# ----------------------------------------------------------------------------- model and adapters
def tiny_llama(seed: int = 0, device="cpu", dtype=torch.float32, **overrides):
    """A random LlamaForCausalLM (eval mode). Its weights are drawn wider than transformers' default
    (initializer_range 0.2) so that greedy decoding meets few near-ties between logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None,
                  eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    return model.to(device=device, dtype=dtype).eval()


def adapter_spec(i: int) -> dict:
    """The LoraConfig fields of demo adapter i: mixed ranks, targets and scalings."""
    r = RANKS[i % len(RANKS)]
    kind = (i + i // len(RANKS)) % 3  # every rank meets every target set
    spec = dict(r=r, lora_alpha=float(2 * r if i % 2 else r // 2), use_rslora=i % 5 == 4)
    if kind == 0:
        spec["target_modules"] = "all-linear"
    elif kind == 1:
        spec["target_modules"] = ["q_proj", "v_proj"]
    else:
        # down_proj at another rank (never above 16) and alpha.
        spec.update(target_modules=ATTENTION + ["down_proj"], rank_pattern={"down_proj": max(2, r // 2)},
                    alpha_pattern={"down_proj": 3.0})
    return spec


def write_random_lora(base, directory: str, seed: int, **config_fields) -> None:
    """Save a LoRA adapter with random non-zero A and B for ``base`` in peft's format."""
    import fusedpeft

    scratch = copy.deepcopy(base)
    fusedpeft.inject(scratch, fusedpeft.LoraConfig(init_lora_weights=False, **config_fields))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in scratch.modules():
            if isinstance(module, fusedpeft.LoraLinear):
                for name in module.lora_A:
                    A, B = module.lora_A[name].weight, module.lora_B[name].weight
                    A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[1]))
                    B.copy_(torch.randn(B.shape, generator=gen) * 0.1)
    fusedpeft.save_adapter(scratch, directory)


def merged_generate(base, adapter_dir: Optional[str], input_ids, **generate_kwargs):
    """Generate with a copy of ``base`` that has the adapter (if any) loaded and merged."""
    import fusedpeft

    model = copy.deepcopy(base)
    if adapter_dir is not None:
        fusedpeft.load_adapter(model, adapter_dir)
        fusedpeft.merge(model)
    with torch.no_grad():
        return model.generate(input_ids=input_ids, **generate_kwargs)


GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def tolerance(logits: torch.Tensor) -> float:
    """How far logits of the served and the merged model may differ: merging rounds W + s B A once,
    the served model adds s (x A^T) B^T to x W^T; on CUDA the GEMMs may run in TF32."""
    rel = 2e-3 if logits.is_cuda else 1e-4 if logits.dtype == torch.float32 else 1e-9
    return rel * max(1.0, float(logits.abs().max()))


def compare(tokens, logits, ref_tokens, ref_logits) -> tuple[str, str]:
    """(verdict, detail): 'ok', 'tie' (tokens differ where the reference's top two logits tie
    within the tolerance: compared up to there) or 'mismatch'. tokens (T,), logits (T, V)."""
    tol = tolerance(ref_logits)
    for t in range(ref_tokens.shape[0]):
        diff = float((logits[t] - ref_logits[t]).abs().max())
        if diff > tol:
            return "mismatch", f"logits differ by {diff:.3g} > {tol:.3g} at new token {t}"
        if int(tokens[t]) != int(ref_tokens[t]):
            top = ref_logits[t].topk(2).values
            gap = float(top[0] - top[1])
            if gap <= 2 * tol:
                return "tie", f"near-tie at new token {t} (top-2 gap {gap:.3g})"
            return "mismatch", f"token {int(tokens[t])} vs {int(ref_tokens[t])} at new token {t} (gap {gap:.3g})"
    return "ok", ""


def check_batch(served, base, dirs: dict, input_ids, adapter_names, new_tokens: int):
    """Generate ``input_ids`` with ``adapter_names`` through ``served`` and compare every row with
    the merged single-sequence reference. Returns [(row, name, verdict, detail)]."""
    kw = dict(GREEDY, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out = served.generate(input_ids=input_ids, adapter_names=adapter_names, **kw)
    P = input_ids.shape[1]
    logits = torch.stack(out.logits, 1)  # (B, T, V)
    results = []
    for row, name in enumerate(adapter_names):
        ref = merged_generate(base, None if name is None else dirs[name], input_ids[row:row + 1], **kw)
        verdict, detail = compare(out.sequences[row, P:], logits[row], ref.sequences[0, P:], torch.stack(ref.logits, 1)[0])
        results.append((row, name, verdict, detail))
    return results


def batches(names: list, slots: int) -> list[list]:
    """Mixed batches covering every adapter: up to ``slots`` distinct adapters each, two base rows
    and a second row of the batch's first adapter."""
    out = []
    for start in range(0, len(names), slots):
        chunk = names[start:start + slots]
        rows = list(chunk)
        rows.insert(len(rows) // 2, None)
        rows += [chunk[0], None]
        out.append(rows)
    return out


# ----------------------------------------------------------------------------- the demo
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("serve-demo: --device cuda but CUDA is not available")
    return device


def run(args: argparse.Namespace) -> int:
    from .model import MultiAdapterModel

    if args.adapters < 1 or args.max_adapters < 1 or args.new_tokens < 1 or args.prompt_len < 1:
        raise SystemExit("serve-demo: --adapters, --max-adapters, --new-tokens and --prompt-len must be >= 1")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    base = tiny_llama(args.seed, device=device)
    cfg = base.config
    print(f"model: random LlamaForCausalLM (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab "
          f"{cfg.vocab_size}) on {device}")

    root = args.out_dir or tempfile.mkdtemp(prefix="fusedpeft-serve-")
    try:
        names = [f"adapter{i:02d}" for i in range(args.adapters)]
        dirs = {n: os.path.join(root, n) for n in names}
        for i, n in enumerate(names):
            write_random_lora(base, dirs[n], seed=args.seed * 1000 + i + 1, **adapter_spec(i))
        ranks = sorted({adapter_spec(i)["r"] for i in range(args.adapters)})
        print(f"wrote {args.adapters} LoRA adapters (ranks {ranks}) in peft's format to {root}")

        served = MultiAdapterModel(copy.deepcopy(base), target_modules="all-linear", max_adapters=args.max_adapters,
                                   max_rank=max(RANKS))
        for n in names:
            served.load_adapter(n, dirs[n])
        print(f"MultiAdapterModel: {len(served.layers)} layers, {args.max_adapters} slots of rank {max(RANKS)}; "
              f"{len(served.resident)} adapters in slots, {len(served.adapters) - len(served.resident)} waiting on the "
              "host")

        gen = torch.Generator().manual_seed(args.seed)
        counts = {"ok": 0, "tie": 0, "mismatch": 0}
        for b, rows in enumerate(batches(names, args.max_adapters)):
            ids = torch.randint(1, cfg.vocab_size, (len(rows), args.prompt_len), generator=gen).to(device)
            before = served.bank.copies
            results = check_batch(served, base, dirs, ids, rows, args.new_tokens)
            for row, name, verdict, detail in results:
                counts[verdict] += 1
                if verdict != "ok":
                    print(f"  batch {b} row {row} ({name or 'base'}): {verdict.upper()}: {detail}")
            print(f"batch {b}: {len(rows)} sequences, {len(set(r for r in rows if r))} adapters + base rows, "
                  f"{served.bank.copies - before} copied in; "
                  f"{sum(v == 'ok' for _, _, v, _ in results)}/{len(rows)} equal to the merged reference")
        print(f"slots: {served.bank.copies} copies into slots, {served.bank.evictions} evictions to the host")
        print(f"result: {counts['ok']} sequences equal, {counts['tie']} near-ties, {counts['mismatch']} mismatches "
              f"({time.perf_counter() - t0:.1f} s)")
        return 1 if counts["mismatch"] else 0
    finally:
        if args.out_dir is None:
            shutil.rmtree(root, ignore_errors=True)
