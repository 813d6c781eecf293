"""fusedpeft under torch.distributed, on CPU: 2 processes on gloo (torch.multiprocessing.spawn),
a tiny transformers Llama, DDP and FSDP2 (fully_shard on each decoder layer, then the root).

One spawn runs every scenario (the processes' start-up, importing transformers and peft, is most
of the time); each rank writes what it saw to a file and the tests below read them. Each scenario
trains a few steps with rank r on rows [r * ROWS, (r + 1) * ROWS) of every step's batch, and is
compared with one process training the same model (same seeds, same initial adapter) on the whole
batch: the mean token loss of the whole batch is the mean of the ranks' mean losses (every rank
has as many tokens), which is what DDP's and FSDP2's averaged gradients train.

Checked besides: what the fused autograd Functions receive under FSDP2 (full plain tensors, not
DTensor shards; in MixedPrecisionPolicy's param_dtype), the files save_adapter writes from a
sharded model (the single process's files, byte for byte, from the same weights; peft loads
them), load_adapter / set_adapter_state_dict into a sharded model, refusals raised on every rank,
DDP's gradient buckets, and no distributed imports on the single-process path."""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

from helpers import rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fusedpeft

WORLD = 2
ROWS = 2  # rows per rank and step
SEQ = 8
STEPS = 3
VOCAB = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (wrapper, how the adapter comes in, method, base dtype, mixed precision, optimizer)
SCENARIOS = {
    "ddp-inject-lora": ("ddp", "inject", "lora", torch.float32, False, "sgd"),
    "ddp-peft-lora": ("ddp", "peft", "lora", torch.float32, False, "adamw"),
    "ddp-inject-ia3": ("ddp", "inject", "ia3", torch.float32, False, "sgd"),
    "fsdp-inject-lora": ("fsdp", "inject", "lora", torch.float32, False, "sgd"),
    "fsdp-peft-lora": ("fsdp", "peft", "lora", torch.float32, False, "adamw"),
    "fsdp-inject-ia3": ("fsdp", "inject", "ia3", torch.float32, False, "sgd"),
    "fsdp-inject-dora": ("fsdp", "inject", "dora", torch.float32, False, "sgd"),
    "fsdp-peft-dora": ("fsdp", "peft", "dora", torch.float32, False, "sgd"),
    "fsdp-mp-inject-lora": ("fsdp", "inject", "lora", torch.bfloat16, True, "sgd"),
    "fsdp-mp-peft-lora": ("fsdp", "peft", "lora", torch.bfloat16, True, "sgd"),
    "fsdp-mp-inject-dora": ("fsdp", "inject", "dora", torch.bfloat16, True, "sgd"),
}
FSDP = [n for n, s in SCENARIOS.items() if s[0] == "fsdp"]
DEADLINE_S = 240


# ----------------------------------------------------------------------------- shared by ranks and reference
def _config(method: str, source: str):
    lib = peft if source == "peft" else fusedpeft
    if method == "ia3":
        return lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False)
    # r = 3: lora_A's rows split unevenly over 2 ranks (2 and 1)
    return lib.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False,
                          use_dora=method == "dora")


