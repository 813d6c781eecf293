"""Model-level adapter management (fusedpeft/adapters.py) against HF peft: delete_adapter,
add_weighted_adapter ("linear", "cat", "svd"), get/set_adapter_state_dict and hotswap_adapter, on
fusedpeft-injected models and on peft models after from_peft. Adapters are always random (never
LoRA's zero B), and every refused call must leave the model exactly as it was."""
import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fusedpeft
from fusedpeft import adapters as fa
from fusedpeft.inject import CONFIG_ATTR, _active_names

from helpers import assert_close, rel_err
from test_peft_parity import PREFIX, make_base, make_input, peft, run, strip

F32 = torch.float32
TARGETS = {"mlp": ["fc1", "fc2", "out"], "llama": ["q_proj", "v_proj", "down_proj"]}
SUBSET = {"mlp": ["fc1", "out"], "llama": ["q_proj"]}


# ----------------------------------------------------------------------------- helpers
def lora_twins(kind, specs, base=None):
    """(base, peft model, fusedpeft model) with the same random LoRA adapters: ``specs`` is a list
    of (adapter name, LoraConfig kwargs); the first is active. peft draws the weights, the
    fusedpeft model gets them by parameter name (the names are peft's)."""
    base = make_base(kind) if base is None else base
    (name0, kw0), rest = specs[0], specs[1:]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw0), adapter_name=name0)
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(init_lora_weights=False, **kw0), name0)
    for name, kw in rest:
        pm.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kw))
        fusedpeft.inject(fm, fusedpeft.LoraConfig(init_lora_weights=False, **kw), name)
    fm.load_state_dict({strip(k): v for k, v in pm.state_dict().items()}, strict=True)
    return base, pm, fm


def outputs(model, kind, x):
    model.eval()
    with torch.no_grad():
        return run(model, kind, x)


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: (id(p), p.requires_grad) for n, p in model.named_parameters()},
        dict(getattr(model, CONFIG_ATTR, {})),
        _active_names(model),
    )


def assert_unchanged(model, snap):
    state, params, configs, active = snap
    now = model.state_dict()
    assert set(now) == set(state), set(now) ^ set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert {n: (id(p), p.requires_grad) for n, p in model.named_parameters()} == params
    assert getattr(model, CONFIG_ATTR, {}) == configs
    assert _active_names(model) == active


def layer_of(model, name):
    """A module by its name in the inner model (also under a PeftModel)."""
    for n, m in model.named_modules():
        if strip(n) == name:
            return m
    raise KeyError(name)


# ----------------------------------------------------------------------------- exports
def test_public_names_are_exported():
    for name in fa.__all__:
        assert getattr(fusedpeft, name) is getattr(fa, name)
        assert name in fusedpeft.__all__


