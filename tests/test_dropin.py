"""What a peft user reaches for first: configs read from peft's dicts, Conv1D files, default and
per-layer targets, lora_bias, and the inits that start from the base weight, each against peft."""
import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import fusedpeft
from helpers import assert_close, assert_step_matches_peft, peft_twins

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama(layers=3):
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=60, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def adapted(model, cls=None):
    """Names of the adapted modules, without peft's prefix."""
    cls = cls or (fusedpeft.LoraLinear, fusedpeft.IA3Linear, fusedpeft.SSFLinear)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, cls):
            found.append(name.removeprefix("base_model.model."))
    return sorted(found)


def peft_adapted(pm):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer))


# ----------------------------------------------------------------------------- from_dict
@pytest.mark.parametrize("key,value", [("use_bdlora", {"a": 1}), ("layer_replication", [[0, 1]]), ("target_parameters", ["w"])])
def test_lora_from_dict_refuses_what_it_does_not_implement(key, value):
    """A peft feature that changes the computation is refused by name, never dropped into plain LoRA."""
    with pytest.raises(ValueError, match=f"does not implement: {key}="):
        fusedpeft.LoraConfig.from_dict({"r": 4, key: value})
    assert fusedpeft.LoraConfig.from_dict({"r": 4, key: None}).r == 4  # unset: fine


def test_from_dict_implements_lora_bias_and_layer_selection_and_warns_on_unknown_keys():
    config = fusedpeft.LoraConfig.from_dict({"r": 4, "lora_bias": True, "layers_to_transform": [0, 2],
                                             "layers_pattern": "layers", "task_type": "CAUSAL_LM"})
    assert config.lora_bias is True and config.layers_to_transform == [0, 2] and config.layers_pattern == "layers"
    with pytest.warns(UserWarning, match="does not know: \\['new_peft_field'\\]"):
        fusedpeft.LoraConfig.from_dict({"r": 4, "new_peft_field": 3})
    # A default peft config's dict reads back without a warning or an error.
    data = json.loads(json.dumps(peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), default=list))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fusedpeft.LoraConfig.from_dict(data).target_modules == ["q_proj"]
    data = json.loads(json.dumps(peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).to_dict(),
                                 default=list))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fusedpeft.IA3Config.from_dict(data).target_modules == ["k_proj"]


# ----------------------------------------------------------------------------- Conv1D files
def test_gpt2_adapter_file_says_fan_in_fan_out_as_peft_does(tmp_path):
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        fusedpeft.inject(model, fusedpeft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    fusedpeft.save_adapter(model, tmp_path / "f")
    with warnings.catch_warnings(record=True) as seen:  # peft's note of the same fix
        warnings.simplefilter("always")
        pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    assert any("Setting fan_in_fan_out to True" in str(w.message) for w in seen)
    pm.save_pretrained(tmp_path / "p")
    ours = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert ours["fan_in_fan_out"] is True and theirs["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading the file warns no more
        fusedpeft.load_adapter(tiny_gpt2(), tmp_path / "f")


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_default_targets_are_peft_defaults(method, tmp_path):
    """No target_modules: the architecture's defaults, the same modules peft adapts; the stored
    config names them (so the file does), and IA3's feed-forward modules come with them."""
    ours = fusedpeft.inject(tiny_llama(), fusedpeft.LoraConfig(r=2) if method == "lora" else fusedpeft.IA3Config())
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2) if method == "lora" else peft.IA3Config())
    assert adapted(ours) == peft_adapted(pm) and adapted(ours)
    config = ours.fusedpeft_config["default"]
    assert sorted(config.target_modules) == sorted(pm.peft_config["default"].target_modules)
    if method == "ia3":
        assert sorted(config.feedforward_modules) == sorted(pm.peft_config["default"].feedforward_modules) == ["down_proj"]
        assert all(m.is_feedforward == n.endswith("down_proj") for n, m in ours.named_modules()
                   if isinstance(m, fusedpeft.IA3Linear))
    fusedpeft.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]