def _base(name: str):
    """The scenario's base model, the same weights in every process."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(SCENARIOS[name][3])


def _build(name: str):
    """(model, its decoder layers) of a scenario: the same weights in every process."""
    _, source, method, _, _, _ = SCENARIOS[name]
    base = _base(name)
    torch.manual_seed(1)
    if source == "inject":
        model = fusedpeft.inject(base, _config(method, source))
        return model, model.model.layers
    model = fusedpeft.from_peft(peft.get_peft_model(base, _config(method, source)))
    assert any(isinstance(m, (fusedpeft.LoraLinear, fusedpeft.IA3Linear)) for m in model.modules())
    return model, model.base_model.model.model.layers


def _optimizer(name: str, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if SCENARIOS[name][5] == "adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (WORLD * ROWS, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def _train(model, opt, rows: slice, steps=STEPS, before_step=None, parts=1) -> list[float]:
    """``parts`` > 1: the rows in that many parts, each one's loss / parts backpropagated (gradient
    accumulation: in one process, the sum that DDP and FSDP2 average over the ranks)."""
    losses = []
    for step in range(steps):
        ids = _batch(step)[rows]
        loss = 0.0
        for chunk in ids.chunk(parts):
            part = model(input_ids=chunk, labels=chunk).loss / parts
            part.backward()
            loss += part.item()
        if before_step is not None:
            before_step(step)
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    return losses


def _eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_eval_ids()).logits.float()
    model.train()
    return out


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in fusedpeft.get_adapter_state_dict(model).items()}


# ----------------------------------------------------------------------------- recording the fused ops
class _OpRecorder:
    """Patches the eager autograd Functions of the fused ops (LoRA, DoRA, IA3/SSF) to record, per
    call, the adapter layer running (a forward pre-hook names it) and the type, shape and dtype of
    x, the weight, the bias and the adapter tensors; the backward records the adapter gradients
    it returns (dtype, the adapter's dtype, contiguous, data pointer)."""

    def __init__(self, model):
        from fusedpeft.modules import AdapterLayer
        from fusedpeft.ops import _rescale, dora, lora

        self.calls, self.grads, self.current = [], [], [None]
        self.full = {}  # layer name -> full (out, in) base weight shape, before any sharding
        self.hooks = []
        for name, module in model.named_modules():
            if isinstance(module, AdapterLayer):
                self.full[name] = tuple(module.base_weight().shape)
                self.hooks.append(module.register_forward_pre_hook(
                    lambda m, a, name=name: self.current.__setitem__(0, name)))
        # each Function with its number of adapter tensors (after x, weight, bias)
        functions = [(lora._OP.function, 2), (dora._OP.function, 3), (_rescale._OP.function, 2)]
        self.saved = [(f, f.__dict__["forward"], f.__dict__["backward"]) for f, _ in functions]
        for (f, fwd, bwd), (_, n) in zip(self.saved, functions):
            f.forward = staticmethod(self._forward(fwd.__func__, 3 + n))
            f.backward = staticmethod(self._backward(bwd.__func__))

    def _forward(self, fwd, n):
        def forward(ctx, *args):
            tensors = [(type(a).__name__, tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else None
                       for a in args[:n]]
            self.calls.append((self.current[0], tensors))
            return fwd(ctx, *args)
        return forward

    def _backward(self, bwd):
        def backward(ctx, grad_y):
            grads = bwd(ctx, grad_y)
            n = 3 + len(ctx.adapter_dtypes)
            for g, dtype in zip(grads[3:n], ctx.adapter_dtypes):
                if g is not None:
                    self.grads.append((str(g.dtype), str(dtype), g.is_contiguous(), g.data_ptr()))
            return grads
        return backward

    def close(self):
        for f, fwd, bwd in self.saved:
            f.forward, f.backward = fwd, bwd
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------- the ranks
def _ddp_bucket_check(model) -> dict:
    """After backward under DDP(gradient_as_bucket_view=True): the storages the adapter
    gradients live in (DDP's buckets), and whether every gradient is a view into one of them."""
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
    return {"params": len(grads), "storages": len(storages), "storage_bytes": sum(storages.values()),
            "grad_bytes": sum(g.numel() * g.element_size() for g in grads),
            "all_views": all(g._base is not None for g in grads)}


def _scenario(name: str, rank: int, out_dir: str) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    wrap, source, method, _, mixed, _ = SCENARIOS[name]
    model, layers = _build(name)
    recorder = _OpRecorder(model)
    result: dict = {"rank": rank}
    if wrap == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else \
            MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        wrapped = model
        adapter_params = [p for p in model.parameters() if p.requires_grad]
        result["sharded_params"] = all(isinstance(p, DTensor) for p in adapter_params)
        result["sharded_dtypes"] = sorted({str(p.dtype) for p in adapter_params})
    d = os.path.join(out_dir, name)
    fusedpeft.save_adapter(wrapped, os.path.join(d, "init"))  # every rank calls it: rank 0 writes
    result["initial"] = _snapshot(wrapped)
    checks = {}

    def before_step(step):
        if step == STEPS - 1:
            if wrap == "ddp":
                checks["buckets"] = _ddp_bucket_check(model)
            else:
                grads = [p.grad for p in model.parameters() if p.requires_grad]
                checks["fsdp_grads"] = sorted({(type(g).__name__, str(g.dtype)) for g in grads})

    opt = _optimizer(name, wrapped)
    result["eval_before"] = _eval_logits(wrapped) if method == "dora" else None  # fills DoRA's eval cache, if any
    try:
        result["losses"] = _train(wrapped, opt, slice(rank * ROWS, (rank + 1) * ROWS), before_step=before_step)
    finally:
        recorder.close()
    result["eval_after"] = _eval_logits(wrapped)
    result.update(checks)
    result["op_calls"], result["op_grads"], result["full_shapes"] = recorder.calls, recorder.grads, recorder.full
    result["final"] = _snapshot(wrapped)
    fusedpeft.save_adapter(wrapped, os.path.join(d, "trained"))
    if wrap == "fsdp" and source == "inject":
        result.update(_load_checks(wrapped, rank, d, opt))
    if wrap == "ddp" and source == "inject":
        # Under DDP save_adapter is no collective (rank 0 writes): the others wait to read it.
        torch.distributed.barrier()
        fusedpeft.set_adapter_state_dict(wrapped, {k: torch.zeros_like(v) for k, v in result["final"].items()})
        fusedpeft.load_adapter(wrapped, os.path.join(d, "trained"), is_trainable=True)
        result["reloaded"] = _snapshot(wrapped)
    if wrap == "fsdp" and source == "peft":
        # A peft model's adapter comes back through set_adapter_state_dict (load_adapter injects
        # fusedpeft's own adapters).
        from safetensors.torch import load_file

        fusedpeft.set_adapter_state_dict(wrapped, {k: torch.zeros_like(v) for k, v in result["final"].items()})
        result["zeroed"] = all((v == 0).all() for v in _snapshot(wrapped).values())
        fusedpeft.set_adapter_state_dict(wrapped, load_file(os.path.join(d, "trained", "adapter_model.safetensors")))
        result["reloaded"] = _snapshot(wrapped)
    return result


def _outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def _load_checks(model, rank, d, opt) -> dict:
    """load_adapter / set_adapter_state_dict into the sharded model, and refusals on one rank."""
    out = {}
    trained = os.path.join(d, "trained")
    before = _snapshot(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # One rank has no such directory: both raise, nothing changes, nobody hangs.
    bad = trained if rank == 0 else os.path.join(d, "missing")
    out["refused_one_rank"] = _outcome(lambda: fusedpeft.load_adapter(model, bad, is_trainable=True))
    # A state dict that does not fit, on one rank only.
    sd = dict(before)
    if rank == 1:
        sd.pop(next(iter(sd)))
    out["refused_state_dict"] = _outcome(lambda: fusedpeft.set_adapter_state_dict(model, sd))
    # A new adapter cannot be added to a sharded model.
    out["refused_new"] = _outcome(lambda: fusedpeft.load_adapter(model, trained, adapter_name="other"))
    # Writing parameters outside forward: refused, not half done.
    out["refused_writes"] = [
        _outcome(lambda: fusedpeft.merge(model)),
        _outcome(lambda: fusedpeft.hotswap_adapter(model, before)),
        _outcome(lambda: fusedpeft.delete_adapter(model, "default")),
    ]
    out["unchanged"] = all(torch.equal(before[k], v) for k, v in _snapshot(model).items())
    # Zero the adapter, then load the trained file back.
    fusedpeft.set_adapter_state_dict(model, {k: torch.zeros_like(v) for k, v in before.items()})
    out["zeroed"] = all((v == 0).all() for v in _snapshot(model).values())
    fusedpeft.load_adapter(model, trained, is_trainable=True)
    out["reloaded"] = _snapshot(model)
    out["trainable_after_load"] = sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    # And it trains on from there.
    out["losses_after_load"] = _train(model, opt, slice(rank * ROWS, (rank + 1) * ROWS), steps=1)
    return out


def _cache_checks() -> dict:
    """Values kept by (storage, version) of the adapter tensors: DoRA's eval-mode norm and the
    LoRA layer's stacked bank for adapter_names. FSDP2 all-gathers a changed adapter into the same
    storage and keeps its version counter (torch.autograd._unsafe_preserve_version_counter):
    done here by hand, on a plain layer, with the process group initialized. The outputs after
    the change must be the changed adapter's."""
    from fusedpeft.modules import LoraLinear

    torch.manual_seed(3)
    out = {}
    x = torch.randn(4, 16)
    dora = LoraLinear(torch.nn.Linear(16, 8), r=2, init_lora_weights=False,
                      variant=__import__("fusedpeft.modules.dora", fromlist=["DoraVariant"]).DoraVariant).eval()
    lora = LoraLinear(torch.nn.Linear(16, 8), r=2, init_lora_weights=False).eval()
    lora.update_layer("other", 2, 2, init_lora_weights=False)
    names = ["default", "other", "default", "__base__"]
    for what, layer, run in (("dora", dora, lambda: dora(x)), ("bank", lora, lambda: lora(x, adapter_names=names))):
        with torch.no_grad():
            before = run()
            B = layer.lora_B["default"].weight
            with torch.autograd._unsafe_preserve_version_counter(B):
                B.mul_(2.0)
            after = run()
            layer.__dict__.pop("_dora_cache", None)
            layer.__dict__.pop("_bank_cache", None)
            fresh = run()
        out[what] = (not torch.equal(before, after), torch.equal(after, fresh))
    return out


def _worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                results[name] = _scenario(name, rank, out_dir)
            except Exception:  # noqa: BLE001  (reported by the tests)
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
        results["caches"] = _cache_checks()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        try:  # every rank has saved before any tears the group down (a dead peer: the group's timeout)
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """({scenario: [rank 0's result, rank 1's result]}, the output directory)."""
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("distributed"))
    t0 = time.perf_counter()
    ctx = mp.spawn(_worker, args=(_free_port(), out_dir, list(SCENARIOS)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    saved = [os.path.join(out_dir, f"rank{r}.pt") for r in range(WORLD)]
    while True:
        try:
            if ctx.join(timeout=5):
                break
        except mp.ProcessExitedException as exc:
            # torch's gloo teardown abort on CPU (see test_readme_torchrun_example), once every rank
            # has saved its results, is excused; any other exit is not.
            if exc.signal_name == "SIGABRT" and all(os.path.exists(f) for f in saved):
                break
            raise
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {WORLD} ranks did not finish in {DEADLINE_S} s")
    ranks = [torch.load(f, weights_only=False) for f in saved]
    times = ", ".join(f"{n} {ranks[0][n]['seconds']:.2f} s" for n in SCENARIOS)
    print(f"spawned run: {time.perf_counter() - t0:.1f} s; scenarios on rank 0: {times}")
    return {name: [r.get(name, {"error": "no result"}) for r in ranks] for name in [*SCENARIOS, "caches"]}, out_dir


def _result(runs, name, rank=0) -> dict:
    results, _ = runs
    for r, res in enumerate(results[name]):
        assert "error" not in res, f"{name} failed on rank {r}:\n{res['error']}"
    return results[name][rank]


_REFERENCES: dict = {}


def _reference(name: str, tmp_path_factory, parts: int = 1, as_param_dtype: bool = False) -> dict:
    """One process, the whole batch (in ``parts`` accumulated parts), the same model: the adapter
    before and after training, the eval logits, the files it saves. ``as_param_dtype``: DoRA's
    adapter tensors reach its norm and its op in bf16, as FSDP2's MixedPrecisionPolicy(param_dtype=
    bf16) hands them to the layer: the norm then reads the rounded A and B, and the op returns
    their gradients in bf16 (for float32 masters it writes them in float32, a rounding FSDP's
    bf16 parameters never get)."""
    import fusedpeft.modules.dora as dora_module

    key = (name, parts, as_param_dtype)
    if key not in _REFERENCES:
        model, _ = _build(name)
        d = str(tmp_path_factory.mktemp(f"ref-{name}-{parts}"))
        save = (lambda m, p: m.save_pretrained(p)) if SCENARIOS[name][1] == "peft" else fusedpeft.save_adapter
        save(model, os.path.join(d, "init"))
        initial = _snapshot(model)
        opt = _optimizer(name, model)
        norm, op = dora_module.dora_weight_norm, dora_module.dora_linear
        if as_param_dtype:
            bf16 = torch.bfloat16
            dora_module.dora_weight_norm = lambda w, A, B, *rest: norm(w, A.to(bf16), B.to(bf16), *rest)
            dora_module.dora_linear = lambda x, w, b, A, B, s, m, *rest, **kw: op(x, w, b, A.to(bf16), B.to(bf16), s,
                                                                               m.to(bf16), *rest, **kw)
        try:
            eval_before = _eval_logits(model) if SCENARIOS[name][2] == "dora" else None
            losses = _train(model, opt, slice(0, WORLD * ROWS), parts=parts)
            eval_after = _eval_logits(model)
        finally:
            dora_module.dora_weight_norm, dora_module.dora_linear = norm, op
        _REFERENCES[key] = {"initial": initial, "final": _snapshot(model), "losses": losses, "dir": d,
                            "eval_before": eval_before, "eval_after": eval_after}
        save(model, os.path.join(d, "trained"))
    return _REFERENCES[key]


# ----------------------------------------------------------------------------- training equals one process
def _compare(name, r0, r1, ref, tol, what, logits_tol=1e-5):
    assert sorted(r0["final"]) == sorted(ref["final"])
    errors = []
    for k, v in ref["initial"].items():
        assert torch.equal(r0["initial"][k], v), f"{name}: the initial adapter differs at {k}"
    for k, v in ref["final"].items():
        assert torch.equal(r0["final"][k], r1["final"][k]), f"{name}: the ranks' adapters differ at {k}"
        assert v.dtype == r0["final"][k].dtype == torch.float32
        update, ref_update = r0["final"][k] - ref["initial"][k], v - ref["initial"][k]
        assert ref_update.norm() > 0, f"{name}: {k} did not train"
        errors.append((rel_err(update, ref_update), k))
    worst = max(errors)
    print(f"{name} vs {what}: worst relative error of an adapter update {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= tol, f"{name}: {worst[1]}: update differs from {what}'s by {worst[0]:.2e} > {tol:.0e}"
    mean_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean_losses == pytest.approx(ref["losses"], rel=tol)
    logits_err = rel_err(r0["eval_after"], ref["eval_after"])
    assert logits_err <= logits_tol, f"{name}: eval logits differ from {what}'s by {logits_err:.2e}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trains_as_one_process(runs, name, tmp_path_factory):
    """The adapter after STEPS steps on 2 ranks equals one process's on the whole batch (its change
    over the run, relative error); both ranks hold the same adapter; the losses (the ranks' mean)
    and the eval logits after training agree.

    float32: to 1e-4. A bf16 base (mixed precision): one process accumulating the ranks' halves
    (each loss / 2) computes what the ranks compute (the same bf16 products, float32 sums), so it
    must agree to 1e-4 (measured: exactly; for DoRA once its norm reads the bf16 A and B that
    FSDP2's param_dtype hands the layer, see _reference); against the whole batch in one bf16
    pass, where products round differently, the bound is bf16's: measured up to 3e-2 for LoRA and
    1.2e-1 for DoRA, whose magnitude's update is the most sensitive to rounding (one process
    against itself, the norm from float32 or from bf16 A and B: 1.4e-1)."""
    r0, r1 = _result(runs, name, 0), _result(runs, name, 1)
    if SCENARIOS[name][3] == torch.float32:
        _compare(name, r0, r1, _reference(name, tmp_path_factory), 1e-4, "one process")
    else:
        _compare(name, r0, r1, _reference(name, tmp_path_factory, parts=WORLD, as_param_dtype=True), 1e-4,
                 "one process accumulating the halves")
        _compare(name, r0, r1, _reference(name, tmp_path_factory), 0.2, "one process, one bf16 pass", 0.1)


# ----------------------------------------------------------------------------- what the ops receive
@pytest.mark.parametrize("name", FSDP)
def test_fsdp2_ops_receive_full_plain_tensors(runs, name):
    """Under FSDP2 the fused Functions get, for every adapter layer and on every rank, the full
    unsharded weight and adapter tensors as plain tensors (never DTensor shards), in the mixed
    precision policy's param_dtype; between steps the adapter parameters are float32 DTensor
    shards and their gradients float32 DTensors (the reduce dtype)."""
    dtype = SCENARIOS[name][3]
    for rank in range(WORLD):
        res = _result(runs, name, rank)
        assert res["sharded_params"]
        assert res["sharded_dtypes"] == ["torch.float32"]
        assert res["fsdp_grads"] == [("DTensor", "torch.float32")]
        calls, full = res["op_calls"], res["full_shapes"]
        assert {layer for layer, _ in calls} == set(full), "an adapter layer never reached its fused op"
        for layer, tensors in calls:
            x, weight = tensors[0], tensors[1]
            assert weight[0] in ("Parameter", "Tensor") and weight[1] == full[layer], (layer, weight, full[layer])
            assert x[2] == weight[2] == str(dtype)
            adapters = [t for t in tensors[3:] if t is not None]
            for kind, _, adtype in adapters:
                assert kind in ("Parameter", "Tensor"), (layer, kind)
                # fp32 masters: FSDP2 hands them over in param_dtype (bf16) under mixed precision
                assert adtype == ("torch.bfloat16" if SCENARIOS[name][4] else "torch.float32"), (layer, adtype)
            if SCENARIOS[name][2] != "ia3":
                (_, a_shape, _), (_, b_shape, _) = adapters[:2]
                assert a_shape[1] == full[layer][1] and b_shape[0] == full[layer][0], (layer, a_shape, b_shape)
            else:
                assert adapters[0][1][0] in full[layer]


def test_no_stale_caches_under_torch_distributed(runs):
    """DoRA's eval-mode norm and the adapter_names bank are kept in one process while the adapter
    tensors keep their storage and version. FSDP2 all-gathers changed adapters into the same
    storage with the version kept (on CUDA's caching allocator the address repeats; on CPU it
    mostly does not, so this is done by hand): with a process group initialized nothing is kept,
    and the output follows the adapter."""
    for rank in range(WORLD):
        caches = runs[0]["caches"][rank]
        assert "error" not in caches, caches["error"]
        for what, (changed, fresh) in caches.items():
            assert changed and fresh, f"{what}: the output after the change is the old adapter's"


def test_fsdp2_dora_eval_after_training(runs, tmp_path_factory):
    """DoRA's eval output before and after training under FSDP2 equals one process's (and
    differs from before: no norm from before training is reused)."""
    for name in ("fsdp-inject-dora", "fsdp-peft-dora"):
        ref = _reference(name, tmp_path_factory)
        res = _result(runs, name)
        assert rel_err(res["eval_before"], ref["eval_before"]) <= 1e-5
        assert rel_err(res["eval_after"], ref["eval_after"]) <= 1e-5
        assert rel_err(res["eval_after"], res["eval_before"]) > 1e-3


# ----------------------------------------------------------------------------- files
def _files(d: str) -> dict:
    out = {}
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(d, f), "rb") as file:
            out[f] = file.read()
    config = json.loads(out["adapter_config.json"])
    # peft keeps target_modules as a set and writes it in the set's order, which Python's string
    # hashing changes from process to process: compared as a set.
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    out["adapter_config.json"] = config
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_saved_files_are_one_process_files(runs, name, tmp_path_factory):
    """save_adapter called on every rank of the distributed model writes (on rank 0) the files one
    process writes: byte for byte from the same (initial) weights (peft's own save_pretrained for a
    from_peft model); after training, the same keys, float32, the values the ranks hold."""
    from safetensors.torch import load_file

    ref = _reference(name, tmp_path_factory)
    res = _result(runs, name)
    _, out_dir = runs
    d = os.path.join(out_dir, name)
    assert _files(os.path.join(d, "init")) == _files(os.path.join(ref["dir"], "init"))
    trained = load_file(os.path.join(d, "trained", "adapter_model.safetensors"))
    assert sorted(trained) == sorted(res["final"])
    for k, v in trained.items():
        assert v.dtype == torch.float32 and torch.equal(v, res["final"][k]), k
    with open(os.path.join(d, "trained", "adapter_config.json")) as f:
        assert "FSDP" not in f.read()


@pytest.mark.parametrize("name", ["fsdp-inject-lora", "fsdp-peft-lora", "fsdp-mp-inject-lora", "fsdp-inject-ia3",
                                  "fsdp-inject-dora", "ddp-inject-lora"])
def test_peft_loads_the_saved_file(runs, name):
    """peft.PeftModel.from_pretrained loads the file a distributed model wrote; its logits are the
    distributed model's after training."""
    res = _result(runs, name)
    _, out_dir = runs
    pm = peft.PeftModel.from_pretrained(_base(name), os.path.join(out_dir, name, "trained"))
    assert not any(isinstance(m, fusedpeft.modules.AdapterLayer) for m in pm.modules())
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=_eval_ids()).logits.float()
    tol = 1e-5 if SCENARIOS[name][3] == torch.float32 else 2e-2
    assert rel_err(logits, res["eval_after"]) <= tol


def test_load_adapter_into_sharded_model(runs):
    """load_adapter into an FSDP2-sharded model: a directory missing on one rank, a state dict
    that does not fit on one rank and a new adapter name are refused on both ranks, as are merge,
    hotswap_adapter and delete_adapter, the model unchanged; the trained file loads back into the
    zeroed shards, trainable as before, and training goes on."""
    from safetensors.torch import load_file

    _, out_dir = runs
    for name in ("fsdp-inject-lora", "fsdp-inject-ia3", "fsdp-inject-dora", "fsdp-mp-inject-lora",
                 "fsdp-mp-inject-dora"):
        r0, r1 = _result(runs, name, 0), _result(runs, name, 1)
        assert r1["refused_one_rank"].startswith("FileNotFoundError: adapter directory"), r1["refused_one_rank"]
        assert r0["refused_one_rank"].startswith("RuntimeError: loading the adapter in") and \
            "failed on rank(s) [1]" in r0["refused_one_rank"], r0["refused_one_rank"]
        assert r1["refused_state_dict"].startswith("ValueError: state dict does not fit"), r1["refused_state_dict"]
        assert "failed on rank(s) [1]" in r0["refused_state_dict"], r0["refused_state_dict"]
        file = load_file(os.path.join(out_dir, name, "trained", "adapter_model.safetensors"))
        for res in (r0, r1):
            assert "cannot load" in res["refused_new"] and "sharded by FSDP2" in res["refused_new"], res["refused_new"]
            for refused in res["refused_writes"]:
                assert refused.startswith("NotImplementedError") and "sharded by FSDP2" in refused, refused
            assert res["unchanged"] and res["zeroed"] and res["trainable_after_load"]
            assert sorted(res["reloaded"]) == sorted(file)
            for k, v in file.items():
                assert torch.equal(res["reloaded"][k], v), k
            assert len(res["losses_after_load"]) == 1


def test_load_adapter_through_ddp_wrapper(runs):
    """load_adapter and set_adapter_state_dict look through DistributedDataParallel."""
    for name in ("ddp-inject-lora", "ddp-inject-ia3"):
        for rank in range(WORLD):
            res = _result(runs, name, rank)
            assert all(torch.equal(res["reloaded"][k], v) for k, v in res["final"].items())


def test_set_adapter_state_dict_into_sharded_peft_model(runs):
    from safetensors.torch import load_file

    _, out_dir = runs
    for name in ("fsdp-peft-lora", "fsdp-mp-peft-lora", "fsdp-peft-dora"):
        file = load_file(os.path.join(out_dir, name, "trained", "adapter_model.safetensors"))
        for rank in range(WORLD):
            res = _result(runs, name, rank)
            assert res["zeroed"]
            assert sorted(res["reloaded"]) == sorted(file)
            assert all(torch.equal(res["reloaded"][k], v) for k, v in file.items())


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["ddp-inject-lora", "ddp-peft-lora", "ddp-inject-ia3"])
def test_ddp_adapter_gradients_are_bucket_views(runs, name):
    """Under DDP(gradient_as_bucket_view=True) every adapter gradient is a view into DDP's flat
    gradient buckets (the reducer copied the fused backward's gradient into the bucket once, and
    param.grad is the bucket from then on); the fused Functions return each gradient contiguous
    and in its parameter's dtype, which autograd's AccumulateGrad takes as it is (no copy)."""
    for rank in range(WORLD):
        res = _result(runs, name, rank)
        b = res["buckets"]
        assert b["all_views"], b
        assert b["storages"] <= 2 and b["storage_bytes"] >= b["grad_bytes"], b
        assert res["op_grads"] and all(g == d and contiguous for g, d, contiguous, _ in res["op_grads"])


@pytest.mark.parametrize("case", ["lora", "lora-bf16-base", "ia3", "dora", "dora-bf16-base"])
def test_fused_gradients_taken_without_copy(case):
    """One process: after backward, each adapter parameter's .grad IS the tensor the fused
    Function returned (the same memory): autograd took it without a copy. That tensor is what
    DDP's reducer copies into its bucket (once) and FSDP2 into its reduce-scatter input (once)."""
    from fusedpeft.modules import AdapterLayer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if case.endswith("bf16-base") else torch.float32
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).to(dtype)
    method = case.split("-")[0]
    if method == "ia3":
        config = fusedpeft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False)
    else:
        config = fusedpeft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False,
                                      use_dora=method == "dora")
    fusedpeft.inject(model, config)
    assert sum(isinstance(m, AdapterLayer) for m in model.modules()) == 2
    recorder = _OpRecorder(model)
    try:
        model(torch.randn(5, 16, dtype=dtype)).float().square().sum().backward()
    finally:
        recorder.close()
    returned = {ptr for *_, ptr in recorder.grads}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params and len(recorder.grads) >= len(params)
    for n, p in params:
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32, n
        assert p.grad.data_ptr() in returned, f"{n}: .grad is a copy of the gradient the fused op returned"


