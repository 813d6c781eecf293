"""End-to-end demo: ``python -m fusedpeft demo`` (or ``fusedpeft demo``).

1. builds a small pre-norm transformer in plain torch (token + position embeddings, 2 blocks with
   q/k/v/o attention projections and an up/down MLP, lm head; random weights, no download);
2. injects three adapters on different modules, all active: LoRA ("lora") on the attention
   projections, IA3 ("ia3") on the MLP, with the down projection as a feedforward module, and
   SSF ("ssf", a per-logit scale and shift) on the lm head;
3. trains only the adapters for --steps AdamW steps on a synthetic task: the next token of a
   fixed-rule sequence (x[t+1] = (x[t] + STRIDE) mod V, random start), with a tqdm bar on a
   terminal and plain progress lines (no carriage returns) when the output goes to a file or a pipe;
4. checks the held-out loss fell and the frozen base weights did not move;
5. saves each adapter with ``fusedpeft.save_adapter`` (HF peft's format, one directory each; SSF
   in fusedpeft's own format of the same layout) under --out-dir, or else in a temporary directory
   that is removed once they are reloaded, reloads all three with ``fusedpeft.load_adapter`` into a
   freshly built base model (same seed) and checks its outputs equal the trained model's;
6. prints which backend ran each fused op (``fusedpeft.backend_counts()``).

Exits non-zero when any check fails. On a CPU the default run takes a few seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fusedpeft

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IA3_TARGETS = ["up_proj", "down_proj"]
SSF_TARGETS = ["lm_head"]
ADAPTERS = ("lora", "ia3", "ssf")


# ----------------------------------------------------------------------------- the model
@dataclass
class TinyConfig:
    vocab_size: int = 24
    dim: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_dim: int = 256
    max_len: int = 16


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape

        def heads(z):
            return z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(h)))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.norm(h))


def build_base(seed: int, device, dtype) -> TinyLM:
    """The base model: random weights drawn from ``seed`` (the same seed gives the same model)."""
    torch.manual_seed(seed)
    return TinyLM(TinyConfig()).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- the task
STRIDE = 5  # the rule: x[t+1] = (x[t] + STRIDE) mod V; the first token is random


def make_batch(gen: torch.Generator, batch: int, cfg: TinyConfig, device):
    start = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
    seq = (start + STRIDE * torch.arange(cfg.max_len + 1)) % cfg.vocab_size
    seq = seq.to(device)
    return seq[:, :-1], seq[:, 1:]  # inputs, next-token targets (all determined by the rule)


def lm_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def attach_adapters(model: nn.Module) -> nn.Module:
    """LoRA on attention, IA3 on the MLP, SSF on the lm head: three named adapters on different
    modules, all active."""
    fusedpeft.inject(model, fusedpeft.LoraConfig(target_modules=LORA_TARGETS, r=8, lora_alpha=16, lora_dropout=0.05), "lora")
    fusedpeft.inject(model, fusedpeft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down_proj"]), "ia3")
    fusedpeft.inject(model, fusedpeft.SSFConfig(target_modules=SSF_TARGETS), "ssf")
    fusedpeft.set_adapter(model, list(ADAPTERS))
    return model


# ----------------------------------------------------------------------------- the run
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = "where it runs: auto (the default: the GPU if CUDA is available, else the CPU), cpu, cuda or cuda:N"


def _device_arg(value: str) -> str:
    """--device's type: one of DEVICE_CHOICES, cuda:N with N a device index."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(DEVICE_CHOICES)})")


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = _pick_device(args.device)
    if args.threads or device.type == "cpu":
        # The model is tiny: on a CPU one thread is fastest, and immune to a busy machine.
        torch.set_num_threads(args.threads or 1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    failures: list[str] = []

    def check(ok: bool, what: str):
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    t0 = time.perf_counter()
    print(f"fusedpeft {fusedpeft.__version__} demo: device={device} dtype={args.dtype} seed={args.seed} steps={args.steps}")
    model = build_base(args.seed, device, dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    attach_adapters(model)
    fusedpeft.print_trainable_parameters(model)

    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_ids, eval_targets = make_batch(gen, 256, model.cfg, device)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return lm_loss(model, eval_ids, eval_targets).item()

    loss_before = eval_loss()
    print(f"task: next token of x[t+1] = (x[t] + {STRIDE}) mod {model.cfg.vocab_size}; chance-level loss "
          f"{math.log(model.cfg.vocab_size):.3f}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    first = last = None
    # Progress goes to stderr: a tqdm bar on a terminal; in a file, a pipe or a CI log (stdout or
    # stderr not a terminal) about ten plain lines instead, as a bar's carriage returns garble those.
    interactive = sys.stdout.isatty() and sys.stderr.isatty()
    bar = tqdm(total=args.steps, desc="training", unit="step", dynamic_ncols=True) if interactive else None
    every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        ids, targets = make_batch(gen, args.batch_size, model.cfg, device)
        loss = lm_loss(model, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if first is None else first
        if bar is not None:
            bar.set_postfix(loss=f"{last:.4f}", refresh=False)
            bar.update()
        elif step % every == 0 or step == args.steps:
            sys.stdout.flush()  # keep the order of the lines where stdout and stderr share a log
            print(f"training: step {step}/{args.steps} loss={last:.4f} ({time.perf_counter() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    loss_after = eval_loss()
    print(f"train loss: first step {first:.4f} -> last step {last:.4f}")
    print(f"held-out loss: before {loss_before:.4f} -> after {loss_after:.4f}")

    print("checks:")
    check(loss_after < loss_before, f"held-out loss fell ({loss_before:.4f} -> {loss_after:.4f})")
    if args.steps > 1:
        check(last < first, f"training loss fell ({first:.4f} -> {last:.4f})")
    state = model.state_dict()
    moved = [k for k, v in base_state.items() if not torch.equal(state[_adapted_key(state, k)], v)]
    check(not moved, "frozen base weights unchanged by training" + (f" (moved: {moved[:3]})" if moved else ""))

    # Save each adapter in peft's format, reload them all into a freshly built base model. Without
    # --out-dir they go to a temporary directory, removed when the reload is done (or on an error).
    with contextlib.ExitStack() as cleanup:
        out_dir = args.out_dir
        if not out_dir:
            out_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fusedpeft-demo-"))
            print("adapters go to a temporary directory, removed once they are reloaded (--out-dir DIR keeps them)")
        dirs = {}
        for name in ADAPTERS:
            dirs[name] = os.path.join(out_dir, name)
            fusedpeft.save_adapter(model, dirs[name], adapter_name=name)
            files = sorted(os.listdir(dirs[name]))
            print(f"saved adapter {name!r} to {dirs[name]} ({', '.join(files)})")

        reloaded = build_base(args.seed, device, dtype)
        for name in ADAPTERS:
            fusedpeft.load_adapter(reloaded, dirs[name], adapter_name=name)
    fusedpeft.set_adapter(reloaded, list(ADAPTERS))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        y_trained, y_reloaded = model(eval_ids), reloaded(eval_ids)
        errs = [rel_err(y_reloaded[i], y_trained[i]) for i in range(0, len(eval_ids), 32)]
    err = max(errs)
    print(f"reloaded vs trained outputs: max relative error {err:.3e} (tolerance {tol:.0e})")
    check(err <= tol, "reloaded model reproduces the trained model's outputs")
    with torch.no_grad():
        reloaded_loss = lm_loss(reloaded, eval_ids, eval_targets).item()
    check(abs(reloaded_loss - loss_after) <= 1e-3 * max(1.0, loss_after),
          f"reloaded model's held-out loss {reloaded_loss:.4f} matches {loss_after:.4f}")

    print("backends that ran each fused op (calls):")
    for (op, backend), n in sorted(fusedpeft.backend_counts().items()):
        print(f"  {op}: {backend} x {n}")
    elapsed = time.perf_counter() - t0
    if failures:
        print(f"demo FAILED ({len(failures)} check(s)) in {elapsed:.1f}s: {'; '.join(failures)}")
        return 1
    print(f"demo passed in {elapsed:.1f}s")
    return 0


def _adapted_key(state: dict, key: str) -> str:
    """A base tensor's key after inject (an adapted layer's weight moves under .base_layer)."""
    if key in state:
        return key
    head, _, last = key.rpartition(".")
    return f"{head}.base_layer.{last}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    parser.add_argument("--device", type=_device_arg, default="auto", metavar="{" + ",".join(DEVICE_CHOICES) + "}",
                        help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base model dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model and the data (default 0)")
    parser.add_argument("--out-dir", default=None,
                        help="where the adapters are saved (default: a temporary directory, removed after the reload)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on a CPU device)")
