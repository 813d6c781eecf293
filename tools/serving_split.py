"""Where a mixed-adapter decode step goes (GPU), for the model of ``benchmarks.serving --model-level``:
the tuner's measured candidates for each serving shape key, then, for a decode-shaped forward (one
token per sequence) of the served model and of the same base with one adapter merged, the
CUDA-event time, the GPU time of its kernels (torch.profiler), the host time of issuing it (the
device kept busy, tools.layer_split.host_us) and the number of launches; the same for one serving
layer under each backend beside its base layer (decode and prefill shapes), the top of cProfile for the served step, and the
generate calls themselves (wall time and the top of cProfile, served and merged). A
step whose event time follows its host time is host-bound: faster kernels do not help it.

    python -m tools.serving_split [--sequences 32] [--model-adapters 32] [--prompt-len 128] [--top 15]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import fusedpeft
from benchmarks import harness
from benchmarks.serving import model_level_setup
from fusedpeft import tuning
from tools.layer_split import HEADER, split_row, tuner_line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--model-adapters", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens of the warm-up generate calls")
    parser.add_argument("--timed-tokens", type=int, default=32, help="new tokens of the timed generate calls")
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls of each variant, in turns")
    parser.add_argument("--top", type=int, default=15,
                        help="cProfile rows of the served step and generate calls (0: none)")
    args = parser.parse_args(argv)
    device, dtype = "cuda", torch.bfloat16
    with tempfile.TemporaryDirectory() as root, torch.no_grad():
        served, merged, ids, names, gen = model_level_setup(args, device, dtype, root)
        served.generate(input_ids=ids, adapter_names=names, **gen)  # tunes every shape key it meets
        merged.generate(input_ids=ids, **gen)
        print("tuner's measurements (ms per candidate) of the serving ops:")
        for entry in tuning.LOG:
            if entry["op"].startswith("multi_"):
                print(f"  {entry['op']} {entry['key']}: {tuner_line(entry, 4)}"
                      + (f"; errors {entry['errors']}" if entry["errors"] else ""))

        token = ids[:, -1:]
        served.activate(names)
        print(f"\ndecode-shaped forward ({args.sequences} sequences x 1 token, no KV cache)\n{HEADER}")
        print(split_row("served, mixed batch", lambda: served.model(input_ids=token)))
        print(split_row("one adapter merged", lambda: merged(input_ids=token)))

        block = served.model.model.layers[0]
        # Decode (one row per sequence), then prefill (the prompt's rows, one slot per sequence).
        shapes = [(name, (args.sequences,)) for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
        shapes += [(name, (args.sequences, args.prompt_len)) for name in ("self_attn.q_proj", "mlp.down_proj")]
        for name, lead in shapes:
            layer = block.get_submodule(name)
            x = torch.randn(*lead, layer.in_features, device=device, dtype=dtype)
            print(f"\none serving layer, {name} {layer.in_features} -> {layer.out_features}, x {tuple(x.shape)}\n"
                  f"{HEADER}")
            print(split_row("base layer", lambda: layer.base_layer(x)))
            print(split_row("serving layer (tuned)", lambda: layer(x), each=True))
            candidates = [b for b in fusedpeft.backends.registered("multi_lora_linear") if b != "torch"]
            for backend in candidates + (["torch"] if x.dim() == 2 else []):
                try:
                    with fusedpeft.use_backend(backend):
                        # The kernels of the prefill's batched GEMMs, one by one.
                        each = backend in ("cublas_batched", "sgmv_cublas") and x.dim() == 3
                        print(split_row(f"serving layer [{backend}]", lambda: layer(x), each=each))
                except Exception as exc:  # a backend that cannot run here is reported, not fatal
                    print(f"  serving layer [{backend}]: {type(exc).__name__}: {str(exc)[:200]}")
        if args.top:
            print("\ncProfile of the served step:")
            print("\n".join("  " + row[:150] for row in harness.profile_rows(
                lambda: served.model(input_ids=token), 20, args.top)))

        # The generate calls themselves (prefill, then the KV-cache decode loop), as the model-level
        # benchmark times them, and where the host spends a served one.
        timed = dict(gen, max_new_tokens=args.timed_tokens, min_new_tokens=args.timed_tokens)
        calls = {"served, mixed batch": lambda: served.generate(input_ids=ids, adapter_names=names, **timed),
                 "one adapter merged": lambda: merged.generate(input_ids=ids, **timed)}
        print(f"\ngenerate, {args.sequences} sequences, prompt {args.prompt_len}, {args.timed_tokens} new tokens "
              "(wall ms, median of {args.repeats}, in turns)")
        for label, seconds in harness.median_wall_s(calls, args.repeats, device).items():
            print(f"  {label:34s} {seconds * 1e3:9.1f}")
        if args.top:
            for label, call in calls.items():
                print(f"\ncProfile of one generate call, {label}:")
                print("\n".join("  " + row[:150] for row in harness.profile_rows(call, 1, args.top)))


if __name__ == "__main__":
    main()
