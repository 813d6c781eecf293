"""The injector on a plain nn.Module and on a tiny random transformers Llama: which modules it
targets, what trains, several adapters, merge, errors that leave the model untouched, eject, the
trainable-parameter line (against peft's own), and the backend registry."""
import copy
import re
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import fusedpeft
from fusedpeft import IA3Config, IA3Linear, LoraConfig, LoraLinear, SSFConfig, SSFLinear
from fusedpeft.inject import adapter_layers
from fusedpeft.modules import ModulesToSaveWrapper

from helpers import assert_close, rel_err

DTYPES = [torch.float32, torch.bfloat16]
VOCAB, D, F = 48, 32, 40


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- models
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, h):
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
        return self.o(att @ v)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, F)
        self.down = nn.Linear(F, D)

    def forward(self, h):
        return self.down(torch.nn.functional.gelu(self.up(h)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = MLP()
        self.proj = Conv1D(D, D)  # GPT-2 style (in, out) weight

    def forward(self, h):
        h = h + self.attn(self.norm(h))
        return h + self.proj(self.mlp(h))


class Toy(nn.Module):
    """Nested plain torch model: embedding, two blocks, final norm and lm_head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        with torch.no_grad():  # random everything, biases and norms included
            for p in self.parameters():
                p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 3.0))

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.norm(h))


def _toy(dtype=torch.float32):
    return Toy().to(dtype)


def _llama(dtype=torch.float32):
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_bias=True,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 7))


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _names(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _lora(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(**kw)


def _ia3(**kw):
    kw.setdefault("init_ia3_weights", False)
    return IA3Config(**kw)


def _ssf(**kw):
    kw.setdefault("init_ssf_weights", False)
    return SSFConfig(**kw)


def _inject(model, config, name="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D: "setting fan_in_fan_out=True"
        return fusedpeft.inject(model, config, name)


def _randomise_adapters(model):
    """Adapter weights away from their no-op init (B = 0, l = 1, scale 1 and shift 0), whatever the
    config said, every adapter of every layer: IA3 and SSF scales around one, SSF shifts about as
    large as the layer's output, LoRA updates s B A about as large as W itself
    (a real change of each layer that does not drown the base, so deep models stay well conditioned)."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            w_std = layer.base_weight().float().std().item()
            for a in layer.adapter_names:
                if isinstance(layer, IA3Linear):
                    layer.ia3_l[a].copy_(1.0 + 0.5 * torch.randn_like(layer.ia3_l[a]))
                    continue
                if isinstance(layer, SSFLinear):
                    layer.ssf_scale[a].copy_(1.0 + 0.5 * torch.randn_like(layer.ssf_scale[a]))
                    layer.ssf_shift[a].copy_(0.5 * torch.randn_like(layer.ssf_shift[a]))
                    continue
                A, B, r = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.r[a]
                A.copy_(torch.randn_like(A) / layer.in_features**0.5)
                B.copy_(torch.randn_like(B) * w_std * (layer.in_features / r) ** 0.5 / layer.scaling[a])


def _reference(base_copy, model):
    """float64 forward of the formula: a float64 copy of the original model with each adapted layer's
    active adapters folded in exactly (LoRA: W + sum s B A; IA3: rows of W and b, or columns of W,
    times prod l; SSF: rows of W times each scale, b -> b * scale + shift in order, from a zero
    bias where the layer has none) and each modules_to_save module replaced by its active trained copy."""
    ref = copy.deepcopy(base_copy).double()
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            target = ref.get_submodule(name)
            w = target.weight.T if layer.fan_in_fan_out else target.weight  # (out, in) view
            assert not layer.merged
            for a in layer.active_adapters:
                if isinstance(layer, LoraLinear):
                    B, A = layer.lora_B[a].weight.double(), layer.lora_A[a].weight.double()
                    w += layer.scaling[a] * (B @ A)
                elif isinstance(layer, SSFLinear):
                    s, t = layer.ssf_scale[a].double(), layer.ssf_shift[a].double()
                    w *= s[:, None]
                    if target.bias is None:
                        target.bias = nn.Parameter(torch.zeros_like(s))
                    target.bias.mul_(s).add_(t)
                else:
                    l = layer.ia3_l[a].double().flatten()
                    if layer.is_feedforward:
                        w *= l[None, :]
                    else:
                        w *= l[:, None]
                        if target.bias is not None:
                            target.bias *= l
        for name, wrapper in list(model.named_modules()):
            if isinstance(wrapper, ModulesToSaveWrapper) and wrapper.active_adapters:
                parent_name, _, child = name.rpartition(".")
                parent = ref.get_submodule(parent_name) if parent_name else ref
                setattr(parent, child, copy.deepcopy(wrapper.modules_to_save[wrapper.active_adapters[0]]).double())
    return ref


def _snapshot(model):
    """Everything a failed call must leave as it was: module objects and types, state bit for bit,
    requires_grad flags, attached adapter configs."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "configs": dict(getattr(model, "fusedpeft_config", {})),
    }


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["grad"] == snap["grad"]
    assert now["configs"] == snap["configs"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


# ----------------------------------------------------------------------------- plain model
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inject_target_list_on_plain_model(dtype):
    model = _toy(dtype)
    base_copy = copy.deepcopy(model)
    originals = {n: model.get_submodule(n) for n in ("blocks.0.attn.q", "blocks.1.attn.v", "blocks.0.proj")}
    weights = {n: m.weight for n, m in originals.items()}
    ids = _ids()
    y_base = _out(model, ids)

    out = _inject(model, _lora(target_modules=["q", "v", "proj"]))
    assert out is model
    wrapped = ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.proj", "blocks.1.attn.q", "blocks.1.attn.v", "blocks.1.proj"]
    assert _names(model, LoraLinear) == wrapped
    for n, m in originals.items():  # the same module and Parameter objects, no copy
        assert model.get_submodule(n).base_layer is m and m.weight is weights[n]
    assert model.blocks[0].proj.fan_in_fan_out and not model.blocks[0].attn.q.fan_in_fan_out
    assert type(model.blocks[0].attn.k) is nn.Linear and type(model.lm_head) is nn.Linear
    assert _trainable(model) == sorted(f"{n}.lora_{ab}.default.weight" for n in wrapped for ab in "AB")
    assert model.fusedpeft_config["default"].target_modules == ["proj", "q", "v"]

    y = _out(model, ids)
    assert_close(y, _out(_reference(base_copy, model), ids), dtype, "injected forward")
    assert rel_err(y, y_base) > 0.05  # the adapters do something
    y.square().mean().backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == _trainable(model)


@pytest.mark.parametrize(
    "spec,exclude,expected",
    [
        (["q", "v"], None, ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]),
        (r".*\.attn\.(q|v)", None, ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]),
        (r"blocks\.1\.mlp\..*", None, ["blocks.1.mlp.down", "blocks.1.mlp.up"]),
        (r"q", None, "error"),  # a regex must match the whole name
        (["blocks.0.attn.k"], None, ["blocks.0.attn.k"]),
        (
            "all-linear", None,
            [f"blocks.{i}.{m}" for i in "01" for m in ("attn.k", "attn.o", "attn.q", "attn.v", "mlp.down", "mlp.up", "proj")],
        ),
        ("all-linear", r".*\.(attn\.\w|proj)", ["blocks.0.mlp.down", "blocks.0.mlp.up", "blocks.1.mlp.down", "blocks.1.mlp.up"]),
        (["up", "down"], ["blocks.1.mlp.up"], ["blocks.0.mlp.down", "blocks.0.mlp.up", "blocks.1.mlp.down"]),
    ],
)
def test_target_selection(spec, exclude, expected):
    model = _toy()
    config = _lora(target_modules=spec, exclude_modules=exclude)
    if expected == "error":
        snap = _snapshot(model)
        with pytest.raises(ValueError, match="match no module"):
            _inject(model, config)
        _assert_same(model, snap)
        return
    base_copy = copy.deepcopy(model)
    _inject(model, config)
    assert _names(model, LoraLinear) == sorted(expected)
    assert "lm_head" not in _names(model, LoraLinear)
    ids = _ids()
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, str(spec))


def test_rank_alpha_pattern_and_rslora():
    model = _toy()
    config = _lora(
        target_modules=["q", "v", "up"], r=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"v": 2, r"blocks\.1\.attn\.q": 6}, alpha_pattern={"up": 3.0},
    )
    base_copy = copy.deepcopy(model)
    _inject(model, config)
    expect = {
        "blocks.0.attn.q": (4, 8.0), "blocks.1.attn.q": (6, 8.0), "blocks.0.attn.v": (2, 8.0),
        "blocks.1.attn.v": (2, 8.0), "blocks.0.mlp.up": (4, 3.0), "blocks.1.mlp.up": (4, 3.0),
    }
    for name, (r, alpha) in expect.items():
        layer = model.get_submodule(name)
        assert layer.r["default"] == r and layer.lora_A["default"].weight.shape == (r, layer.in_features)
        assert layer.scaling["default"] == pytest.approx(alpha / r**0.5)  # rslora: alpha / sqrt(r)
    ids = _ids()
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, "patterns")
    plain = _inject(_toy(), _lora(target_modules=["q"], r=4, lora_alpha=8))
    assert plain.blocks[0].attn.q.scaling["default"] == 2.0  # alpha / r without rslora


def test_lora_dropout_only_in_train_mode():
    model = _toy()
    base_copy = copy.deepcopy(model)
    _inject(model, _lora(target_modules=["q", "v", "up"], lora_dropout=0.5))
    ids = _ids()
    model.train()
    y1, y2 = _out(model, ids), _out(model, ids)
    assert not torch.equal(y1, y2), "training forwards drew the same dropout mask"
    model.eval()
    y3, y4 = _out(model, ids), _out(model, ids)
    assert torch.equal(y3, y4)
    assert_close(y3, _out(_reference(base_copy, model), ids), torch.float32, "eval has no dropout")
    assert rel_err(y1, y3) > 1e-3


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_trainability(bias):
    model = _toy()
    _inject(model, _lora(target_modules=["q", "o", "proj"], bias=bias))
    adapters = {n for n in _trainable(model) if "lora_" in n}
    assert len(adapters) == 12
    biases = set(_trainable(model)) - adapters
    all_biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    if bias == "none":
        assert biases == set()
    elif bias == "all":  # every bias in the model, LayerNorms and untargeted layers too
        assert biases == all_biases and "norm.bias" in biases and "blocks.0.mlp.up.bias" in biases
    else:  # biases of adapted layers only (o has none)
        assert biases == {f"blocks.{i}.{m}.base_layer.bias" for i in "01" for m in ("attn.q", "proj")}
    # The weights of adapted layers never train.
    assert not any(n.endswith("base_layer.weight") for n in biases)


def test_modules_to_save_trains_a_copy_and_leaves_the_original():
    model = _toy()
    base_copy = copy.deepcopy(model)
    head, norm = model.lm_head, model.blocks[1].norm
    head_w0 = head.weight.detach().clone()
    _inject(model, _lora(target_modules=["q"], modules_to_save=["lm_head", "blocks.1.norm"]))
    assert isinstance(model.lm_head, ModulesToSaveWrapper) and isinstance(model.blocks[1].norm, ModulesToSaveWrapper)
    assert type(model.blocks[0].norm) is nn.LayerNorm
    assert model.lm_head.original_module is head and model.blocks[1].norm.original_module is norm
    copy_head = model.lm_head.modules_to_save["default"]
    assert copy_head is not head and torch.equal(copy_head.weight, head.weight)
    trainable = _trainable(model)
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert "blocks.1.norm.modules_to_save.default.bias" in trainable
    assert not any("original_module" in n for n in trainable)

    ids = _ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _out(model, ids).square().mean().backward()
        opt.step()
    assert torch.equal(head.weight, head_w0), "the original module was changed"
    assert head.weight.grad is None
    assert not torch.equal(copy_head.weight, head_w0), "the trainable copy did not train"
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, "with modules_to_save")
    with fusedpeft.disable_adapters(model):  # disabled: the base model, original head included
        assert torch.equal(_out(model, ids), _out(base_copy, ids))


def test_two_adapters_under_different_names():
    model = _toy()
    base_copy = copy.deepcopy(model)
    ids = _ids()
    _inject(model, _lora(target_modules=["q", "v"], r=2, modules_to_save=["lm_head"]), "a")
    y_a = _out(model, ids)
    _inject(model, _lora(target_modules=["q", "k"], r=3, lora_alpha=5, modules_to_save=["norm"]), "b")
    q, k, v = (model.blocks[0].attn.get_submodule(n) for n in "qkv")
    assert q.adapter_names == ["a", "b"] and k.adapter_names == ["b"] and v.adapter_names == ["a"]
    assert sorted(model.fusedpeft_config) == ["a", "b"]
    # As in peft, the new adapter arrives inactive everywhere: "a" still runs and trains alone.
    assert q.active_adapters == ["a"] and k.active_adapters == [] and v.active_adapters == ["a"]
    assert model.norm.active_adapters == []
    assert all(".a." in n or n.endswith(".a") for n in _trainable(model))
    _randomise_adapters(model)
    y_a = _out(model, ids)
    assert_close(y_a, _out(_reference(base_copy, model), ids), torch.float32, "a only")

    fusedpeft.set_adapter(model, "b")
    assert q.active_adapters == ["b"] and k.active_adapters == ["b"] and v.active_adapters == []
    assert model.lm_head.active_adapters == [] and model.norm.active_adapters == ["b"]
    assert all(".b." in n or n.endswith(".b") for n in _trainable(model))
    assert "blocks.0.attn.k.lora_A.b.weight" in _trainable(model)
    y_b = _out(model, ids)
    assert_close(y_b, _out(_reference(base_copy, model), ids), torch.float32, "b only")

    fusedpeft.set_adapter(model, ["a", "b"])  # both: LoRA updates add up where both live
    assert q.active_adapters == ["a", "b"]
    # q(a, b), v(a), k(b) in two blocks; lm_head's copy (a); copies (b) of the three LayerNorms named *norm
    assert len(_trainable(model)) == 2 * 8 + 1 + 3 * 2
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, "a+b")
    with pytest.raises(KeyError, match="zzz"):
        fusedpeft.set_adapter(model, ["a", "zzz"])

    # LoRA on attention and IA3 on the MLP: different methods on different modules, both active.
    _inject(model, _ia3(target_modules=["up", "down"], feedforward_modules=["down"]), "c")
    assert isinstance(model.blocks[0].mlp.down, IA3Linear) and model.blocks[0].mlp.down.is_feedforward
    assert not model.blocks[0].mlp.up.is_feedforward
    fusedpeft.set_adapter(model, ["a", "c"])
    _randomise_adapters(model)
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, "lora a + ia3 c")
    assert "blocks.1.mlp.up.ia3_l.c" in _trainable(model)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_merge_unmerge(dtype):
    model = _toy(dtype)
    base_copy = copy.deepcopy(model)
    _inject(model, _lora(target_modules=["q", "v", "proj"]), "lora")
    _inject(model, _ia3(target_modules=["up", "down", "k"], feedforward_modules=["down"]), "ia3")
    _inject(model, _ssf(target_modules=["o", "lm_head"]), "ssf")  # both without a bias
    fusedpeft.set_adapter(model, ["lora", "ia3", "ssf"])
    _randomise_adapters(model)
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = _ids()
    ref = _out(_reference(base_copy, model), ids)
    y = _out(model, ids)
    assert_close(y, ref, dtype, "unmerged")
    fusedpeft.merge(model)
    assert all(layer.merged for _, layer in adapter_layers(model))
    assert model.lm_head.base_layer.bias is not None  # the merged shift needs a bias
    assert_close(_out(model, ids), ref, dtype, "merged")
    fusedpeft.unmerge(model)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    assert {n for n, _ in model.named_parameters() if "base_layer" in n} == weights0.keys()  # that bias is gone
    for n, p in model.named_parameters():
        if n in weights0:
            assert rel_err(p, weights0[n]) <= (1e-6 if dtype == torch.float32 else 2 * 2.0**-8), n
    assert_close(_out(model, ids), ref, dtype, "unmerged again")
    with pytest.raises(ValueError, match="no fusedpeft adapter layers"):
        fusedpeft.merge(_toy())


# ----------------------------------------------------------------------------- errors
def _changed(config, **fields):
    for k, v in fields.items():
        setattr(config, k, v)
    return config


@pytest.mark.parametrize(
    "setup,config,name,exc,match",
    [
        (None, _lora(target_modules=["q", "nope", "missing"]), "x", ValueError, r"target_modules \['missing', 'nope'\] match no module of Toy"),
        (None, _ia3(target_modules=["q", "embed"]), "x", TypeError, r"embed \(Embedding\)"),  # LoRA takes it
        (None, _lora(target_modules=["q"], modules_to_save=["nohead"]), "x", ValueError, "nohead"),
        (None, _lora(target_modules=["q"]), "bad.name", ValueError, "without '.'"),
        ("lora", _lora(target_modules=["v"]), "first", ValueError, "already has an adapter named 'first'"),
        ("ia3", _lora(target_modules=["v", "q"]), "x", TypeError, "already holds IA3Linear adapters"),
        ("lora", _ia3(target_modules=["k", "q"]), "x", TypeError, "already holds LoraLinear adapters"),
        ("ssf", _lora(target_modules=["v", "q"]), "x", TypeError, r"already holds SSFLinear adapters; .* \(LORA asked\)"),
        ("lora", _ssf(target_modules=["k", "q"]), "x", TypeError, r"already holds LoraLinear adapters; .* \(SSF asked\)"),
        (None, _ssf(target_modules=["q", "nope"]), "x", ValueError, r"target_modules \['nope'\] match no module of Toy"),
        (None, _ssf(target_modules=["q", "embed"]), "x", TypeError, r"embed \(Embedding\)"),
        (None, _ssf(target_modules=["q"], modules_to_save=["nohead"]), "x", ValueError, "nohead"),
        (None, _ia3(target_modules=r".*\.nope"), "x", ValueError, r"target_modules '.*nope' match no module of Toy$"),
        # Fields set after the config was built are checked again by inject, before any change.
        (None, _changed(_lora(target_modules=["q", "v"]), r=0), "x", ValueError, "r must be an integer >= 1"),
        (None, _changed(_lora(target_modules=["q", "v"]), rank_pattern={"v": 0}), "x", ValueError, r"rank_pattern\['v'\]"),
        (None, _changed(_lora(target_modules=["q"]), bias="some"), "x", ValueError, "bias must be 'none', 'all' or 'lora_only'"),
        (None, _changed(_ia3(target_modules=["up"]), feedforward_modules=["down"]), "x", ValueError, "feedforward_modules"),
        (None, _changed(_ssf(target_modules=["up"]), init_ssf_weights="paper"), "x", ValueError, "init_ssf_weights"),
    ],
    ids=[
        "unknown", "embedding", "unknown-save", "bad-name", "duplicate", "lora-on-ia3", "ia3-on-lora",
        "lora-on-ssf", "ssf-on-lora", "ssf-unknown", "ssf-embedding", "ssf-unknown-save", "ia3-regex-matches-nothing",
        "r0-set-later", "rank-pattern0-set-later", "bias-set-later", "feedforward-set-later", "ssf-init-set-later",
    ],
)
def test_inject_errors_leave_model_unchanged(setup, config, name, exc, match):
    model = _toy()
    if setup == "lora":
        _inject(model, _lora(target_modules=["q"]), "first")
    elif setup == "ia3":
        _inject(model, _ia3(target_modules=["q"]), "first")
    elif setup == "ssf":
        _inject(model, _ssf(target_modules=["q"]), "first")
    snap = _snapshot(model)
    ids = _ids()
    y0 = _out(model, ids)
    with pytest.raises(exc, match=match):
        _inject(model, config, name)
    _assert_same(model, snap)
    assert torch.equal(_out(model, ids), y0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LoraConfig(target_modules=["q"], r=0), "r must be an integer >= 1"),
        (lambda: LoraConfig(target_modules=["q"], rank_pattern={"v": 0}), r"rank_pattern\['v'\]"),
        (lambda: LoraConfig(target_modules=["q"], bias="some"), "bias must be 'none', 'all' or 'lora_only'"),
        (lambda: LoraConfig(target_modules=["q"], lora_dropout=1.0), "lora_dropout"),
        (lambda: IA3Config(target_modules=["q", "up"], feedforward_modules=["down"]), r"feedforward_modules \['down'\]"),
        (lambda: SSFConfig(target_modules=["q"], init_ssf_weights="gaussian"), "init_ssf_weights must be True, False or 'ssf'"),
        (lambda: SSFConfig(target_modules=["q"], init_ssf_weights=0), "init_ssf_weights must be True, False or 'ssf'"),
    ],
)
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_bias_for_mark_only_adapters_trainable_changes_nothing():
    model = _inject(_toy(), _lora(target_modules=["q"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="bias must be"):
        fusedpeft.mark_only_adapters_trainable(model, bias="everything")
    _assert_same(model, snap)


def test_non_config_and_missing_targets_raise():
    model = _toy()
    snap = _snapshot(model)
    with pytest.raises(TypeError, match="LoraConfig, IA3Config or SSFConfig"):
        fusedpeft.inject(model, peft.LoraConfig(target_modules=["q"]))
    with pytest.raises(TypeError, match="got dict"):
        fusedpeft.inject(model, {"peft_type": "LORA", "target_modules": ["q"]})
    with pytest.raises(ValueError, match="target_modules must be given"):
        fusedpeft.inject(model, LoraConfig())
    _assert_same(model, snap)


def test_rank_above_layer_size_only_warns():
    model = _toy()
    with pytest.warns(UserWarning, match=r"r=40 exceeds min\(in_features, out_features\)=32"):
        fusedpeft.inject(model, _lora(target_modules=["q"], r=40))
    assert model.blocks[0].attn.q.r["default"] == 40


# ----------------------------------------------------------------------------- eject
def test_eject_restores_the_original_model_exactly():
    model = _toy()
    model.embed.weight.requires_grad_(False)  # a flag that inject changes and eject must restore
    modules = dict(model.named_modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    y0 = _out(model, ids)

    _inject(model, _lora(target_modules=["q", "v", "proj"], modules_to_save=["lm_head"]), "a")
    _inject(model, _ia3(target_modules=["up", "down"], feedforward_modules=["down"]), "b")
    _inject(model, _ssf(target_modules=["o", "k"]), "c")  # o has no bias, k has one
    fusedpeft.set_adapter(model, ["a", "b", "c"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _out(model, ids).square().mean().backward()
    opt.step()  # adapters and the lm_head copy train; the base does not
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if "lora_" not in n and "ia3" not in n and "ssf_" not in n and "modules_to_save" not in n)

    assert fusedpeft.eject(model) is model
    assert dict(model.named_modules()).keys() == modules.keys()
    for n, m in model.named_modules():
        assert m is modules[n], n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    new_state = model.state_dict()
    assert new_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(new_state[k], v), k
    assert torch.equal(_out(model, ids), y0)
    assert not hasattr(model, "fusedpeft_config")
    # The model can be adapted again.
    _inject(model, _lora(target_modules=["q"]), "again")
    assert isinstance(model.blocks[0].attn.q, LoraLinear)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eject_merge_gives_a_plain_model_with_the_adapted_output(dtype):
    model = _toy(dtype)
    _inject(model, _lora(target_modules=["q", "v", "proj"], modules_to_save=["lm_head"]), "a")
    _inject(model, _ia3(target_modules=["up", "down", "k"], feedforward_modules=["down"]), "b")
    _inject(model, _ssf(target_modules=["o"]), "c")
    fusedpeft.set_adapter(model, ["a", "b", "c"])
    _randomise_adapters(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["a"].weight.mul_(1.5)
    ids = _ids()
    y = _out(model, ids)
    fusedpeft.eject(model, merge=True)
    assert not any(isinstance(m, (LoraLinear, IA3Linear, SSFLinear, ModulesToSaveWrapper)) for m in model.modules())
    assert type(model.lm_head) is nn.Linear and type(model.blocks[0].proj) is Conv1D
    assert not any("lora" in k or "ia3" in k or "ssf" in k for k in model.state_dict())
    # o had no bias: it now holds the merged SSF shift, and trains as o's weight did before inject
    o = model.blocks[0].attn.o
    assert type(o) is nn.Linear and o.bias is not None and o.bias.requires_grad == o.weight.requires_grad
    assert_close(_out(model, ids), y.double(), dtype, "eject(merge=True)")


def test_eject_after_merge_restores_within_a_rounding():
    model = _toy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _inject(model, _lora(target_modules=["q", "proj"]))
    fusedpeft.merge(model)
    fusedpeft.eject(model)
    for k, v in model.state_dict().items():
        assert rel_err(v, state[k]) <= 1e-6, k


@pytest.mark.parametrize("unmerge_first", [False, True], ids=["eject-unmerges", "unmerge-then-eject"])
def test_eject_after_ssf_merge_restores_the_original_modules(unmerge_first):
    """A merged SSF shift gives a bias-free layer a bias; unmerge (or eject's own unmerge) takes it
    out again: the same module objects, the same state_dict keys, weights within a rounding."""
    model = _toy()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _inject(model, _ssf(target_modules=["q", "o", "proj"]))  # o without a bias, q and proj (Conv1D) with one
    _randomise_adapters(model)
    # Unmerging a bias subtracts the shift and divides by the scale: per entry it is exact up to a
    # few roundings of |bias| + |shift / scale|.
    eps = torch.finfo(torch.float32).eps
    bias_tol = {f"{n}.bias": 4 * eps * (layer.ssf_shift["default"] / layer.ssf_scale["default"]).detach().abs()
                for n, layer in adapter_layers(model)}
    fusedpeft.merge(model)
    assert model.blocks[0].attn.o.base_layer.bias is not None
    if unmerge_first:
        fusedpeft.unmerge(model)
        assert model.blocks[0].attn.o.base_layer.bias is None
    fusedpeft.eject(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert model.blocks[0].attn.o.bias is None and "blocks.0.attn.o.bias" not in model.state_dict()
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        if k in bias_tol:
            assert ((v - state[k]).abs() <= 4 * eps * state[k].abs() + bias_tol[k]).all(), k
        else:
            assert rel_err(v, state[k]) <= 1e-6, k


def test_two_ssf_adapters_compose_where_both_live():
    model = _toy()
    base_copy = copy.deepcopy(model)
    _inject(model, _ssf(target_modules=["q", "o"]), "s1")
    _inject(model, _ssf(target_modules=["o", "up"]), "s2")
    o, up = model.blocks[0].attn.o, model.blocks[0].mlp.up
    assert o.adapter_names == ["s1", "s2"] and o.active_adapters == ["s1"] and up.active_adapters == []
    assert _trainable(model) == sorted(f"blocks.{i}.attn.{m}.ssf_{p}.s1" for i in "01" for m in "qo" for p in ("scale", "shift"))
    _randomise_adapters(model)
    ids = _ids()
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, "s1")
    fusedpeft.set_adapter(model, ["s1", "s2"])  # o applies s1, then s2
    assert o.active_adapters == ["s1", "s2"] and len(_trainable(model)) == 2 * 2 * 4
    y = _out(model, ids)
    assert_close(y, _out(_reference(base_copy, model), ids), torch.float32, "s1 then s2")
    fusedpeft.set_adapter(model, ["s2", "s1"])
    assert_close(_out(model, ids), _out(_reference(base_copy, model), ids), torch.float32, "s2 then s1")
    assert rel_err(_out(model, ids), y) > 1e-3  # the order matters


def test_print_trainable_parameters_counts_ssf(capsys):
    model = _toy()
    total = sum(p.numel() for p in model.parameters())
    _inject(model, _ssf(target_modules=["q", "o", "up", "proj"]))
    trainable = 2 * 2 * (D + D + F + D)  # two blocks, a scale and a shift per output channel
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    capsys.readouterr()
    fusedpeft.print_trainable_parameters(model)
    total += trainable
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}\n"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama_ssf_all_linear(dtype):
    """SSF on every linear layer of a Llama (attention with biases, the MLP without): forward against
    the float64 formula, gradients reach every scale and shift, merge, and eject."""
    model = _llama(dtype)
    base_copy = copy.deepcopy(model)
    _inject(model, _ssf(target_modules="all-linear"))
    assert len(_names(model, SSFLinear)) == 2 * 7 and "lm_head" not in _names(model, SSFLinear)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "ssf_" in n)
    _randomise_adapters(model)
    ids = _ids()
    ref = _out(_reference(base_copy, model), ids)
    y = _out(model, ids)
    assert_close(y, ref, dtype, "ssf llama")
    y.float().square().mean().backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == _trainable(model)
    fusedpeft.merge(model)
    assert model.model.layers[0].mlp.up_proj.base_layer.bias is not None
    assert_close(_out(model, ids), ref, dtype, "merged ssf llama")
    fusedpeft.eject(model)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear and model.model.layers[0].mlp.up_proj.bias is None
    assert model.state_dict().keys() == base_copy.state_dict().keys()


# ----------------------------------------------------------------------------- transformers Llama vs peft
def _peft_config(config):
    data = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    cls = peft.LoraConfig if isinstance(config, LoraConfig) else peft.IA3Config
    return cls(**data)


def _peft_twin(model_copy, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model_copy, _peft_config(config))


LLAMA_CONFIGS = {
    "list": _lora(target_modules=["q_proj", "v_proj"]),
    "all-linear": _lora(target_modules="all-linear"),
    "regex": _lora(target_modules=r".*\.layers\.1\.self_attn\.(k|o)_proj"),
    "exclude": _lora(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    "patterns": _lora(
        target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"up_proj": 3.0},
    ),
    "bias-all": _lora(target_modules=["q_proj", "k_proj"], bias="all"),
    "bias-lora-only": _lora(target_modules=["q_proj", "down_proj"], bias="lora_only"),
    "modules-to-save": _lora(target_modules=["q_proj"], modules_to_save=["lm_head", "model.norm"]),
    "ia3": _ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ia3-save": _ia3(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"], modules_to_save=["lm_head"]),
}


# Every case in fp32, a few in bf16 (adapters kept in fp32 beside the bf16 base, as in peft).
LLAMA_CASES = [(c, torch.float32) for c in LLAMA_CONFIGS] + [
    (c, torch.bfloat16) for c in ("all-linear", "ia3", "modules-to-save")
]


@pytest.mark.parametrize("case,dtype", LLAMA_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in LLAMA_CASES])
def test_llama_matches_peft(case, dtype, capsys):
    config = LLAMA_CONFIGS[case]
    model = _llama(dtype)
    base_copy = copy.deepcopy(model)
    twin = _peft_twin(copy.deepcopy(model), config)
    _inject(model, config)
    _randomise_adapters(model)

    # Same targets, same parameter names (peft's prefix aside), same shapes, same trainable set.
    prefix = "base_model.model."
    ours = model.state_dict()
    theirs = {k[len(prefix):]: v for k, v in twin.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    peft_trainable = sorted(n[len(prefix):] for n, p in twin.named_parameters() if p.requires_grad)
    assert _trainable(model) == peft_trainable
    if isinstance(config, LoraConfig):
        for name, layer in adapter_layers(model):
            assert layer.scaling["default"] == pytest.approx(twin.base_model.model.get_submodule(name).scaling["default"])

    # Same outputs, both equal to the float64 formula.
    twin.load_state_dict({prefix + k: v for k, v in ours.items()}, strict=True)
    ids = _ids()
    ref = _out(_reference(base_copy, model), ids)
    y = _out(model, ids)
    assert_close(y, ref, dtype, f"fusedpeft {case}")
    assert_close(_out(twin, ids), ref, dtype, f"peft {case}")

    # The trainable-parameter line, word for word and number for number.
    capsys.readouterr()
    fusedpeft.print_trainable_parameters(model)
    line = capsys.readouterr().out
    twin.print_trainable_parameters()
    assert line == capsys.readouterr().out
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", line)


def test_llama_all_linear_excludes_lm_head_and_merges():
    model = _llama()
    base_copy = copy.deepcopy(model)
    _inject(model, _lora(target_modules="all-linear"))
    names = _names(model, LoraLinear)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert all(n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} for n in names)
    ids = _ids()
    ref = _out(_reference(base_copy, model), ids)
    fusedpeft.merge(model)
    assert_close(_out(model, ids), ref, torch.float32, "merged llama")
    fusedpeft.eject(model, merge=False)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close(_out(model, ids), _out(base_copy.double(), ids), torch.float32, "ejected llama")


def test_print_trainable_parameters_on_plain_model_matches_peft(capsys):
    model = _toy()
    config = _lora(target_modules=["q", "v", "proj"], modules_to_save=["lm_head"], bias="lora_only")
    twin = _peft_twin(copy.deepcopy(model), config)
    _inject(model, config)
    capsys.readouterr()
    fusedpeft.print_trainable_parameters(model)
    ours = capsys.readouterr().out
    twin.print_trainable_parameters()
    assert ours == capsys.readouterr().out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert ours == f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}\n"


# ----------------------------------------------------------------------------- backends
def test_backend_registry_nesting_last_backend_and_counts():
    model = _toy()
    _inject(model, _lora(target_modules=["q", "v"]), "lora")  # 4 LoRA layers
    _inject(model, _ia3(target_modules=["up"]), "ia3")  # 2 IA3 layers
    _inject(model, _ssf(target_modules=["o"]), "ssf")  # 2 SSF layers
    fusedpeft.set_adapter(model, ["lora", "ia3", "ssf"])
    ids = _ids()
    before = fusedpeft.backend_counts()
    with fusedpeft.use_backend("torch"):
        _out(model, ids)
        with fusedpeft.use_backend("nonexistent"):
            with pytest.raises(RuntimeError, match="'nonexistent' was requested"):
                _out(model, ids)
            with fusedpeft.use_backend("torch"):  # innermost wins
                _out(model, ids).sum().backward()  # the backward picks no new backend
        _out(model, ids)  # the inner blocks are gone again
    after = fusedpeft.backend_counts()
    assert fusedpeft.last_backend("lora_linear") == "torch" and fusedpeft.last_backend("ia3_linear") == "torch"
    assert after.get(("lora_linear", "torch"), 0) - before.get(("lora_linear", "torch"), 0) == 3 * 4
    assert after.get(("ia3_linear", "torch"), 0) - before.get(("ia3_linear", "torch"), 0) == 3 * 2
    assert after.get(("ssf_linear", "torch"), 0) - before.get(("ssf_linear", "torch"), 0) == 3 * 2
    assert fusedpeft.last_backend("ssf_linear") == "torch"
    # "auto" inside a forced block restores automatic choice (torch on CPU).
    with fusedpeft.use_backend("nonexistent"), fusedpeft.use_backend("auto"):
        _out(model, ids)
    assert fusedpeft.last_backend("lora_linear") == "torch"
    # Disabled or merged layers run the base layer only: no fused op is called.
    counts = fusedpeft.backend_counts()
    with fusedpeft.disable_adapters(model):
        _out(model, ids)
    assert fusedpeft.backend_counts() == counts
    assert fusedpeft.last_backend("no_such_op") is None