def test_default_targets_unknown_architecture_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="target_modules must be given"):
        fusedpeft.inject(model, fusedpeft.LoraConfig(r=2))
    assert type(model[0]) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


LAYER_CASES = [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj"], layers_to_transform=[2], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["model.layers.2.self_attn.q_proj", "v_proj"], layers_to_transform=[0]),  # a full name stays
]


@pytest.mark.parametrize("kw", LAYER_CASES, ids=range(len(LAYER_CASES)))
def test_layers_to_transform_selects_what_peft_selects(kw):
    ours = fusedpeft.inject(tiny_llama(), fusedpeft.LoraConfig(r=2, **kw))
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, **kw))
    assert adapted(ours) == peft_adapted(pm)


def test_layers_to_transform_checks():
    with pytest.raises(ValueError, match="regex string"):
        fusedpeft.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="needs layers_to_transform"):
        fusedpeft.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ValueError, match="int or a list of ints"):
        fusedpeft.LoraConfig(target_modules=["q_proj"], layers_to_transform=["0"])
    with pytest.raises(ValueError, match="in layers \\[7\\]"):
        fusedpeft.inject(tiny_llama(), fusedpeft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_layers_to_transform_files_both_ways(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 60, (2, 7))
    model = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                         layers_to_transform=[1], init_lora_weights=False))
    fusedpeft.save_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert peft_adapted(back) == ["model.layers.1.self_attn.q_proj"]
    assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, torch.float32, "peft loads ours")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=0,
                                                                  layers_pattern="layers", init_lora_weights=False))
    pm.save_pretrained(tmp_path / "theirs")
    ours = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert adapted(ours) == ["model.layers.0.self_attn.v_proj"]
    assert_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, torch.float32, "we load peft's")


# ----------------------------------------------------------------------------- lora_bias
class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 6, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _lora_bias_twins():
    # b has no base bias: both warn that merging it will be refused
    with pytest.warns(UserWarning, match="has no bias"), pytest.warns(UserWarning, match="cannot be merged"):
        return peft_twins(TwoLinear(), r=3, lora_alpha=6, target_modules=["a", "b"], lora_bias=True, init_lora_weights=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_bias_outputs_and_every_gradient_match_peft(backend):
    _, pm, fm = _lora_bias_twins()
    assert fm.a.lora_B["default"].bias.abs().sum() > 0  # a random bias, never the zero start
    x = torch.randn(5, 12)
    with fusedpeft.use_backend(backend):
        y_f = fm(x)
    assert_step_matches_peft(pm, fm, pm(x), y_f, "a.lora_B.default.bias")


def test_lora_bias_files_both_ways(tmp_path):
    base, pm, fm = _lora_bias_twins()
    x = torch.randn(4, 12)
    fusedpeft.save_adapter(fm, tmp_path / "ours")
    with pytest.warns(UserWarning, match="has no bias"):
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(back(x), fm(x), torch.float32, "peft loads ours")
    with pytest.warns(UserWarning, match="invalid shape.*lora_B.bias"):  # peft's check taking a bias for a shard
        pm.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match="cannot be merged"):
        ours = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert_close(ours(x), pm(x), torch.float32, "we load peft's")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_bias_of_several_active_adapters_adds_up(backend):
    """Two active adapters with lora_bias (the joined rank-(r1 + r2) call): the output is the base plus
    each adapter's own update, its scaled b_B included; every gradient reaches both adapters."""
    layer = fusedpeft.LoraLinear(nn.Linear(12, 20), r=3, lora_alpha=6, lora_bias=True, init_lora_weights=False)
    layer.update_layer("b", 2, 5.0, lora_bias=True, init_lora_weights=False)
    for name in ("default", "b"):
        torch.nn.init.normal_(layer.lora_B[name].bias)
    x = torch.randn(5, 12)
    base = layer.base_layer(x)
    parts = {}
    for name in ("default", "b"):
        layer.set_adapter(name)
        parts[name] = layer(x) - base
    layer.set_adapter(["default", "b"])
    with fusedpeft.use_backend(backend):
        y = layer(x)
    assert_close(y, base + parts["default"] + parts["b"], torch.float32, "two adapters with lora_bias")
    y.square().sum().backward()
    assert all(layer.lora_B[n].bias.grad.abs().sum() > 0 for n in ("default", "b"))


