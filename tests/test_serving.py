"""fusedpeft.serving: the adapter bank (load, unload, evict, reload), mixed batches against each
adapter merged alone, generate, refusals that leave the bank as it was, peft-written files, GPT-2's
Conv1D, the serve-demo, and (on a GPU) a decode step captured in a CUDA graph."""
import copy
import inspect
import json
import math
import os

import pytest
import torch

import fusedpeft
from fusedpeft.serving import BASE, MultiAdapterModel, SlotTable
from fusedpeft.serving import demo

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base():
    return demo.tiny_llama(seed=7)


@pytest.fixture(scope="module")
def lora_dirs(base, tmp_path_factory):
    """Six LoRA adapters of mixed ranks and targets (demo.adapter_spec), and one of rank 32."""
    root = tmp_path_factory.mktemp("lora")
    dirs = {}
    for i in range(6):
        dirs[f"a{i}"] = str(root / f"a{i}")
        demo.write_random_lora(base, dirs[f"a{i}"], seed=100 + i, **demo.adapter_spec(i))
    dirs["big"] = str(root / "big")
    demo.write_random_lora(base, dirs["big"], seed=99, r=32, lora_alpha=16, target_modules=["q_proj"])
    return dirs


def write_random_ia3(base, directory, seed, target_modules, feedforward_modules):
    scratch = copy.deepcopy(base)
    fusedpeft.inject(scratch, fusedpeft.IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules,
                                                  init_ia3_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in scratch.modules():
            if isinstance(m, fusedpeft.IA3Linear):
                for p in m.ia3_l.values():
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    fusedpeft.save_adapter(scratch, directory)


@pytest.fixture(scope="module")
def ia3_dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ia3")
    specs = {
        "i0": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        "i1": (["q_proj", "up_proj", "down_proj"], ["down_proj"]),
        "i2": (["v_proj"], []),
    }
    dirs = {}
    for i, (name, (targets, ff)) in enumerate(specs.items()):
        dirs[name] = str(root / name)
        write_random_ia3(base, dirs[name], 200 + i, targets, ff)
    return dirs


def served_lora(base, dirs, names, max_adapters=3, max_rank=16, **kw):
    served = MultiAdapterModel(copy.deepcopy(base), target_modules=kw.pop("target_modules", "all-linear"),
                               max_adapters=max_adapters, max_rank=max_rank, **kw)
    for n in names:
        served.load_adapter(n, dirs[n])
    return served


def merged_logits(base, adapter_dir, ids):
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        fusedpeft.load_adapter(model, adapter_dir)
        fusedpeft.merge(model)
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_rows(served, base, dirs, ids, names, atol=1e-4):
    out = served(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        name = None if name == BASE else name
        ref = merged_logits(base, None if name is None else dirs[name], ids[row:row + 1])[0]
        torch.testing.assert_close(out[row], ref, atol=atol, rtol=1e-4, msg=f"row {row} ({name})")
    return out


def snapshot(served):
    """Everything a refused call must leave as it was."""
    batch = served._batch
    return dict(
        adapters=list(served.adapters),
        resident=list(served.resident.items()),
        free=list(served.bank.table.free),
        buffers={k: v.clone() for k, v in served.bank.buffers().items()},
        pointers={k: v.data_ptr() for k, v in served.bank.buffers().items()},
        filled={m: sorted(l.filled) for m, l in served.layers.items()},
        feedforward={m: getattr(l, "feedforward", None) for m, l in served.layers.items()},
        batch=(batch.n, batch.slots, batch.stale, {str(d): b.clone() for d, b in batch.buffers.items()}),
        names=list(served._names),
        counts=(served.bank.copies, served.bank.evictions),
        store={n: {m: [t.clone() for t in ((e.A, e.B) if hasattr(e, "A") else (e.scale,))]
                   for m, e in a.entries.items()} for n, a in served.bank.store.items()},
    )


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key in ("buffers", "store"):
            assert a[key].keys() == b[key].keys(), key
            for k in a[key]:
                torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0, msg=f"{key}[{k}] changed")
        elif key == "batch":
            assert a[key][:3] == b[key][:3]
            for d in a[key][3]:
                assert torch.equal(a[key][3][d], b[key][3][d]), "batch index changed"
        else:
            assert a[key] == b[key], f"{key} changed: {a[key]} -> {b[key]}"


def slot_tensors(served, module, slot):
    layer = served.layers[module]
    return layer.lora_A[slot], layer.lora_B[slot], int(layer.ranks[slot]), float(layer.scalings[slot])


# ----------------------------------------------------------------------------- the slot table
def test_slot_table_plan_apply_lru():
    table = SlotTable(3)
    for name in ("a", "b", "c"):
        table.apply(table.plan([name]))
    assert list(table.resident.items()) == [("a", 0), ("b", 1), ("c", 2)] and table.free == []
    table.apply(table.plan(["a"]))  # a touched: b is now the least recently used
    assert list(table.resident) == ["b", "c", "a"]
    plan = table.plan(["d", "c"])
    assert plan.fills == [("d", 1, "b")]  # b evicted, c (in the batch) kept
    assert list(table.resident) == ["b", "c", "a"]  # planning changes nothing
    table.apply(plan)
    assert list(table.resident.items()) == [("a", 0), ("d", 1), ("c", 2)]
    with pytest.raises(ValueError, match="4 distinct adapters but the bank has 3 slots"):
        table.plan(["a", "b", "c", "d"])
    assert table.plan(["e"], protect=["a", "d"]).fills == [("e", 2, "c")]
    with pytest.raises(ValueError, match="no slot"):
        table.plan(["e"], protect=["a", "d", "c"])
    assert table.remove("d") == 1 and table.free == [1]
    assert table.plan(["e"]).fills == [("e", 1, None)]  # a free slot before any eviction


# ----------------------------------------------------------------------------- load, evict, unload
def test_load_fills_free_slots_then_waits_on_host(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1", "a2", "a3", "a4"])
    assert served.adapters == ["a0", "a1", "a2", "a3", "a4"]
    assert list(served.resident.items()) == [("a0", 0), ("a1", 1), ("a2", 2)]
    assert served.bank.copies == 3 and served.bank.evictions == 0
    # a1 (rank 8) targets q_proj and v_proj only (adapter_spec(1)): rank 0 and zeros elsewhere.
    A, B, r, s = slot_tensors(served, "model.layers.0.self_attn.k_proj", 1)
    assert r == 0 and s == 0 and not A.any() and not B.any()
    A, B, r, s = slot_tensors(served, "model.layers.0.self_attn.q_proj", 1)
    spec = demo.adapter_spec(1)
    assert r == spec["r"] == 8 and s == pytest.approx(spec["lora_alpha"] / 8)
    assert A[:r].abs().min() > 0 and not A[r:].any() and not B[:, r:].any()
    # rank_pattern / alpha_pattern (adapter_spec(2): down_proj at r // 2, alpha 3) and the file's tensors.
    from fusedpeft.io.peft_format import _read_weights

    A, B, r, s = slot_tensors(served, "model.layers.1.mlp.down_proj", 2)
    assert r == 16 // 2 and s == pytest.approx(3.0 / 8)
    file = _read_weights(lora_dirs["a2"])
    assert torch.equal(A[:r], file["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    assert torch.equal(B[:, :r], file["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])


def test_evict_reload_keeps_buffers_and_zeroes_stale_rows(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1", "a2", "a3", "a4", "a5"])
    pointers = {k: v.data_ptr() for k, v in served.bank.buffers().items()}
    q0 = "model.layers.0.self_attn.q_proj"
    assert slot_tensors(served, q0, 2)[2] == 16  # a2: rank 16 everywhere but down_proj
    ids = torch.randint(1, 96, (4, 5))
    # a3 (rank 4) and a4 are on the host: the least recently used adapters not in the batch (a1,
    # a2) go; the batch's adapters become the most recently used, in the order they first appear.
    check_rows(served, base, lora_dirs, ids, ["a3", None, "a0", "a4"])
    assert list(served.resident.items()) == [("a3", 1), ("a0", 0), ("a4", 2)]
    assert served.bank.evictions == 2
    A, B, r, _ = slot_tensors(served, q0, 1)  # a3, rank 4, in a slot a1 (rank 8) held
    assert r == 4 and A[:4].abs().min() > 0 and not A[4:].any() and not B[:, 4:].any()
    A, B, r, _ = slot_tensors(served, q0, 2)  # a4 (rank 8) where a2 (rank 16) was
    assert r == 8 and not A[8:].any() and not B[:, 8:].any()
    # Evicted adapters come back from the host, bit for bit.
    check_rows(served, base, lora_dirs, ids, ["a2", "a1", BASE, "a2"])
    assert list(served.resident.items()) == [("a4", 2), ("a2", 1), ("a1", 0)]
    check_rows(served, base, lora_dirs, ids[:3], ["a5", "a4", "a2"])
    assert {k: v.data_ptr() for k, v in served.bank.buffers().items()} == pointers
    # The slots hold exactly the host copies.
    for name, slot in served.resident.items():
        for module, entry in served.bank.store[name].entries.items():
            layer = served.layers[module]
            assert torch.equal(layer.lora_A[slot], entry.A) and torch.equal(layer.lora_B[slot], entry.B)


def test_unload_frees_and_clears_the_slot(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1", "a2", "a3"])
    served.unload_adapter("a1")
    assert served.adapters == ["a0", "a2", "a3"] and served.bank.table.free == [1]
    for module in served.layers:
        A, B, r, s = slot_tensors(served, module, 1)
        assert r == 0 and s == 0 and not A.any() and not B.any()
    served.unload_adapter("a3")  # never resident: only the host copy goes
    assert served.adapters == ["a0", "a2"] and list(served.resident) == ["a0", "a2"]
    served.load_adapter("a1", lora_dirs["a1"])  # loaded again, into the free slot
    assert served.resident["a1"] == 1
    check_rows(served, base, lora_dirs, torch.randint(1, 96, (3, 4)), ["a1", "a0", "a2"])


def test_unloading_an_adapter_of_the_current_batch(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1"])
    ids = torch.randint(1, 96, (2, 4))
    served.activate(["a0", "a1"])
    served.unload_adapter("a1")
    with torch.no_grad(), pytest.raises(RuntimeError, match="'a1' of the current batch was unloaded"):
        served.model(input_ids=ids)
    check_rows(served, base, lora_dirs, ids, ["a0", None])  # a new call sets a new batch


def test_prefetch_copies_ahead_without_touching_the_batch(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1", "a2", "a3", "a4"])
    served.activate(["a1", None])
    served.prefetch(["a3"])  # the least recently used adapter outside the batch goes: a0
    assert list(served.resident.items()) == [("a2", 2), ("a1", 1), ("a3", 0)]
    state = snapshot(served)
    with pytest.raises(ValueError, match="no slot"):
        served.prefetch(["a4", "a0", "a2"])  # would need a1's slot, which the current batch reads
    assert_same(state, snapshot(served))
    before = served.bank.copies
    check_rows(served, base, lora_dirs, torch.randint(1, 96, (2, 4)), ["a3", "a1"])
    assert served.bank.copies == before  # both resident already


def test_index_buffer_grows_for_a_larger_batch(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1"], max_batch_size=2)
    check_rows(served, base, lora_dirs, torch.randint(1, 96, (5, 3)), ["a0", None, "a1", "a1", "a0"])
    assert served._batch.capacity >= 5


def test_unwrap_restores_the_original_modules(base, lora_dirs):
    model = copy.deepcopy(base).train()
    q = model.model.layers[0].self_attn.q_proj
    served = MultiAdapterModel(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    assert served.model.model.layers[0].self_attn.q_proj.base_layer is q and not model.training
    assert served.unwrap() is model and model.model.layers[0].self_attn.q_proj is q
    assert model.training, "unwrap gives the model back in the mode it came in"
    with pytest.raises(RuntimeError, match="unwrapped"):
        served.load_adapter("a1", lora_dirs["a1"])


def test_lora_layers_stack_their_a_slots_under_the_weight(base, lora_dirs, monkeypatch):
    """Wrapping moves each LoRA layer's weight and A slots into one buffer, A's rows right after W's
    (the same Parameter, the same values); the ``stacked`` backend then takes the shrink from the
    base GEMM, every row as its adapter merged; unwrap gives the weight its own storage back. A
    buffer that does not fit leaves the layer as it was, and it serves the same."""
    from fusedpeft.ops.multi_lora import stacked_weight
    from fusedpeft.serving import layers as serving_layers

    model = copy.deepcopy(base)
    q = model.model.layers[0].self_attn.q_proj
    weight, values = q.weight, q.weight.detach().clone()
    served = MultiAdapterModel(model, target_modules="all-linear", max_adapters=3, max_rank=16)
    assert all(stacked_weight(layer.base_weight(), layer.lora_A) is not None for layer in served.layers.values())
    assert q.weight is weight and torch.equal(q.weight, values)
    for n in ("a0", "a1", "a2"):
        served.load_adapter(n, lora_dirs[n])
    ids = torch.randint(1, 96, (4, 5))
    with torch.no_grad(), fusedpeft.use_backend("stacked"):
        check_rows(served, base, lora_dirs, ids, ["a0", None, "a1", "a2"])
    assert fusedpeft.last_backend("multi_lora_linear") == "stacked"
    assert served.unwrap() is model
    assert q.weight is weight and torch.equal(q.weight, values)
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(serving_layers.torch, "empty", no_memory)
    served = MultiAdapterModel(copy.deepcopy(base), target_modules="all-linear", max_adapters=3, max_rank=16)
    monkeypatch.undo()
    assert not any(stacked_weight(layer.base_weight(), layer.lora_A) is not None for layer in served.layers.values())
    for n in ("a0", "a1", "a2"):
        served.load_adapter(n, lora_dirs[n])
    with torch.no_grad(), fusedpeft.use_backend("stacked"):  # runs bgmv's schedule on a bank apart from W
        check_rows(served, base, lora_dirs, ids, ["a2", "a0", None, "a1"])


def test_failed_wrap_leaves_the_model_as_it_was(base, monkeypatch):
    """A bank allocation that fails part way (out of memory, say) swaps no layer in, so the model can
    be wrapped again once memory is there."""
    from fusedpeft.serving import layers as serving_layers

    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    made = []
    real_init = serving_layers.MultiLoraLinear.__init__

    def init_then_fail(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)
        if len(made) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(serving_layers.MultiLoraLinear, "__init__", init_then_fail)
    with pytest.raises(torch.OutOfMemoryError):
        MultiAdapterModel(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    assert dict(model.named_modules()) == modules
    monkeypatch.undo()
    MultiAdapterModel(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)


def test_served_layers_skip_the_op_checks_only_for_inputs_they_can_take(base, lora_dirs, ia3_dirs, monkeypatch):
    """Under no_grad a served layer calls the op past its checks (its bank and index are its own):
    the same rows as the checked call with autograd on, and an input the layer cannot take still
    gets the checked op's error, naming it."""
    from fusedpeft.serving import layers as serving_layers

    unchecked_calls = []
    for name in ("run_multi_lora", "run_multi_ia3"):
        real = getattr(serving_layers, name)
        monkeypatch.setattr(serving_layers, name, lambda *a, _real=real, **kw: unchecked_calls.append(1) or _real(*a, **kw))

    for dirs, names, method in ((lora_dirs, ["a0", None, "a1", "a2"], "lora"),
                                (ia3_dirs, ["i0", "i1", None, "i2"], "ia3")):
        served = served_lora(base, dirs, sorted(n for n in names if n), method=method)
        ids = torch.randint(1, 96, (4, 5))
        with torch.no_grad():
            unchecked = served(input_ids=ids, adapter_names=names).logits
            assert unchecked_calls, method
            unchecked_calls.clear()
            with monkeypatch.context() as patch:  # every layer through the checked op
                patch.setattr(serving_layers._ServingLayer, "_takes_unchecked", lambda self, x, w: False)
                checked = served(input_ids=ids, adapter_names=names).logits
            assert not unchecked_calls
        torch.testing.assert_close(unchecked, checked, atol=0, rtol=0)
        layer = next(m for m in served.model.modules()
                     if isinstance(m, (serving_layers.MultiLoraLinear, serving_layers.MultiIA3Linear))
                     and m.filled)
        served.activate(names)
        with torch.no_grad(), pytest.raises(ValueError, match="in_features"):
            layer(torch.randn(4, 5, layer.in_features + 1))
        served.deactivate()


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_batch_matches_each_adapter_merged(base, lora_dirs, dtype):
    b = copy.deepcopy(base).to(dtype)
    served = served_lora(b, lora_dirs, ["a0", "a1", "a2", "a3", "a4", "a5"], max_adapters=6)
    ids = torch.randint(1, 96, (8, 6))
    names = ["a0", None, "a1", "a2", "a3", "a4", "a5", "a2"]
    # float64: the slot scalings are float32 (the op's contract), so alpha / sqrt(r) is rounded there.
    atol = 1e-4 if dtype == torch.float32 else 1e-6
    out = check_rows(served, b, lora_dirs, ids, names, atol=atol)
    # Every adapter changes the output (a dead bank would pass against a base-only reference).
    with torch.no_grad():
        plain = b(input_ids=ids).logits
    for row, name in enumerate(names):
        assert (name is None) == bool(torch.allclose(out[row], plain[row], atol=1e-3)), name
    # Without adapter_names every row is the base model.
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, plain, atol=atol, rtol=1e-4)


def test_ia3_mixed_batch_matches_each_adapter_merged(base, ia3_dirs):
    served = MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, max_adapters=2, method="ia3")
    for n in ("i0", "i1", "i2"):
        served.load_adapter(n, ia3_dirs[n])
    assert served.layers["model.layers.0.mlp.down_proj"].feedforward is True
    assert served.layers["model.layers.0.self_attn.v_proj"].feedforward is False
    assert served.layers["model.layers.0.self_attn.o_proj"].feedforward is None  # no adapter touches it
    ids = torch.randint(1, 96, (4, 5))
    check_rows(served, base, ia3_dirs, ids, ["i0", None, "i2", "i0"])
    check_rows(served, base, ia3_dirs, ids, ["i1", "i2", "i1", None])  # i0 evicted for i1
    assert served.bank.evictions == 2  # i2 went to the host at load; i0 for i1 now
    slot = served.resident["i2"]
    assert (served.layers["model.layers.0.mlp.down_proj"].ia3_in[slot] == 1).all()  # i2 does not touch it


def test_generate_mixed_batch_matches_each_adapter_merged(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1", "a2", "a3", "a4", "a5"], max_adapters=4)
    ids = torch.randint(1, 96, (6, 5))
    names = ["a4", None, "a0", "a5", "a4", "a2"]
    results = demo.check_batch(served, base, lora_dirs, ids, names, new_tokens=5)
    assert [v for _, _, v, _ in results if v == "mismatch"] == [], results
    assert sum(v == "ok" for _, _, v, _ in results) >= len(names) - 1, results


def test_generate_with_beams_repeats_each_sequence_adapter(base, lora_dirs):
    served = served_lora(base, lora_dirs, ["a0", "a1"], max_adapters=2)
    ids = torch.randint(1, 96, (3, 4))
    names = ["a1", None, "a0"]
    kw = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    out = served.generate(input_ids=ids, adapter_names=names, **kw)
    assert out.shape == (6, 7)
    for row, name in enumerate(names):
        ref = demo.merged_generate(base, None if name is None else lora_dirs[name], ids[row:row + 1], **kw)
        assert torch.equal(out[2 * row:2 * row + 2], ref), (row, name)


# ----------------------------------------------------------------------------- refusals
def _tamper(src, dst, config_changes=None, tensor_change=None):
    """A copy of adapter directory src with its config and/or tensors changed."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "adapter_config.json")) as f:
        config = json.load(f)
    config.update(config_changes or {})
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    weights = load_file(os.path.join(src, "adapter_model.safetensors"))
    if tensor_change is not None:
        tensor_change(weights)
    save_file(weights, os.path.join(dst, "adapter_model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def bad_dirs(base, lora_dirs, ia3_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    a0 = lora_dirs["a0"]  # all-linear, rank 4
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    wide = demo.tiny_llama(seed=1, hidden_size=32, intermediate_size=64)
    dora = copy.deepcopy(base)
    fusedpeft.inject(dora, fusedpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    fusedpeft.save_adapter(dora, str(root / "dora"))
    demo.write_random_lora(wide, str(root / "wide"), seed=5, r=4, target_modules=["q_proj"])
    return {
        "rank above max_rank": (lora_dirs["big"], ValueError, "rank 32, above this bank's max_rank=16"),
        "shapes of another model": (str(root / "wide"), ValueError, "do not fit the layer"),
        "rank not the config's": (_tamper(a0, str(root / "r"), {"r": 8}), ValueError, "rank 4 in its tensors but 8"),
        "lora_B missing": (_tamper(a0, str(root / "noB"), tensor_change=lambda w: w.pop(f"{q}.lora_B.weight")),
                           ValueError, "has no lora_B.weight"),
        "target not wrapped": (_tamper(a0, str(root / "emb"), tensor_change=lambda w: w.update({
            "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(96, 4)})), ValueError, r"targets \['lm_head'\]"),
        "DoRA": (str(root / "dora"), ValueError, r"DoRA \(use_dora=True\)"),
        "lora_bias": (_tamper(a0, str(root / "lb"), {"lora_bias": True}), ValueError, "lora_bias"),
        "bias": (_tamper(a0, str(root / "bias"), {"bias": "all"}), ValueError, "bias='all'"),
        "modules_to_save": (_tamper(a0, str(root / "mts"), {"modules_to_save": ["lm_head"]}), ValueError,
                            "modules_to_save"),
        "pissa": (_tamper(a0, str(root / "pissa"), {"init_lora_weights": "pissa"}), ValueError,
                  "init_lora_weights='pissa' rewrote the base weights"),
        "olora": (_tamper(a0, str(root / "olora"), {"init_lora_weights": "olora"}), ValueError,
                  "init_lora_weights='olora' rewrote the base weights"),
        "pissa_niter": (_tamper(a0, str(root / "pissa_niter"), {"init_lora_weights": "pissa_niter_4"}), ValueError,
                        "init_lora_weights='pissa_niter_4' rewrote the base weights"),
        "an IA3 file": (ia3_dirs["i0"], ValueError, "IA3 adapter cannot join this bank, which serves LORA"),
        "no directory": (str(root / "missing"), FileNotFoundError, "does not exist"),
    }


@pytest.fixture
def busy(base, lora_dirs):
    """A bank with history: loads, evictions, a current batch."""
    served = served_lora(base, lora_dirs, ["a0", "a1", "a2", "a3", "a4"])
    check_rows(served, base, lora_dirs, torch.randint(1, 96, (3, 4)), ["a3", None, "a4"])
    return served


BAD_FILES = ["rank above max_rank", "shapes of another model", "rank not the config's", "lora_B missing",
             "target not wrapped", "DoRA", "lora_bias", "bias", "modules_to_save", "pissa", "olora", "pissa_niter",
             "an IA3 file",
             "no directory"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_refused_load_leaves_the_bank_unchanged(busy, bad_dirs, case):
    path, error, message = bad_dirs[case]
    state = snapshot(busy)
    with pytest.raises(error, match=message):
        busy.load_adapter("new", path)
    assert_same(state, snapshot(busy))


CALLS = {
    "unknown name in a call": (lambda s, ids: s(input_ids=ids, adapter_names=["a0", "nope", None]), KeyError, "nope"),
    "unknown name in generate": (lambda s, ids: s.generate(input_ids=ids, adapter_names=["zz", None, None],
                                                           max_new_tokens=2), KeyError, "zz"),
    "too many adapters in a batch": (lambda s, ids: s(input_ids=torch.cat([ids, ids[:1]]),
                                                      adapter_names=["a0", "a1", "a2", "a4"]),
                                     ValueError, "4 distinct adapters but the bank has 3 slots"),
    "too many adapters in generate": (lambda s, ids: s.generate(input_ids=torch.cat([ids, ids[:1]]), max_new_tokens=2,
                                                                adapter_names=["a0", "a1", "a2", "a4"]),
                                      ValueError, "4 distinct adapters"),
    "names of the wrong length": (lambda s, ids: s(input_ids=ids, adapter_names=["a0", None]), ValueError,
                                  "2 names but the batch has 3"),
    "a single name": (lambda s, ids: s(input_ids=ids, adapter_names="a0"), TypeError, "one name"),
    "unload of an unknown name": (lambda s, ids: s.unload_adapter("nope"), KeyError, "nope"),
    "a name loaded twice": (lambda s, ids: s.load_adapter("a1", s.bank.store["a1"].source), ValueError,
                            "loaded already"),
    "the reserved name": (lambda s, ids: s.load_adapter(BASE, s.bank.store["a1"].source), ValueError, "other than"),
    "prefetch of an unknown name": (lambda s, ids: s.prefetch(["nope"]), KeyError, "nope"),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_refused_call_leaves_the_bank_unchanged(busy, case):
    call, error, message = CALLS[case]
    state = snapshot(busy)
    with pytest.raises(error, match=message):
        call(busy, torch.randint(1, 96, (3, 4)))
    assert_same(state, snapshot(busy))


def test_refused_ia3_mode_conflict_leaves_the_bank_unchanged(base, ia3_dirs, tmp_path):
    served = MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, max_adapters=2, method="ia3")
    served.load_adapter("i0", ia3_dirs["i0"])  # down_proj scales its input
    other = str(tmp_path / "out")
    write_random_ia3(base, other, 5, ["down_proj"], [])  # down_proj scales its output
    state = snapshot(served)
    with pytest.raises(ValueError, match="one layer takes one IA3 mode"):
        served.load_adapter("x", other)
    assert_same(state, snapshot(served))
    served.unload_adapter("i0")  # no adapter touches down_proj now: either mode is welcome
    served.load_adapter("x", other)
    assert served.layers["model.layers.0.mlp.down_proj"].feedforward is False


def test_wrapping_refusals(base):
    with pytest.raises(ValueError, match="max_rank must be an integer >= 1"):
        MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, max_rank=0)
    with pytest.raises(ValueError, match="method must be one of"):
        MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, method="ssf")
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):
        MultiAdapterModel(copy.deepcopy(base), target_modules=["q_proj", "nope"])
    with pytest.raises(TypeError, match="linear layers"):
        MultiAdapterModel(copy.deepcopy(base), target_modules=["embed_tokens"])
    patched = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds adapter layers"):
        MultiAdapterModel(patched, target_modules=["v_proj"])
    served = MultiAdapterModel(copy.deepcopy(base))  # llama's default targets, as peft's: q_proj, v_proj
    assert sorted({n.rsplit(".", 1)[1] for n in served.layers}) == ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- peft's files, Conv1D
def test_adapters_written_by_peft(base, tmp_path):
    peft = pytest.importorskip("peft")
    configs = {
        "p0": peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"down_proj": 3}, alpha_pattern={"v_proj": 5}, init_lora_weights=False),
        "p1": peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                              init_lora_weights=False),
    }
    peft_models = {}
    for name, config in configs.items():
        pm = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        pm.save_pretrained(str(tmp_path / name))
        peft_models[name] = pm.eval()
    served = MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, max_adapters=1, max_rank=16)
    for name in configs:
        served.load_adapter(name, str(tmp_path / name))
    ids = torch.randint(1, 96, (2, 5))
    for name, pm in peft_models.items():  # one slot: each call evicts the other adapter
        out = served(input_ids=ids, adapter_names=[name, name]).logits
        with torch.no_grad():
            torch.testing.assert_close(out, pm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert served.bank.evictions == 1
    s = served.layers["model.layers.0.self_attn.q_proj"].scalings[served.resident["p1"]]
    assert float(s) == pytest.approx(8 / math.sqrt(16))


def test_ia3_written_by_peft(base, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ia3"))
    served = MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, max_adapters=2, method="ia3")
    served.load_adapter("x", str(tmp_path / "ia3"))
    ids = torch.randint(1, 96, (2, 5))
    out = served(input_ids=ids, adapter_names=["x", None]).logits
    with torch.no_grad():
        torch.testing.assert_close(out[:1], pm(input_ids=ids[:1]).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1:], base(input_ids=ids[1:]).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=None, pad_token_id=0)).eval()
    peft_models = {}
    for i, (r, targets) in enumerate([(4, ["c_attn", "c_fc"]), (8, ["c_attn", "mlp.c_proj"])]):
        pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, fan_in_fan_out=True, init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        pm.save_pretrained(str(tmp_path / f"g{i}"))
        peft_models[f"g{i}"] = pm.eval()
    served = MultiAdapterModel(copy.deepcopy(gpt2), target_modules=["c_attn", "c_fc", "mlp.c_proj"],
                               max_adapters=2, max_rank=8)
    assert served.layers["transformer.h.0.attn.c_attn"].fan_in_fan_out
    for name in peft_models:
        served.load_adapter(name, str(tmp_path / name))
    ids = torch.randint(1, 64, (3, 6))
    names = ["g1", None, "g0"]
    out = served(input_ids=ids, adapter_names=names).logits
    with torch.no_grad():
        for row, name in enumerate(names):
            ref = (gpt2 if name is None else peft_models[name])(input_ids=ids[row:row + 1]).logits[0]
            torch.testing.assert_close(out[row], ref, atol=1e-4, rtol=1e-4)
    gen = served.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        for row, name in enumerate(names):
            ref = (gpt2 if name is None else peft_models[name]).generate(
                input_ids=ids[row:row + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(gen[row], ref[0]), (row, name)


# ----------------------------------------------------------------------------- the demo
def test_serve_demo_runs(capsys):
    from fusedpeft.__main__ import main

    assert main(["serve-demo", "--adapters", "5", "--max-adapters", "2", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 mismatches" in out and "evictions" in out


# ----------------------------------------------------------------------------- CUDA graphs
def _graph_safe_served(tmp_path, method, n_adapters, device="cpu"):
    """(base, served): a tiny Llama wrapped with cuda_graphs=True, 3 slots, n_adapters random
    adapters x0, x1, ... of ``method`` loaded."""
    base = demo.tiny_llama(seed=4, device=device)
    dirs = {}
    for i in range(n_adapters):
        dirs[f"x{i}"] = str(tmp_path / f"x{i}")
        if method == "lora":
            demo.write_random_lora(base, dirs[f"x{i}"], seed=i, **demo.adapter_spec(i))
        else:
            write_random_ia3(base, dirs[f"x{i}"], i, ["k_proj", "v_proj", "down_proj"], ["down_proj"])
    served = MultiAdapterModel(copy.deepcopy(base), target_modules=ALL, max_adapters=3, max_rank=16, method=method,
                               cuda_graphs=True)
    for name in dirs:
        served.load_adapter(name, dirs[name])
    return base, served


def _decode_step_check(tmp_path, method, device, capture):
    """A decode step (one token per sequence, static KV cache) of a model wrapped with
    cuda_graphs=True, run for three batches of adapters that reuse the same cache and index: the
    step's logits equal the full forward's last position; with ``capture`` the step is captured
    once in a CUDA graph and replayed for each batch, equal to eager."""
    from transformers import StaticCache

    _, served = _graph_safe_served(tmp_path, method, 4, device)
    B, P = 4, 6
    cache_arg = "cache" if "cache" in inspect.signature(served.model.forward).parameters else "past_key_values"
    prompt = torch.randint(1, 96, (B, P), device=device)
    static_ids = torch.randint(1, 96, (B, 1), device=device)
    static_pos = torch.tensor([P], device=device)
    cache = StaticCache(config=served.model.config, max_cache_len=P + 2)  # one cache: a graph reads its tensors

    def prefill(names):
        served.activate(names)
        cache.reset()
        served.model(input_ids=prompt, cache_position=torch.arange(P, device=device), **{cache_arg: cache})

    def step():
        return served.model(input_ids=static_ids, cache_position=static_pos, **{cache_arg: cache}).logits

    batches = (["x0", None, "x1", "x0"], ["x2", "x3", None, "x1"], [None, None, None, None], [None, "x0", "x3", "x2"])
    with torch.no_grad():
        graph = static_out = None
        if capture:
            prefill(batches[0])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: backends chosen, kernels compiled
                    step()
            torch.cuda.current_stream().wait_stream(side)
            if method == "lora" and fusedpeft.last_backend("multi_lora_linear") == "torch":
                pytest.skip("multi_lora_linear ran its torch reference backend, which reads the slots present on "
                            "the host (torch.unique): graph capture needs a graph-safe backend")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = step()
        for names in batches:
            prefill(names)  # may evict and copy in: the slots and the index stay where they were
            eager = step().clone()
            full = served(input_ids=torch.cat([prompt, static_ids], 1), adapter_names=names).logits[:, -1]
            torch.testing.assert_close(eager[:, -1], full, atol=2e-3 if capture else 1e-4, rtol=1e-3)
            if capture:
                prefill(names)  # served(...) above changed nothing in the bank; the cache again
                graph.replay()
                torch.testing.assert_close(static_out, eager, atol=2e-3, rtol=2e-3)
    assert served.bank.evictions > 0


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_graph_safe_decode_step_eager(tmp_path, method):
    """The CUDA-graph test's flow on the CPU, without the capture."""
    _decode_step_check(tmp_path, method, "cpu", capture=False)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_cuda_graph_decode_step(tmp_path, method):
    _decode_step_check(tmp_path, method, "cuda", capture=True)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_compiled_served_model_follows_each_batch(tmp_path, method):
    """torch.compile of a model wrapped with cuda_graphs=True: one graph (fullgraph, the serving ops
    as custom ops), no recompile when a new batch of the same size names other adapters (the index
    is read from its buffer at run time), and the same logits as eager for each batch."""
    import torch._dynamo

    base, served = _graph_safe_served(tmp_path, method, 3)
    ids = torch.randint(1, 96, (3, 5))
    torch._dynamo.reset()
    compiled = torch.compile(served.model, backend="aot_eager", fullgraph=True)
    batches = (["x0", None, "x2"], ["x1", "x1", None], [None, "x2", "x0"])
    with torch.no_grad():
        for k, names in enumerate(batches):
            served.activate(names)
            eager = served.model(input_ids=ids).logits
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                out = compiled(input_ids=ids).logits
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
        assert not torch.equal(out, base(input_ids=ids).logits)  # the adapters took part


@pytest.mark.parametrize("rows_per_sequence", [0, 1, 3])
def test_batch_index_rows_follow_each_new_batch(rows_per_sequence):
    """The per-row index (expanded once per batch and shape for a prefill) is the sequences' slots
    repeated over their rows, and a new batch of the same size gets its own slots, not the last's."""
    from fusedpeft.serving.layers import BatchIndex

    batch = BatchIndex([torch.device("cpu")], capacity=2, graph_safe=False)
    for slots in ([2, -1, 0], [1, 1, 3], [0, 2, -1]):
        batch.set(slots)
        x = torch.randn(len(slots), rows_per_sequence, 5)
        expected = torch.tensor(slots, dtype=torch.int32).repeat_interleave(rows_per_sequence)
        for _ in range(2):  # the second call reads the kept expansion
            assert torch.equal(batch.rows(x, torch.device("cpu")), expected)
    with pytest.raises(ValueError, match="rows must be the sequences' rows"):
        batch.rows(torch.randn(4, 5), torch.device("cpu"))
