"""Adapter files in HF peft's format both ways: fusedpeft.save_adapter -> peft.PeftModel.from_pretrained,
peft's save_pretrained -> fusedpeft.load_adapter (safetensors and .bin), the same bytes-level key set
either way, modules_to_save and trainable biases; SSF in fusedpeft's own format of the same layout,
round trip; and every malformed or mismatched file raising a clear error while leaving the model
exactly as it was."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusedpeft
from fusedpeft import methods

from helpers import assert_close
from test_peft_parity import (
    GPT2_TARGETS, LLAMA_TARGETS, MLP_TARGETS, fused_config, make_base, make_input, peft, peft_config, run, strip,
)

F32 = torch.float32

CASES = {
    "mlp-lora": ("mlp", "lora", dict(target_modules=MLP_TARGETS, r=4, lora_alpha=8, use_rslora=True,
                                     rank_pattern={"fc2": 2}, alpha_pattern={"out": 5})),
    "mlp-lora-bias-mts": ("mlp", "lora", dict(target_modules=MLP_TARGETS, r=3, lora_alpha=6, bias="all",
                                              modules_to_save=["head"])),
    "mlp-lora-lora_only": ("mlp", "lora", dict(target_modules=["fc1", "fc2"], r=2, lora_alpha=4, bias="lora_only")),
    "llama-lora": ("llama", "lora", dict(target_modules=LLAMA_TARGETS, r=4, lora_alpha=8)),
    "mlp-ia3-mts": ("mlp", "ia3", dict(target_modules=MLP_TARGETS, feedforward_modules=["fc2"], modules_to_save=["head"])),
    "llama-ia3": ("llama", "ia3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "gpt2-lora": ("gpt2", "lora", dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True, r=2, lora_alpha=4)),
}


def _perturb(params):
    """Move every adapter-owned tensor away from its init (lora_B = 0, ia3_l = 1, copies equal to
    the original), so a tensor that fails to load shows in the output."""
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _peft_saved(kind, method, kw, directory, **save_kw):
    """(base, peft model) with a perturbed peft adapter written to ``directory`` by peft."""
    base = make_base(kind)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(method, **kw))
    _perturb(_trainable(pm))
    pm.save_pretrained(directory, **save_kw)
    return base, pm


def _outputs_equal(a, b, kind, what):
    a.eval()
    b.eval()
    x = make_input(kind)
    with torch.no_grad():
        assert_close(run(a, kind, x), run(b, kind, x), F32, what)


@pytest.mark.parametrize("case", list(CASES))
def test_save_adapter_loads_in_peft(case, tmp_path):
    kind, method, kw = CASES[case]
    base = make_base(kind)
    fm = fusedpeft.inject(copy.deepcopy(base), fused_config(method, **kw))
    _perturb(_trainable(fm))
    fusedpeft.save_adapter(fm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["task_type"] is None
    assert sorted(config["target_modules"]) == sorted(kw["target_modules"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in tensors)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(pm.peft_config["default"]) is type(peft_config(method, target_modules=["x"]))
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" in n or "ia3_l" in n or "modules_to_save" in n)
    _outputs_equal(fm, pm, kind, f"{case}: peft loading fusedpeft's file")
    # every saved tensor landed in peft's model under the same name
    fused_state = fm.state_dict()
    for name, value in pm.state_dict().items():
        if "lora_" in name or "ia3_l" in name or "modules_to_save" in name:
            assert torch.equal(value, fused_state[strip(name)]), name


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_save_pretrained_loads_in_fusedpeft(case, safe, tmp_path):
    kind, method, kw = CASES[case]
    base, pm = _peft_saved(kind, method, kw, tmp_path / "peft", safe_serialization=safe)

    fm = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    _outputs_equal(fm, pm, kind, f"{case}: fusedpeft loading peft's file")
    loaded = {n for n, p in fm.named_parameters() if "lora_" in n or "ia3_l" in n or "modules_to_save" in n}
    assert loaded and not any(p.requires_grad for n, p in fm.named_parameters() if n in loaded), "is_trainable=False"

    # Written back by fusedpeft: the very same keys and tensors peft wrote.
    fusedpeft.save_adapter(fm, tmp_path / "fused")
    ours = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    theirs = (load_file(tmp_path / "peft" / "adapter_model.safetensors") if safe
              else torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_load_adapter_trainable_and_beside_another_adapter(tmp_path):
    kind, method = "mlp", "lora"
    kw = dict(target_modules=MLP_TARGETS, r=3, lora_alpha=6, modules_to_save=["head"])
    base, pm = _peft_saved(kind, method, kw, tmp_path)

    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(target_modules=["fc1"], r=2, init_lora_weights=False))
    x = make_input(kind)
    y_default = fm(x)
    fusedpeft.load_adapter(fm, tmp_path, adapter_name="other", is_trainable=True)
    assert sorted(fm.fusedpeft_config) == ["default", "other"]
    _outputs_equal(fm, pm, kind, "the loaded adapter is the active one")
    trainable = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert "fc2.lora_A.other.weight" in trainable and "head.modules_to_save.other.weight" in trainable
    assert "fc1.lora_A.default.weight" not in trainable
    fusedpeft.set_adapter(fm, "default")
    with torch.no_grad():
        assert_close(fm(x), y_default, F32, "the first adapter still there")


def test_load_adapter_replaces_weights_of_an_existing_adapter(tmp_path):
    kind, method, kw = CASES["mlp-ia3-mts"]
    base, pm = _peft_saved(kind, method, kw, tmp_path)
    fm = fusedpeft.inject(copy.deepcopy(base), fused_config(method, **kw))
    params = [(n, id(p)) for n, p in fm.named_parameters()]
    fusedpeft.load_adapter(fm, tmp_path)
    assert [(n, id(p)) for n, p in fm.named_parameters()] == params, "no new parameters: the existing ones were filled"
    _outputs_equal(fm, pm, kind, "existing adapter overwritten")

    fm2 = fusedpeft.inject(copy.deepcopy(base), fused_config(method, **dict(kw, feedforward_modules=["fc1"])))
    with pytest.raises(ValueError, match=r"already has an adapter 'default'.*feedforward_modules"):
        fusedpeft.load_adapter(fm2, tmp_path)


def test_save_and_load_through_a_compiled_model(tmp_path):
    """save_adapter and load_adapter see through torch.compile's wrapper: the file has the model's
    own keys (no ``_orig_mod.``), and loading into a compiled model fills the model underneath."""
    kind, method, kw = CASES["mlp-lora"]
    base = make_base(kind)
    fm = fusedpeft.inject(copy.deepcopy(base), fused_config(method, **kw))
    _perturb(_trainable(fm))
    fusedpeft.save_adapter(torch.compile(fm, backend="eager"), tmp_path / "saved")
    keys = list(load_file(tmp_path / "saved" / "adapter_model.safetensors"))
    assert keys and not any("_orig_mod" in k for k in keys), keys
    target = fusedpeft.inject(copy.deepcopy(base), fused_config(method, **kw))
    fusedpeft.load_adapter(torch.compile(target, backend="eager"), tmp_path / "saved", adapter_name="default")
    _outputs_equal(target, fm, kind, "loaded through the compiled wrapper")


def test_load_adapter_casts_to_each_parameter_dtype(tmp_path):
    kind, method, kw = CASES["mlp-lora-bias-mts"]
    base, pm = _peft_saved(kind, method, kw, tmp_path)
    fm = fusedpeft.load_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    dtypes = {n: p.dtype for n, p in fm.named_parameters()}
    assert dtypes["fc1.lora_A.default.weight"] == F32, "float32 adapter weights beside a bf16 base (autocast)"
    assert dtypes["head.modules_to_save.default.weight"] == dtypes["fc1.base_layer.bias"] == torch.bfloat16
    x = make_input(kind)
    with torch.no_grad():
        assert_close(fm(x.to(torch.bfloat16)), pm(x), torch.bfloat16, "bf16 model, float32 file")


@pytest.mark.parametrize("method", methods.METHODS, ids=lambda m: m.name)
def test_adapter_file_keys_are_the_method_records(method, tmp_path):
    """What a layer writes per adapter is what its registry record says (Method.file_keys)."""
    model = fusedpeft.inject(make_base("mlp"), method.config_class(target_modules=MLP_TARGETS))
    fusedpeft.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{m}.{k}" for m in MLP_TARGETS for k in method.file_keys}


@pytest.mark.parametrize("init", ["eva", "orthogonal"])
def test_inits_that_only_draw_starting_values_load(init, tmp_path):
    """peft's eva and orthogonal inits pick starting values only, which the file's tensors
    overwrite: such a file loads as plain LoRA (its config with the default init)."""
    kind, method, kw = CASES["mlp-lora"]
    base, pm = _peft_saved(kind, method, kw, tmp_path)
    _edit_config(tmp_path, init_lora_weights=init)
    fm = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert fm.fusedpeft_config["default"].init_lora_weights is True
    _outputs_equal(fm, pm, kind, f"init_lora_weights={init!r}")


# ----------------------------------------------------------------------------- bad files
def _snapshot(model):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        types={n: type(m) for n, m in model.named_modules()},
        grads={n: p.requires_grad for n, p in model.named_parameters()},
        configs=dict(getattr(model, "fusedpeft_config", {})),
        active={n: list(m.active_adapters) for n, m in model.named_modules() if isinstance(m, fusedpeft.modules.AdapterLayer)},
    )


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now["types"] == snap["types"], "module types changed"
    assert now["grads"] == snap["grads"], "requires_grad flags changed"
    assert now["configs"] == snap["configs"] and now["active"] == snap["active"]
    assert now["state"].keys() == snap["state"].keys(), "state_dict keys changed"
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"


def _edit_config(d, **changes):
    path = d / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(d, fn):
    path = d / "adapter_model.safetensors"
    tensors = dict(load_file(path))
    fn(tensors)
    save_file(tensors, path)


def _drop_one_lora_B(t):
    del t[next(k for k in sorted(t) if "lora_B" in k)]


def _reshape_one_lora_A(t):
    k = next(k for k in sorted(t) if "lora_A" in k)
    t[k] = torch.randn(t[k].shape[0] + 1, t[k].shape[1])


BAD = {
    "no directory": (lambda d: d / "nope", FileNotFoundError, "does not exist"),
    "no config": (lambda d: os.remove(d / "adapter_config.json"), FileNotFoundError, "no adapter_config.json"),
    "no weights": (lambda d: os.remove(d / "adapter_model.safetensors"), FileNotFoundError, "adapter_model.safetensors or adapter_model.bin"),
    "broken json": (lambda d: (d / "adapter_config.json").write_text("{not json"), ValueError, "not valid JSON"),
    "damaged weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), ValueError, "cannot read"),
    "unknown peft_type": (lambda d: _edit_config(d, peft_type="LOHA"), ValueError, "unsupported peft_type 'LOHA'"),
    "replication": (lambda d: _edit_config(d, layer_replication=[[0, 1]]), ValueError,
                    r"does not implement: layer_replication=\[\[0, 1\]\]"),
    "corda init": (lambda d: _edit_config(d, init_lora_weights="corda"), ValueError, "rewrites the base weights"),
    "missing key": (lambda d: _edit_weights(d, _drop_one_lora_B), ValueError, r"missing keys .*lora_B"),
    "unexpected key": (lambda d: _edit_weights(d, lambda t: t.update({"base_model.model.fc1.lora_C.weight": torch.ones(2)})),
                       ValueError, r"unexpected keys .*fc1\.lora_C\.weight"),
    "wrong shape": (lambda d: _edit_weights(d, _reshape_one_lora_A), ValueError, r"has shape \(5, .*expects \(4, "),
    "wrong rank in config": (lambda d: _edit_config(d, r=3), ValueError, r"fc1\.lora_A\.weight has shape \(4, 12\) .*expects \(3, 12\)"),
    "target not in model": (lambda d: _edit_config(d, target_modules=["fc1", "fc2", "out", "decoder"]), ValueError,
                            r"\['decoder'\] match no module"),
    "non-linear target": (lambda d: _edit_config(d, target_modules=["fc1", "fc2", "out", "act"]), TypeError,
                          r"linear layers .*act \(GELU\)"),
    "damaged bin": (lambda d: (os.remove(d / "adapter_model.safetensors"), (d / "adapter_model.bin").write_bytes(b"garbage")),
                    ValueError, r"cannot read .*adapter_model\.bin"),
    "int tensor": (lambda d: _edit_weights(d, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if "lora_A" in k})),
                   ValueError, "not a floating-point tensor"),
}


class MLPWithAct(torch.nn.Module):
    """The parity MLP plus a non-linear named module, to target by mistake."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.act(self.mlp(x))


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "with-adapter"])
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_adapter_file_raises_and_leaves_model_unchanged(bad, existing, tmp_path):
    base = MLPWithAct(make_base("mlp"))
    kw = dict(target_modules=MLP_TARGETS, r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=["head"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    pm.save_pretrained(tmp_path)
    edit, exc, match = BAD[bad]
    result = edit(tmp_path)
    directory = result if isinstance(result, os.PathLike) else tmp_path

    model = copy.deepcopy(base)
    if existing:  # already holds an adapter in layers the file also targets: the failed load must not touch it
        fusedpeft.inject(model, fusedpeft.LoraConfig(target_modules=["fc2", "out"], r=2, init_lora_weights=False,
                                                     modules_to_save=["head"]))
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        fusedpeft.load_adapter(model, directory, adapter_name="other" if existing else "default")
    _assert_unchanged(model, snap)


def test_existing_adapter_of_another_method_is_refused(tmp_path):
    base = make_base("mlp")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["fc1"], r=2))
    pm.save_pretrained(tmp_path)
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.IA3Config(target_modules=["fc1"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="adapter 'default' is IA3 but .* holds LORA"):
        fusedpeft.load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_save_adapter_unknown_adapter_name(tmp_path):
    model = fusedpeft.inject(make_base("mlp"), fusedpeft.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(KeyError, match="no fusedpeft adapter 'nope'"):
        fusedpeft.save_adapter(model, tmp_path, adapter_name="nope")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- SSF: fusedpeft's own format
SSF_CASES = {
    "mlp": ("mlp", dict(target_modules=MLP_TARGETS)),  # fc2 has no bias
    "mlp-mts": ("mlp", dict(target_modules=["fc1", "fc2"], modules_to_save=["head"])),
    "llama": ("llama", dict(target_modules="all-linear")),
    "gpt2": ("gpt2", dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True)),
}


def _ssf_model(kind, **kw):
    """A fusedpeft model with a random SSF adapter (and moved modules_to_save copies), and its base."""
    base = make_base(kind)
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.SSFConfig(init_ssf_weights=False, **kw))
    _perturb(p for n, p in model.named_parameters() if "modules_to_save" in n)
    return base, model