def test_lora_bias_file_without_the_lora_B_bias_is_refused(tmp_path):
    """lora_B's bias is the adapter's own tensor, not an optional base bias: a file without it would
    leave the bias at its initial value, so load_adapter refuses it by name and changes nothing."""
    base, _, fm = _lora_bias_twins()
    fusedpeft.save_adapter(fm, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(path)
    dropped = [k for k in weights if k.endswith("lora_B.bias")]
    assert dropped
    safetensors.torch.save_file({k: v for k, v in weights.items() if k not in dropped}, path)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys.*lora_B.bias"):
        fusedpeft.load_adapter(model, tmp_path)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_bias_merge_unmerge_and_refusal():
    base, _, fm = _lora_bias_twins()
    x = torch.randn(4, 12)
    y = fm(x)
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    with pytest.raises(RuntimeError, match="no bias to merge"):  # layer b has none
        fusedpeft.merge(fm)
    assert all(torch.equal(v, before[k]) for k, v in fm.state_dict().items()), "a refused merge changed the model"
    fm.a.merge()
    assert_close(fm.a.base_layer.bias, base.a.bias + fm.a.scaling["default"] * fm.a.lora_B["default"].bias,
                 torch.float32, "merged bias")
    assert_close(fm(x), y, torch.float32, "after merging a")
    fm.a.unmerge()
    assert_close(fm.a.base_layer.bias, base.a.bias, torch.float32, "unmerged bias")


# ----------------------------------------------------------------------------- inits from the base
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_base_weight_inits_match_peft(init):
    """pissa / pissa_niter_<n> / olora: the same A, B and residual base as peft's, and the model's
    output unchanged by the injection."""
    base = tiny_llama(2)
    ids = torch.randint(0, 60, (2, 7))
    y0 = base(input_ids=ids).logits
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(5)
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(**config))
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    ours = fm.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        if "lora_" in key or "base_layer" in key:
            assert_close(ours[key], theirs[key], torch.float32, key)
    assert not torch.equal(fm.model.layers[0].self_attn.q_proj.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert_close(fm(input_ids=ids).logits, y0, torch.float32, "output after the init")


def test_pissa_file_loads_onto_the_residual_base(tmp_path):
    base = tiny_llama(2)
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      init_lora_weights="pissa"))
    fusedpeft.save_adapter(fm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"  # as peft
    residual = copy.deepcopy(fm)
    fusedpeft.eject(residual)  # the base model as saved after injection
    with pytest.warns(UserWarning, match="residual base"):
        back = fusedpeft.load_adapter(residual, tmp_path)
    ids = torch.randint(0, 60, (2, 7))
    assert_close(back(input_ids=ids).logits, base(input_ids=ids).logits, torch.float32, "pissa reload")


def test_pissa_rank_above_a_weight_is_refused_before_any_change():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="r <= min\\(in, out\\) = 3 at 1"):
        fusedpeft.inject(model, fusedpeft.LoraConfig(r=4, target_modules=["0", "1"], init_lora_weights="pissa"))
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "layer 0's base was rewritten"


# ----------------------------------------------------------------------------- LoRA on nn.Embedding
class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output (Gemma's): the adapter's part must be scaled too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = torch.tensor(3.0)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class WithEmbedding(nn.Module):
    def __init__(self, scaled=False):
        super().__init__()
        self.emb = (ScaledEmbedding if scaled else nn.Embedding)(30, 16, padding_idx=0)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids):
        return self.proj(torch.tanh(self.emb(ids)))