# ----------------------------------------------------------------------------- delete_adapter
def test_delete_active_adapter_matches_peft():
    kw = dict(target_modules=TARGETS["mlp"], r=4, lora_alpha=8)
    specs = [("default", dict(kw, modules_to_save=["head"])), ("c", dict(kw, modules_to_save=["head"])),
             ("b", dict(kw, r=2, lora_alpha=3))]
    _, pm, fm = lora_twins("mlp", specs)
    x = make_input("mlp")
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        fusedpeft.delete_adapter(fm, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.delete_adapter("default")
    assert pm.active_adapters == ["b"] and _active_names(fm) == ["b"]
    assert sorted(getattr(fm, CONFIG_ATTR)) == sorted(pm.peft_config) == ["b", "c"]
    # The same tensors remain, under the same names (layers' and modules_to_save copies).
    assert {PREFIX + k for k in fm.state_dict()} == set(pm.state_dict())
    assert not any(".default." in k for k in fm.state_dict())
    assert_close(outputs(fm, "mlp", x), outputs(pm, "mlp", x), F32, "after delete")
    trainable = {strip(n) for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in fm.named_parameters() if p.requires_grad} and trainable


def test_delete_inactive_and_one_of_two_active_adapters():
    kw = dict(target_modules=TARGETS["mlp"], r=4, lora_alpha=8)
    _, pm, fm = lora_twins("mlp", [("p", kw), ("b", kw), ("c", kw)])
    x = make_input("mlp")
    fusedpeft.delete_adapter(fm, "c")  # inactive: "p" stays the active one
    pm.delete_adapter("c")
    assert _active_names(fm) == ["p"] == pm.active_adapters
    assert_close(outputs(fm, "mlp", x), outputs(pm, "mlp", x), F32, "after deleting an inactive adapter")
    fusedpeft.set_adapter(fm, ["p", "b"])
    pm.base_model.set_adapter(["p", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another active adapter remains: no new one is picked
        fusedpeft.delete_adapter(fm, "p")
    pm.base_model.delete_adapter("p")
    assert _active_names(fm) == ["b"] == pm.base_model.active_adapters
    assert_close(outputs(fm, "mlp", x), outputs(pm.base_model, "mlp", x), F32, "after deleting one of two active adapters")


def test_delete_leaves_layers_without_adapters_running_as_base():
    base = make_base("mlp")
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(target_modules=["fc1"], init_lora_weights=False), "p")
    fusedpeft.inject(fm, fusedpeft.LoraConfig(target_modules=["out"], init_lora_weights=False), "b")
    fusedpeft.set_adapter(fm, ["p", "b"])
    x = make_input("mlp")
    fusedpeft.delete_adapter(fm, "p")
    assert isinstance(fm.fc1, fusedpeft.LoraLinear) and fm.fc1.adapter_names == []  # kept, as in peft
    with torch.no_grad():
        assert torch.equal(fm.fc1(torch.ones(3, 12)), base.fc1(torch.ones(3, 12)))
    fusedpeft.delete_adapter(fm, "b")
    assert getattr(fm, CONFIG_ATTR) == {} and _active_names(fm) == []
    assert torch.equal(outputs(fm, "mlp", x), outputs(base, "mlp", x))
    fusedpeft.inject(fm, fusedpeft.LoraConfig(target_modules=["fc1"], init_lora_weights=False), "c")  # usable again
    assert _active_names(fm) == ["c"]
    assert not torch.equal(outputs(fm, "mlp", x), outputs(base, "mlp", x))


def test_delete_unknown_or_merged_adapter_is_refused_and_changes_nothing():
    kw = dict(target_modules=TARGETS["mlp"], r=4, lora_alpha=8)
    _, _, fm = lora_twins("mlp", [("p", kw), ("b", kw)])
    snap = snapshot(fm)
    with pytest.raises(KeyError, match=r"'nope' not found.*\['b', 'p'\]"):
        fusedpeft.delete_adapter(fm, "nope")
    assert_unchanged(fm, snap)
    fm.out.merge(adapter_names=["b"])  # merged in the last layer only: every layer is checked first
    snap = snapshot(fm)
    with pytest.raises(ValueError, match="merged.*out"):
        fusedpeft.delete_adapter(fm, "b")
    assert_unchanged(fm, snap)
    assert all("b" in getattr(fm, n).adapter_names for n in TARGETS["mlp"])


def test_delete_on_from_peft_model_matches_peft():
    kw = dict(target_modules=TARGETS["llama"], r=4, lora_alpha=8)
    _, pm, _ = lora_twins("llama", [("default", kw), ("other", dict(kw, r=2))])
    swapped = fusedpeft.from_peft(copy.deepcopy(pm))
    x = make_input("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.delete_adapter("default")
        fusedpeft.delete_adapter(swapped, "default")
    assert swapped.active_adapters == pm.active_adapters == ["other"]
    assert set(swapped.state_dict()) == set(pm.state_dict())
    assert_close(outputs(swapped, "llama", x), outputs(pm, "llama", x), F32, "from_peft delete")
    with pytest.raises(KeyError, match="'default' not found"):
        fusedpeft.delete_adapter(swapped, "default")


# ----------------------------------------------------------------------------- add_weighted_adapter
WEIGHTED = {
    # name: (kind, combination_type, (r_a, alpha_a), (r_b, alpha_b), b targets a subset?, extra kwargs)
    "linear": ("mlp", "linear", (4, 8), (4, 3), True, {}),
    "cat": ("mlp", "cat", (4, 8), (2, 5), True, {}),
    "svd": ("mlp", "svd", (4, 8), (2, 5), True, {}),
    "svd_rank_clamp": ("mlp", "svd", (4, 8), (3, 5), False, dict(svd_rank=3, svd_clamp=0.9)),
    "svd_reduced": ("mlp", "svd", (4, 8), (2, 5), False, dict(svd_rank=5, svd_full_matrices=False)),
    "llama_linear": ("llama", "linear", (4, 8), (4, 2), True, {}),
    "llama_cat": ("llama", "cat", (4, 8), (2, 5), True, {}),
    "llama_svd": ("llama", "svd", (4, 8), (2, 5), True, {}),
}


@pytest.mark.parametrize("case", list(WEIGHTED))
def test_add_weighted_adapter_matches_peft(case):
    kind, combination, (ra, aa), (rb, ab), subset, extra = WEIGHTED[case]
    targets_b = SUBSET[kind] if subset else TARGETS[kind]
    _, pm, fm = lora_twins(kind, [("p", dict(target_modules=TARGETS[kind], r=ra, lora_alpha=aa)),
                                  ("b", dict(target_modules=targets_b, r=rb, lora_alpha=ab))])
    x = make_input(kind)
    before = outputs(fm, kind, x)
    args = (["p", "b"], [0.7, -0.4], "mix")
    pm.add_weighted_adapter(*args, combination_type=combination, **extra)
    fusedpeft.add_weighted_adapter(fm, *args, combination_type=combination, **extra)
    # Added inactive and frozen, as in peft.
    assert _active_names(fm) == ["p"] and torch.equal(outputs(fm, kind, x), before)
    assert not any(p.requires_grad for n, p in fm.named_parameters() if ".mix." in n)
    new_p, new_f = pm.peft_config["mix"], getattr(fm, CONFIG_ATTR)["mix"]
    assert (new_f.r, new_f.lora_alpha) == (new_p.r, new_p.lora_alpha)
    assert set(new_f.target_modules) == set(new_p.target_modules)
    assert {PREFIX + k for k in fm.state_dict()} == set(pm.state_dict())
    for name in TARGETS[kind] if kind == "mlp" else [strip(n) for n, m in pm.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A]:
        lp, lf = layer_of(pm, name), layer_of(fm, name)
        if "mix" not in lp.lora_A:
            continue
        delta_p, delta_f = lp.get_delta_weight("mix"), lf.delta_weight("mix", F32)
        assert delta_f.abs().max() > 0
        # A truncated SVD moves with rounding by about eps / (relative gap of the singular values):
        # a looser bound there (measured: under 5e-6 over 60 seeds).
        assert rel_err(delta_f, delta_p) < (1e-4 if combination == "svd" else 1e-5), (name, rel_err(delta_f, delta_p))
        if combination != "svd":  # the factors themselves are unique
            assert torch.allclose(lf.lora_A["mix"].weight, lp.lora_A["mix"].weight, atol=1e-6)
            assert torch.allclose(lf.lora_B["mix"].weight, lp.lora_B["mix"].weight, atol=1e-6)
        if combination == "cat":  # exact: sum_i w_i delta_i
            want = sum(w * lf.delta_weight(a, F32) for a, w in zip(["p", "b"], [0.7, -0.4]) if a in lf.lora_A)
            assert rel_err(delta_f, want) < 1e-5
    pm.set_adapter("mix")
    fusedpeft.set_adapter(fm, "mix")
    y_f = outputs(fm, kind, x)
    assert not torch.equal(y_f, before)
    y_p = outputs(pm, kind, x)
    assert rel_err(y_f, y_p) < (1e-4 if combination == "svd" else 2e-5), f"{case} combined adapter output"


def test_add_weighted_single_adapter_is_linear_and_rslora_combines_exactly():
    kw = dict(target_modules=TARGETS["mlp"], use_rslora=True)
    _, pm, fm = lora_twins("mlp", [("p", dict(kw, r=4, lora_alpha=6)), ("b", dict(kw, r=2, lora_alpha=5))])
    # One adapter: peft combines it as "linear" whatever the type asked.
    for new, combination in [("one", "svd"), ("two", "ties")]:
        pm.add_weighted_adapter(["b"], [1.5], new, combination_type=combination)
        fusedpeft.add_weighted_adapter(fm, ["b"], [1.5], new, combination_type=combination)
        for name in TARGETS["mlp"]:
            lp, lf = layer_of(pm, name), layer_of(fm, name)
            assert torch.allclose(lf.lora_A[new].weight, lp.lora_A[new].weight, atol=1e-6)
            assert torch.allclose(lf.lora_B[new].weight, lp.lora_B[new].weight, atol=1e-6)
    # With use_rslora the new adapter has scaling 1 (peft keeps use_rslora and so scales the
    # combination by sqrt(r)): the combined delta is exactly sum_i w_i delta_i.
    fusedpeft.add_weighted_adapter(fm, ["p", "b"], [0.5, 2.0], "cat", combination_type="cat")
    config = getattr(fm, CONFIG_ATTR)["cat"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (6, 6, False)
    for name in TARGETS["mlp"]:
        lf = layer_of(fm, name)
        assert lf.scaling["cat"] == 1.0
        want = 0.5 * lf.delta_weight("p", F32) + 2.0 * lf.delta_weight("b", F32)
        assert rel_err(lf.delta_weight("cat", F32), want) < 1e-5
        assert rel_err(lf.delta_weight("one", F32), 1.5 * lf.delta_weight("b", F32)) < 1e-5


def test_add_weighted_adapter_on_from_peft_model_matches_peft():
    kw = dict(target_modules=TARGETS["llama"])
    _, pm, _ = lora_twins("llama", [("p", dict(kw, r=4, lora_alpha=8)), ("b", dict(kw, r=2, lora_alpha=4))])
    swapped = fusedpeft.from_peft(copy.deepcopy(pm))
    pm.add_weighted_adapter(["p", "b"], [0.6, 0.9], "mix", combination_type="svd")
    fusedpeft.add_weighted_adapter(swapped, ["p", "b"], [0.6, 0.9], "mix", combination_type="svd")
    pm.set_adapter("mix")
    swapped.set_adapter("mix")
    x = make_input("llama")
    assert_close(outputs(swapped, "llama", x), outputs(pm, "llama", x), F32, "from_peft add_weighted_adapter")
    with pytest.raises(ValueError, match="already has an adapter named 'mix'"):
        fusedpeft.add_weighted_adapter(swapped, ["p"], [1.0], "mix")


def test_add_weighted_adapter_all_linear_and_a_list_combine_over_the_union():
    fm = fusedpeft.inject(make_base("mlp"), fusedpeft.LoraConfig(target_modules="all-linear", r=2, init_lora_weights=False), "p")
    fusedpeft.inject(fm, fusedpeft.LoraConfig(target_modules=["fc1"], r=3, lora_alpha=5, init_lora_weights=False), "q")
    fusedpeft.add_weighted_adapter(fm, ["p", "q"], [1.0, 0.5], "mix", combination_type="cat")
    assert getattr(fm, CONFIG_ATTR)["mix"].target_modules == ["fc1", "fc2", "head", "out"]
    for name in ["fc1", "fc2", "head", "out"]:
        layer = getattr(fm, name)
        want = sum(w * layer.delta_weight(a, F32) for a, w in [("p", 1.0), ("q", 0.5)] if a in layer.lora_A)
        assert layer.r["mix"] == 5 and rel_err(layer.delta_weight("mix", F32), want) < 1e-5


def _weighted_model():
    kw = dict(target_modules=["fc1", "fc2"], init_lora_weights=False)
    fm = fusedpeft.inject(make_base("mlp"), fusedpeft.LoraConfig(r=4, modules_to_save=["head"], **kw), "p")
    fusedpeft.inject(fm, fusedpeft.LoraConfig(r=2, modules_to_save=["head"], **kw), "b")
    fusedpeft.inject(fm, fusedpeft.LoraConfig(r=4, **kw), "c")
    fusedpeft.inject(fm, fusedpeft.IA3Config(target_modules=["out"], init_ia3_weights=False), "i")
    return fm


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((["p", "zz"], [1.0, 1.0], "n"), {}, KeyError, r"'zz' not found.*\['b', 'c', 'i', 'p'\]"),
    ((["p", "c"], [1.0, 1.0], "b"), {}, ValueError, "already has an adapter named 'b'"),
    ((["p", "c"], [1.0], "n"), {}, ValueError, "1 weight"),
    ((["p", "c"], [1.0, 1.0], "n"), dict(combination_type="ties"), NotImplementedError, r"\['svd', 'linear', 'cat'\]"),
    ((["p", "c"], [1.0, 1.0], "n"), dict(combination_type="mean"), ValueError, "invalid combination_type"),
    ((["p", "b"], [1.0, 1.0], "n"), dict(combination_type="linear"), ValueError, "same|one rank"),
    ((["c", "i"], [1.0, 1.0], "n"), {}, TypeError, "LoRA adapters only"),
    ((["p", "b"], [1.0, 1.0], "n"), dict(combination_type="cat"), ValueError, "modules_to_save"),
    ((["p", "c"], [1.0, 1.0], "n"), dict(svd_rank=0), ValueError, "svd_rank"),
    (("p", [1.0], "n"), {}, TypeError, "list of adapter names"),
])
def test_add_weighted_adapter_refusals_change_nothing(args, kwargs, exc, match):
    fm = _weighted_model()
    snap = snapshot(fm)
    with pytest.raises(exc, match=match):
        fusedpeft.add_weighted_adapter(fm, *args, **kwargs)
    assert_unchanged(fm, snap)


# ----------------------------------------------------------------------------- state dicts
STATE_CASES = {
    "lora": ("mlp", peft.LoraConfig, fusedpeft.LoraConfig,
             dict(target_modules=TARGETS["mlp"], r=4, lora_alpha=8, init_lora_weights=False)),
    "lora_mts_bias": ("mlp", peft.LoraConfig, fusedpeft.LoraConfig,
                      dict(target_modules=["fc1", "fc2"], r=3, lora_alpha=5, bias="lora_only", modules_to_save=["head"],
                           init_lora_weights=False)),
    "ia3": ("mlp", peft.IA3Config, fusedpeft.IA3Config,
            dict(target_modules=TARGETS["mlp"], feedforward_modules=["fc2"], init_ia3_weights=False)),
    "llama_lora": ("llama", peft.LoraConfig, fusedpeft.LoraConfig,
                   dict(target_modules=TARGETS["llama"], r=2, lora_alpha=4, init_lora_weights=False)),
    "llama_ia3": ("llama", peft.IA3Config, fusedpeft.IA3Config,
                  dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)),
}


def _perturb(model):
    """Every adapter tensor (and trained bias, modules_to_save copy) away from its start."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_adapter_state_dict_matches_peft_both_ways(case, tmp_path):
    kind, peft_cls, fused_cls, kw = STATE_CASES[case]
    base = make_base(kind)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_cls(**kw))
    _perturb(pm)
    fm = fusedpeft.inject(copy.deepcopy(base), fused_cls(**kw))
    x = make_input(kind)
    assert rel_err(outputs(fm, kind, x), outputs(pm, kind, x)) > 1e-3  # different adapters so far
    params = {n: (id(p), p.requires_grad) for n, p in fm.named_parameters()}
    expected = peft.get_peft_model_state_dict(pm)
    fusedpeft.set_adapter_state_dict(fm, expected)
    assert {n: (id(p), p.requires_grad) for n, p in fm.named_parameters()} == params  # in place
    assert_close(outputs(fm, kind, x), outputs(pm, kind, x), F32, f"{case} after set_adapter_state_dict")
    got = fusedpeft.get_adapter_state_dict(fm)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    fusedpeft.save_adapter(fm, str(tmp_path))
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(written) == set(got) and all(torch.equal(written[k], got[k]) for k in got)
    # The same on the peft model after from_peft: peft's own state dict.
    swapped = fusedpeft.from_peft(copy.deepcopy(pm))
    got = fusedpeft.get_adapter_state_dict(swapped)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_set_adapter_state_dict_into_one_of_two_adapters_and_on_from_peft():
    kw = dict(target_modules=TARGETS["mlp"], r=4, lora_alpha=8)
    _, pm, fm = lora_twins("mlp", [("p", kw), ("b", dict(kw, r=2))])
    other = fusedpeft.inject(make_base("mlp"), fusedpeft.LoraConfig(init_lora_weights=False, **dict(kw, r=2)), "x")
    sd = fusedpeft.get_adapter_state_dict(other, "x")
    a_before = {k: v.clone() for k, v in fusedpeft.get_adapter_state_dict(fm, "p").items()}
    fusedpeft.set_adapter_state_dict(fm, sd, "b")
    assert all(torch.equal(fusedpeft.get_adapter_state_dict(fm, "b")[k], sd[k]) for k in sd)
    assert all(torch.equal(fusedpeft.get_adapter_state_dict(fm, "p")[k], v) for k, v in a_before.items())
    assert _active_names(fm) == ["p"]
    swapped = fusedpeft.from_peft(copy.deepcopy(pm))
    fusedpeft.set_adapter_state_dict(swapped, sd, "b")
    peft.set_peft_model_state_dict(pm, sd, "b")
    pm.set_adapter("b")
    swapped.set_adapter("b")
    fusedpeft.set_adapter(fm, "b")
    x = make_input("mlp")
    assert_close(outputs(swapped, "mlp", x), outputs(pm, "mlp", x), F32, "from_peft set_adapter_state_dict")
    assert_close(outputs(fm, "mlp", x), outputs(pm, "mlp", x), F32, "set into adapter b")


def _bad_state_dicts(sd):
    keys = sorted(sd)
    missing = {k: v for k, v in sd.items() if k != keys[-1]}
    extra = dict(sd, **{"base_model.model.fc9.lora_A.weight": torch.zeros(4, 12)})
    shape = dict(sd, **{keys[-1]: torch.zeros(3, 3)})
    not_tensor = dict(sd, **{keys[-1]: [1.0]})
    return {
        "missing": (missing, ValueError, "missing keys: " + keys[-1].replace(".", r"\.")),
        "unexpected": (extra, ValueError, r"unexpected keys: base_model\.model\.fc9"),
        "shape": (shape, ValueError, r"\(3, 3\) given"),
        "not_tensor": (not_tensor, TypeError, "not tensors"),
        "unknown_adapter": (sd, KeyError, "'nope' not found"),
        "merged": (sd, ValueError, "merged"),
    }


@pytest.mark.parametrize("bad", ["missing", "unexpected", "shape", "not_tensor", "unknown_adapter", "merged"])
def test_set_adapter_state_dict_refusals_change_nothing(bad):
    kw = dict(target_modules=TARGETS["mlp"], r=4, lora_alpha=8, init_lora_weights=False)
    source = fusedpeft.inject(make_base("mlp"), fusedpeft.LoraConfig(**kw))
    fm = fusedpeft.inject(make_base("mlp"), fusedpeft.LoraConfig(**kw))
    sd, exc, match = _bad_state_dicts(fusedpeft.get_adapter_state_dict(source))[bad]
    if bad == "merged":
        fm.fc2.merge()
    snap = snapshot(fm)
    with pytest.raises(exc, match=match):
        fusedpeft.set_adapter_state_dict(fm, sd, "nope" if bad == "unknown_adapter" else "default")
    assert_unchanged(fm, snap)


# ----------------------------------------------------------------------------- hot-swapping
class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (each compilation, recompiles
    included) and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _lora_model(base, r, alpha, targets=None, dropout=0.0, **extra):
    config = fusedpeft.LoraConfig(target_modules=targets or TARGETS["mlp"], r=r, lora_alpha=alpha,
                                  lora_dropout=dropout, init_lora_weights=False, **extra)
    return fusedpeft.inject(copy.deepcopy(base), config)


@pytest.mark.parametrize("source", ["directory", "state_dict"])
@pytest.mark.parametrize("r2, alpha2, extra", [
    (4, 8, {}), (4, 3, {}), (2, 5, {}), (2, 7, dict(targets=["fc1", "out"])),
    (4, 6, dict(use_rslora=True, rank_pattern={"fc2": 2}, alpha_pattern={"out": 5})),
], ids=["same", "other_alpha", "smaller_rank", "fewer_targets", "patterns_rslora"])
def test_hotswap_into_compiled_model_without_recompiling(source, r2, alpha2, extra, tmp_path):
    torch._dynamo.reset()
    base = make_base("mlp")
    model = _lora_model(base, 4, 8).eval()
    reference = _lora_model(base, r2, alpha2, **extra).eval()  # the second adapter, loaded normally
    x = make_input("mlp")
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        y1 = compiled(x)
        compiled(x)
    graphs, params = backend.graphs, [(id(p), p.data_ptr()) for p in model.parameters()]
    assert graphs >= 1
    if source == "directory":
        fusedpeft.save_adapter(reference, str(tmp_path))
        fusedpeft.hotswap_adapter(compiled, str(tmp_path))
    else:
        sd = fusedpeft.get_adapter_state_dict(reference)
        fusedpeft.hotswap_adapter(compiled, sd, config=getattr(reference, CONFIG_ATTR)["default"])
    with torch.no_grad():
        y2 = compiled(x)
    assert backend.graphs == graphs, "hot-swapping recompiled the model"
    assert [(id(p), p.data_ptr()) for p in model.parameters()] == params
    assert rel_err(y2, y1) > 1e-3
    assert_close(y2, outputs(reference, "mlp", x), F32, "hot-swapped, compiled")
    assert_close(outputs(model, "mlp", x), outputs(reference, "mlp", x), F32, "hot-swapped, eager")
    # The adapter keeps its config, in which the swapped weights are expressed: a file saved now
    # reproduces the swapped outputs.
    fusedpeft.save_adapter(model, str(tmp_path / "again"))
    fresh = fusedpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "again"))
    assert_close(outputs(fresh, "mlp", x), outputs(reference, "mlp", x), F32, "saved after hot-swap")


def test_hotswap_matches_peft_hotswap_on_from_peft_model(tmp_path):
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    base = make_base("llama")
    kw = dict(target_modules=TARGETS["llama"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kw))
    other = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, **kw))
    other.save_pretrained(str(tmp_path))
    swapped = fusedpeft.from_peft(copy.deepcopy(pm))
    fusedpeft.hotswap_adapter(swapped, str(tmp_path))
    peft_hotswap(pm, str(tmp_path), adapter_name="default", torch_device="cpu")
    x = make_input("llama")
    assert_close(outputs(swapped, "llama", x), outputs(other, "llama", x), F32, "fusedpeft hot-swap")
    assert_close(outputs(pm, "llama", x), outputs(other, "llama", x), F32, "peft hot-swap")


def test_hotswap_ia3(tmp_path):
    base = make_base("mlp")
    kw = dict(target_modules=TARGETS["mlp"], feedforward_modules=["fc2"], init_ia3_weights=False)
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.IA3Config(**kw))
    reference = fusedpeft.inject(copy.deepcopy(base), fusedpeft.IA3Config(**kw))
    fusedpeft.save_adapter(reference, str(tmp_path))
    params = [id(p) for p in model.parameters()]
    fusedpeft.hotswap_adapter(model, str(tmp_path))
    assert [id(p) for p in model.parameters()] == params
    x = make_input("mlp")
    assert_close(outputs(model, "mlp", x), outputs(reference, "mlp", x), F32, "IA3 hot-swap")


def _hotswap_refusals(base, tmp_path):
    """name -> (source, kwargs, exception, match)."""
    def saved(model, name):
        path = str(tmp_path / name)
        fusedpeft.save_adapter(model, path)
        return path

    small = fusedpeft.get_adapter_state_dict(_lora_model(base, 2, 4))
    big = fusedpeft.get_adapter_state_dict(_lora_model(base, 8, 8))
    # fc1 fits (rank 2); out does not (rank 8): nothing may change, fc1 included.
    mixed = dict(small, **{k: v for k, v in big.items() if ".out." in k})
    ia3 = fusedpeft.inject(copy.deepcopy(base), fusedpeft.IA3Config(target_modules=TARGETS["mlp"]))
    return {
        "bigger_rank": (saved(_lora_model(base, 8, 8), "big"), {}, ValueError,
                        r"fc1: cannot hot-swap lora_A \(8, 12\) / lora_B \(24, 8\).*lora_A \(4, 12\)"),
        "bigger_rank_late_layer": (mixed, {}, ValueError, r"out: cannot hot-swap lora_A \(8, 20\)"),
        "other_targets": (saved(_lora_model(base, 4, 8, ["fc1", "head"]), "head"), {}, ValueError,
                          r"does not have.*head\.lora_A"),
        "other_dropout": (saved(_lora_model(base, 4, 8, dropout=0.1), "dropout"), {}, ValueError, "lora_dropout"),
        "other_method": (saved(ia3, "ia3"), {}, ValueError, "is LORA but .* is IA3"),
        "half_a_layer": ({k: v for k, v in small.items() if "fc2.lora_B" not in k}, {}, ValueError,
                         "fc2: .* has .*fc2.lora_A.weight.* but not .*fc2.lora_B.weight"),
        "unknown_adapter": (small, dict(adapter_name="nope"), KeyError, "'nope' not found"),
        "missing_directory": (str(tmp_path / "none"), {}, FileNotFoundError, "does not exist"),
    }


@pytest.mark.parametrize("bad", ["bigger_rank", "bigger_rank_late_layer", "other_targets", "other_dropout",
                                 "other_method", "half_a_layer", "unknown_adapter", "missing_directory", "merged"])
def test_hotswap_refusals_change_nothing(bad, tmp_path):
    base = make_base("mlp")
    model = _lora_model(base, 4, 8)
    if bad == "merged":
        model.fc2.merge()
        source, kwargs, exc, match = fusedpeft.get_adapter_state_dict(_lora_model(base, 4, 8)), {}, ValueError, "merged"
    else:
        source, kwargs, exc, match = _hotswap_refusals(base, tmp_path)[bad]
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        fusedpeft.hotswap_adapter(model, source, **kwargs)
    assert_unchanged(model, snap)