def _ssf_file(tmp_path, kind="mlp", **kw):
    kw.setdefault("target_modules", MLP_TARGETS)
    base, model = _ssf_model(kind, **kw)
    fusedpeft.save_adapter(model, tmp_path)
    return base, model


@pytest.mark.parametrize("case", list(SSF_CASES))
def test_ssf_save_load_round_trip(case, tmp_path):
    kind, kw = SSF_CASES[case]
    base, fm = _ssf_model(kind, **kw)
    fusedpeft.save_adapter(fm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    fields = fusedpeft.SSFConfig(init_ssf_weights=False, **kw).to_dict()
    assert {k: config[k] for k in fields} == fields and config["peft_type"] == "SSF"
    # peft's key rule: base_model.model.<module path>.ssf_scale / .ssf_shift, adapter name removed
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = [(n, m) for n, m in fm.named_modules() if isinstance(m, fusedpeft.SSFLinear)]
    expected = {f"base_model.model.{n}.ssf_{p}": (m.out_features,) for n, m in layers for p in ("scale", "shift")}
    assert {k: tuple(v.shape) for k, v in tensors.items() if "ssf_" in k} == expected
    assert all(v.dtype == F32 for v in tensors.values())
    saved_copies = sorted(k for k in tensors if "ssf_" not in k)
    assert saved_copies == (["base_model.model.head.bias", "base_model.model.head.weight"] if "modules_to_save" in kw else [])

    loaded = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert type(loaded.fusedpeft_config["default"]) is fusedpeft.SSFConfig
    assert loaded.fusedpeft_config["default"].to_dict() == fields
    assert not any(p.requires_grad for p in loaded.parameters()), "is_trainable=False freezes the adapter"
    theirs = loaded.state_dict()
    assert sorted(theirs) == sorted(fm.state_dict())
    for k, v in fm.state_dict().items():
        assert torch.equal(theirs[k], v), k
    fm.eval()
    loaded.eval()
    x = make_input(kind)
    with torch.no_grad():
        assert torch.equal(run(loaded, kind, x), run(fm, kind, x))


def test_ssf_load_trainable_into_bf16_model_and_beside_another_adapter(tmp_path):
    base, fm = _ssf_file(tmp_path)
    model = fusedpeft.inject(copy.deepcopy(base).to(torch.bfloat16),
                             fusedpeft.SSFConfig(target_modules=["fc1"], init_ssf_weights=False))
    x = make_input("mlp")
    with torch.no_grad():
        y_default = model(x.to(torch.bfloat16))
    fusedpeft.load_adapter(model, tmp_path, adapter_name="other", is_trainable=True)
    assert model.fc1.adapter_names == ["default", "other"] and model.fc1.active_adapters == ["other"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.ssf_{p}.other" for m in MLP_TARGETS for p in ("scale", "shift")}
    assert model.fc2.ssf_scale["other"].dtype == F32, "float32 adapter weights beside a bf16 base"
    with torch.no_grad():
        assert_close(model(x.to(torch.bfloat16)), fm(x), torch.bfloat16, "bf16 model, float32 file")
        fusedpeft.set_adapter(model, "default")
        assert torch.equal(model(x.to(torch.bfloat16)), y_default), "the first adapter is still there"


def test_ssf_load_replaces_weights_of_an_existing_adapter(tmp_path):
    base, fm = _ssf_file(tmp_path, modules_to_save=["head"])
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.SSFConfig(target_modules=MLP_TARGETS, modules_to_save=["head"]))
    params = [(n, id(p)) for n, p in model.named_parameters()]
    fusedpeft.load_adapter(model, tmp_path)
    assert [(n, id(p)) for n, p in model.named_parameters()] == params, "no new parameters: the existing ones were filled"
    _outputs_equal(model, fm, "mlp", "existing SSF adapter overwritten")

    other = fusedpeft.inject(copy.deepcopy(base), fusedpeft.SSFConfig(target_modules=["fc1", "fc2"]))
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"already has an adapter 'default'.*target_modules"):
        fusedpeft.load_adapter(other, tmp_path)
    _assert_unchanged(other, snap)