def _embedding_twins(scaled=False):
    return peft_twins(WithEmbedding(scaled), r=4, lora_alpha=8, target_modules=["emb", "proj"], init_lora_weights=False)


@pytest.mark.parametrize("scaled", [False, True])
def test_embedding_lora_outputs_and_gradients_match_peft(scaled):
    _, pm, fm = _embedding_twins(scaled)
    assert type(fm.emb) is fusedpeft.modules.LoraEmbedding
    assert fm.emb.lora_embedding_A["default"].shape == (4, 30) and fm.emb.lora_embedding_B["default"].shape == (16, 4)
    ids = torch.randint(0, 30, (3, 7))
    assert_step_matches_peft(pm, fm, pm(ids), fm(ids), "emb.lora_embedding_A.default")


def test_embedding_lora_default_init_is_a_no_op_like_peft():
    base = WithEmbedding()
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(r=4, target_modules=["emb"]))
    A, B = fm.emb.lora_embedding_A["default"], fm.emb.lora_embedding_B["default"]
    assert not A.any() and B.abs().sum() > 0  # A zero, B normal: the reverse of a linear layer's
    ids = torch.randint(0, 30, (2, 5))
    assert torch.equal(fm(ids), base(ids))


def test_embedding_lora_files_both_ways_and_merge(tmp_path):
    base, pm, fm = _embedding_twins()
    ids = torch.randint(0, 30, (3, 7))
    fusedpeft.save_adapter(fm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(back(ids), fm(ids), torch.float32, "peft loads ours")
    pm.save_pretrained(tmp_path / "theirs")
    ours = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert_close(ours(ids), pm(ids), torch.float32, "we load peft's")
    y = fm(ids)
    fusedpeft.merge(fm)
    assert_close(fm(ids), y, torch.float32, "merged")
    fusedpeft.eject(fm, merge=False)
    assert type(fm.emb) is nn.Embedding and torch.allclose(fm.emb.weight, base.emb.weight, atol=1e-6)


def test_embedding_lora_adapter_names_match_peft_mixed_batch():
    base = WithEmbedding()
    config = dict(r=4, lora_alpha=8, target_modules=["emb", "proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    pm.add_adapter("other", peft.LoraConfig(**config))
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(**config))
    fusedpeft.inject(fm, fusedpeft.LoraConfig(**config), adapter_name="other")
    fm.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}, strict=True)
    ids = torch.randint(0, 30, (3, 5))
    names = ["other", "__base__", "default"]
    pm.eval()
    fm.eval()
    theirs = pm.base_model.model.emb(ids, adapter_names=names)
    assert_close(fm.emb(ids, adapter_names=names), theirs, torch.float32, "mixed batch")
    assert not torch.allclose(theirs[0], pm.base_model.model.emb.base_layer(ids)[0])  # row 0 is adapted


@pytest.mark.parametrize("kw,match", [(dict(lora_bias=True), "lora_bias"), (dict(init_lora_weights="olora"), "olora")])
def test_embedding_lora_refuses_what_peft_refuses_before_any_change(kw, match):
    model = WithEmbedding()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fusedpeft.inject(model, fusedpeft.LoraConfig(r=2, target_modules=["proj", "emb"], **kw))
    assert type(model.emb) is nn.Embedding and type(model.proj) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_random_inits_draw_what_peft_draws(init, tmp_path):
    """The default and "gaussian" inits: under the same seed, the same A as peft (B zero), and the
    file records the init as peft's does."""
    base = TwoLinear()
    config = dict(r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=init)
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(3)
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(**config))
    for name in ("a", "b"):
        ours, theirs = getattr(fm, name), getattr(pm.base_model.model, name)
        assert torch.equal(ours.lora_A["default"].weight, theirs.lora_A["default"].weight), name
        assert not ours.lora_B["default"].weight.any()
    fusedpeft.save_adapter(fm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