# ----------------------------------------------------------------------------- one process stays as it was
def test_single_process_path_imports_nothing_distributed(tmp_path):
    """Without a process group, save/load/get/set and DoRA training and eval import none of
    torch.distributed's DTensor or FSDP modules (no cost on the single-process path)."""
    code = f"""
import sys, torch, fusedpeft
m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
fusedpeft.inject(m, fusedpeft.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
m(torch.randn(3, 8)).sum().backward()
m.eval(); m(torch.randn(3, 8))
fusedpeft.save_adapter(m, {str(tmp_path)!r})
fusedpeft.load_adapter(m, {str(tmp_path)!r})
fusedpeft.set_adapter_state_dict(m, fusedpeft.get_adapter_state_dict(m))
bad = [k for k in sys.modules if k.startswith(("torch.distributed.tensor", "torch.distributed.fsdp"))]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_readme_torchrun_example(tmp_path):
    """README's "Distributed training" example, run as it says (torchrun, 2 processes; gloo on
    CPU): it trains, rank 0 writes the adapter, and peft loads it."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Distributed training", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "torchrun --nproc_per_node=2 train_fsdp.py" in code
    (tmp_path / "train_fsdp.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_fsdp.py"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    # torch's gloo backend on CPU can abort a worker as the process group is torn down, after the script
    # has done its work ("terminate called without an active exception", SIGABRT). It happens as often
    # without fusedpeft imported (torch 2.13, this example without the inject and save lines). That exit
    # alone is excused; an exception in the script (a traceback through train_fsdp.py) is not.
    teardown_abort = ("terminate called without an active exception" in done.stderr
                      and 'train_fsdp.py", line' not in done.stderr and "exitcode  : -6" in done.stderr)
    assert done.returncode == 0 or teardown_abort, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("last loss") == 1  # rank 0 only
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter_out"))
    B = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert B.dtype == torch.float32 and B.abs().sum() > 0  # trained (B starts at zero)