def _drop_one(part):
    def edit(t):
        del t[next(k for k in sorted(t) if part in k)]
    return edit


def _grow_one(part):
    def edit(t):
        k = next(k for k in sorted(t) if part in k)
        t[k] = torch.randn(t[k].shape[0] + 1)
    return edit


SSF_BAD = {
    "missing shift": (lambda d: _edit_weights(d, _drop_one("ssf_shift")), ValueError, r"missing keys .*fc1\.ssf_shift"),
    "missing scale": (lambda d: _edit_weights(d, _drop_one("ssf_scale")), ValueError, r"missing keys .*fc1\.ssf_scale"),
    "wrong shape": (lambda d: _edit_weights(d, _grow_one("ssf_scale")), ValueError,
                    r"fc1\.ssf_scale has shape \(25,\) but the model expects \(24,\)"),
    "unexpected key": (lambda d: _edit_weights(d, lambda t: t.update({"base_model.model.fc1.ssf_bias": torch.ones(24)})),
                       ValueError, r"unexpected keys .*fc1\.ssf_bias"),
    "int tensor": (lambda d: _edit_weights(d, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if "shift" in k})),
                   ValueError, "not a floating-point tensor"),
    "unknown peft_type": (lambda d: _edit_config(d, peft_type="LOHA"), ValueError, "unsupported peft_type 'LOHA'"),
    "bad init": (lambda d: _edit_config(d, init_ssf_weights="paper"), ValueError, "init_ssf_weights must be True, False or 'ssf'"),
    "non-linear target": (lambda d: _edit_config(d, target_modules=["fc1", "act"]), TypeError, r"linear layers .*act \(GELU\)"),
    "target not in model": (lambda d: _edit_config(d, target_modules=["fc1", "decoder"]), ValueError, r"\['decoder'\] match no module"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "with-adapter"])
@pytest.mark.parametrize("bad", list(SSF_BAD))
def test_bad_ssf_file_raises_and_leaves_model_unchanged(bad, existing, tmp_path):
    base = MLPWithAct(make_base("mlp"))
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.SSFConfig(target_modules=MLP_TARGETS, init_ssf_weights=False))
    fusedpeft.save_adapter(model, tmp_path)
    edit, exc, match = SSF_BAD[bad]
    edit(tmp_path)

    model = copy.deepcopy(base)
    if existing:  # an SSF adapter in layers the file also targets: the failed load must not touch it
        fusedpeft.inject(model, fusedpeft.SSFConfig(target_modules=["fc2", "out"], init_ssf_weights=False))
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        fusedpeft.load_adapter(model, tmp_path, adapter_name="other" if existing else "default")
    _assert_unchanged(model, snap)


def test_ssf_file_into_an_adapter_of_another_method_is_refused(tmp_path):
    base, _ = _ssf_file(tmp_path, target_modules=["fc1"])
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.IA3Config(target_modules=["fc1"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="adapter 'default' is IA3 but .* holds SSF"):
        fusedpeft.load_adapter(model, tmp_path)
    with pytest.raises(TypeError, match="already holds IA3Linear adapters"):
        fusedpeft.load_adapter(model, tmp_path, adapter_name="other")
    _assert_unchanged(model, snap)
