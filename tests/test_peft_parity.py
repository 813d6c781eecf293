"""fusedpeft against HF peft itself: the same adapter weights give the same outputs and gradients
(LoRA and its variants, IA3), on a small torch model and a tiny random Llama; and
``fusedpeft.from_peft`` swapping the layers of a live PeftModel without changing what it computes,
what it trains, or what it saves."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fusedpeft
from fusedpeft.peft_compat import PeftIA3Linear, PeftLoraLinear

from helpers import TOL, assert_close, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    """A few nn.Linear of different shapes, one without bias."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 20, bias=False)
        self.out = nn.Linear(20, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = nn.functional.gelu(self.fc1(x))
        return self.head(torch.tanh(self.out(nn.functional.silu(self.fc2(h)))))  # smooth: no ReLU kinks in bf16 grads


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    """transformers' Conv1D layers: weights stored (in, out), peft's fan_in_fan_out=True."""
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


MLP_TARGETS = ["fc1", "fc2", "out"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(kind, dtype=torch.float32):
    model = {"mlp": MLP, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind]()
    return model.to(dtype)


def make_input(kind, dtype=torch.float32):
    if kind == "mlp":
        return torch.randn(2, 7, 12, dtype=dtype)
    return torch.randint(0, 100, (2, 9))


def run(model, kind, x):
    return model(x) if kind == "mlp" else model(input_ids=x).logits


def peft_config(method, **kw):
    return (peft.LoraConfig if method == "lora" else peft.IA3Config)(**kw)


def fused_config(method, **kw):
    return (fusedpeft.LoraConfig if method == "lora" else fusedpeft.IA3Config)(**kw)


def strip(name):
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def twins(kind, method, kw, dtype=torch.float32):
    """(base, peft model, fusedpeft model) holding the same adapter weights: peft draws them, the
    fusedpeft model loads peft's state dict by name (strict: the parameter names are identical)."""
    base = make_base(kind, dtype)
    with warnings.catch_warnings():
        # lora_bias on a bias-free layer (the MLP's fc2): both warn that it cannot be merged
        warnings.filterwarnings("ignore", message=".*(has no bias|cannot be merged)")
        pm = peft.get_peft_model(copy.deepcopy(base), peft_config(method, **kw))
        fm = fusedpeft.inject(copy.deepcopy(base), fused_config(method, **kw))
    fm.load_state_dict({strip(k): v for k, v in pm.state_dict().items()}, strict=True)
    return base, pm, fm


def trainable(model):
    return {strip(n): p for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- parity
LORA_MLP = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True),
    "bias_all": dict(r=4, lora_alpha=8, bias="all"),
    "bias_lora_only": dict(r=3, lora_alpha=8, bias="lora_only"),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"fc2": 2, "^out$": 6}, alpha_pattern={"fc1": 3}),
    "modules_to_save": dict(r=2, lora_alpha=4, modules_to_save=["head"]),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True),  # fc2 has no base bias: b_B alone there
}
LORA_LLAMA = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={"gate_proj": 3, "o_proj": 16}),
    "layers_to_transform": dict(r=4, lora_alpha=8, layers_to_transform=[1], layers_pattern="layers"),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True),
}
IA3_CASES = {
    ("mlp", "ff"): dict(target_modules=MLP_TARGETS, feedforward_modules=["fc2"]),
    ("mlp", "no_ff"): dict(target_modules=MLP_TARGETS, feedforward_modules=[]),
    ("llama", "ff"): dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ("llama", "no_ff"): dict(target_modules=["k_proj", "v_proj", "up_proj"], feedforward_modules=[]),
}
CASES = (
    [("mlp", "lora", name, dict(kw, target_modules=MLP_TARGETS, init_lora_weights=False)) for name, kw in LORA_MLP.items()]
    + [("llama", "lora", name, dict(kw, target_modules=LLAMA_TARGETS, init_lora_weights=False)) for name, kw in LORA_LLAMA.items()]
    + [(kind, "ia3", name, dict(kw, init_ia3_weights=False)) for (kind, name), kw in IA3_CASES.items()]
    + [("gpt2", "lora", "conv1d", dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True, r=4, lora_alpha=8,
                                        bias="lora_only", init_lora_weights=False)),
       ("gpt2", "ia3", "conv1d", dict(target_modules=GPT2_TARGETS, feedforward_modules=["c_proj"], fan_in_fan_out=True,
                                       init_ia3_weights=False))]
)


# A model's float32 gradients carry more rounding than one op's (TOL): they pass through attention's
# softmax, RoPE and the layers after. Over 160 seeds x the first 12 cases, fusedpeft's worst error was
# 2.8e-5 (the tiny Llama with lora_bias, layer 1's q / k adapters: the bias b + s b_B is summed before
# the GEMM, peft adds s b_B after it) where peft's own on that tensor was 7.5e-6.
MODEL_TOL = {torch.float32: 5e-5}


def _compare_step(kind, pm, fm, dtype, what):
    """fusedpeft's and peft's float32 output and gradients against peft run in float64 on the same
    weights and input. fusedpeft's relative error must be within MODEL_TOL, or within twice peft's own
    where float32 rounding alone takes peft past it (a bias gradient summed over every token of a
    model)."""
    ref = copy.deepcopy(pm).double()
    x = make_input(kind)
    x_ref = x.double() if x.is_floating_point() else x
    y_ref, y_p, y_f = run(ref, kind, x_ref), run(pm, kind, x), run(fm, kind, x)

    def check(actual, peft_actual, reference, name):
        bound = max(MODEL_TOL[dtype], 2 * rel_err(peft_actual, reference))
        err = rel_err(actual, reference)
        assert err <= bound, f"{what} {name}: relative error {err:.3e} > {bound:.1e} ({dtype})"

    check(y_f, y_p, y_ref, "output")
    g = torch.randn_like(y_ref)
    for y in (y_ref, y_p, y_f):
        y.backward(g.to(y.dtype))
    t_ref, t_p, t_f = trainable(ref), trainable(pm), trainable(fm)
    assert set(t_p) == set(t_f) == set(t_ref), what
    assert any("lora_" in n or "ia3_l" in n for n in t_p)
    for name, p in t_ref.items():
        assert t_p[name].grad is not None and t_f[name].grad is not None, f"{what}: no gradient for {name}"
        check(t_f[name].grad, t_p[name].grad, p.grad, f"grad {name}")


@pytest.mark.parametrize("kind,method,name,kw", CASES, ids=[f"{k}-{m}-{n}" for k, m, n, _ in CASES])
def test_outputs_and_gradients_match_peft(kind, method, name, kw):
    _, pm, fm = twins(kind, method, kw)
    for layer in (m for m in fm.modules() if isinstance(m, fusedpeft.LoraLinear)):
        assert all(w.abs().sum() > 0 for w in (l.weight for l in layer.lora_B.values())), "lora_B left at zero"
    _compare_step(kind, pm, fm, torch.float32, f"{kind}/{method}/{name}")


# (case, IA3 output-scale gradient mode): the mode applies to IA3 only.
TRITON_PARITY = [(c, mode) for c in CASES if c[0] == "llama" and (c[1] == "ia3" or c[2] == "plain")
                 for mode in (("save", "recompute") if c[1] == "ia3" else ("save",))]


@pytest.mark.parametrize("case,grad_mode", TRITON_PARITY, ids=[f"{c[0]}-{c[1]}-{c[2]}-{m}" for c, m in TRITON_PARITY])
def test_triton_kernels_match_peft(case, grad_mode, monkeypatch, use_settings):
    """The same comparison with fusedpeft's layers forced onto the Triton kernels (the CPU
    interpreter here, the GPU in tests/test_cuda.py): LoRA and IA3 output and input scaling on the
    tiny Llama, both ways of getting IA3's output-scale gradient."""
    kind, method, name, kw = case
    use_settings(output_scale_grad=grad_mode)
    _, pm, fm = twins(kind, method, kw)
    fusedpeft.backends.reset_counts()
    with fusedpeft.use_backend("triton"):
        _compare_step(kind, pm, fm, torch.float32, f"triton {kind}/{method}/{name}/{grad_mode}")
    ran = {op for (op, backend) in fusedpeft.backend_counts() if backend == "triton"}
    assert ran == {"lora_linear" if method == "lora" else "ia3_linear"}, fusedpeft.backend_counts()


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_bf16_base_matches_peft_in_float64(method):
    """bf16 base with float32 adapter weights (both libraries' default). peft runs the LoRA path in
    float32, fusedpeft in bf16 (adapters cast to the compute dtype), so both are compared with a
    float64 run of peft on the same weights. Outputs at bf16 tolerance. Gradients pass back through
    four bf16 layers of a model a dozen features wide, where a few sums cancel: over 10,000 seeds
    both libraries' gradient errors have a median of 5e-3, and peft's own pass 2e-2 on 6 of 55,000
    tensors (2.84e-2 at worst; seed 1566649255: 2.24e-2 on out's bias). So each of fusedpeft's
    gradients must be within bf16 tolerance of float64 beyond peft's own error on that tensor."""
    kw = dict(target_modules=MLP_TARGETS)
    kw.update(dict(r=4, lora_alpha=8, bias="lora_only", init_lora_weights=False) if method == "lora"
              else dict(feedforward_modules=["fc1"], init_ia3_weights=False))
    base, pm, fm = twins("mlp", method, kw, torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in fm.named_parameters() if "lora_" in n or "ia3_l" in n)
    ref = peft.get_peft_model(copy.deepcopy(base).double(), peft_config(method, **kw))
    ref.load_state_dict({k: v.double() for k, v in pm.state_dict().items()}, strict=True)
    x = make_input("mlp", torch.bfloat16)
    y_f, y_p, y_ref = fm(x), pm(x), ref(x.double())
    assert y_f.dtype == y_p.dtype == torch.bfloat16
    assert_close(y_f, y_ref, torch.bfloat16, "fusedpeft bf16")
    assert_close(y_p, y_ref, torch.bfloat16, "peft bf16")
    # One upstream gradient for both: drawn in bf16, so the float64 reference sees exactly what the
    # bf16 model sees and the comparison measures the backward pass, not the rounding of g.
    g = torch.randn_like(y_f)
    for y in (y_f, y_p):
        y.backward(g)
    y_ref.backward(g.double())
    t_f, t_p, t_ref = trainable(fm), trainable(pm), trainable(ref)
    assert set(t_f) == set(t_p) == set(t_ref)
    for name, p in t_ref.items():
        assert t_f[name].grad.dtype == t_f[name].dtype
        err, err_peft = rel_err(t_f[name].grad, p.grad), rel_err(t_p[name].grad, p.grad)
        assert err <= TOL[torch.bfloat16] + err_peft, \
            f"bf16 grad {name}: relative error {err:.3e}, peft's {err_peft:.3e}"


# ----------------------------------------------------------------------------- from_peft
def _names_and_ids(model):
    return [(n, id(p)) for n, p in model.named_parameters()]


SWAP_CASES = {
    "llama-lora": ("llama", "lora", dict(target_modules=LLAMA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)),
    "mlp-lora-bias-mts": ("mlp", "lora", dict(target_modules=MLP_TARGETS, r=4, lora_alpha=8, bias="all",
                                              modules_to_save=["head"], init_lora_weights=False)),
    "mlp-ia3": ("mlp", "ia3", dict(target_modules=MLP_TARGETS, feedforward_modules=["fc2"], init_ia3_weights=False)),
    "llama-ia3": ("llama", "ia3", dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                       init_ia3_weights=False)),
    "gpt2-lora": ("gpt2", "lora", dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True, r=4, lora_alpha=8,
                                       init_lora_weights=False)),
    "mlp-lora_bias": ("mlp", "lora", dict(target_modules=MLP_TARGETS, r=4, lora_alpha=8, lora_bias=True,
                                          init_lora_weights=False)),
}


def _peft_model(kind, method, kw):
    base = make_base(kind)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no bias")  # lora_bias on the MLP's bias-free fc2
        return base, peft.get_peft_model(copy.deepcopy(base), peft_config(method, **kw))


@pytest.mark.parametrize("case", list(SWAP_CASES))
def test_from_peft_keeps_names_parameters_outputs(case):
    kind, method, kw = SWAP_CASES[case]
    base, pm = _peft_model(kind, method, kw)
    x = make_input(kind)
    before = _names_and_ids(pm)
    modules_before = [n for n, _ in pm.named_modules()]
    y0 = run(pm, kind, x)
    peft_layer = peft.tuners.lora.layer.Linear if method == "lora" else peft.tuners.ia3.layer.Linear
    n_peft = sum(type(m) is peft_layer for m in pm.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is left behind
        assert fusedpeft.from_peft(pm) is pm
    fused_cls = PeftLoraLinear if method == "lora" else PeftIA3Linear
    assert sum(type(m) is fused_cls for m in pm.modules()) == n_peft > 0
    assert not any(type(m) is peft_layer for m in pm.modules())
    assert _names_and_ids(pm) == before, "parameter names or objects changed"
    assert [n for n, _ in pm.named_modules()] == modules_before
    assert_close(run(pm, kind, x), y0, torch.float32, "output after the swap")
    # peft sees the swapped layers as its own
    assert isinstance(next(m for m in pm.modules() if isinstance(m, fused_cls)), peft.tuners.tuners_utils.BaseTunerLayer)
    assert pm.get_model_status().active_adapters == ["default"]


@pytest.mark.parametrize("case", ["llama-lora", "mlp-lora-bias-mts", "mlp-ia3", "mlp-lora_bias"])
def test_from_peft_optimizer_built_before_keeps_training_like_peft(case):
    kind, method, kw = SWAP_CASES[case]
    _, pm = _peft_model(kind, method, kw)
    twin = copy.deepcopy(pm)
    # Adam divides by sqrt(v) + eps: with the default eps an entry whose gradient is at rounding
    # level moves by about lr with a random sign, in either model. An eps near the typical gradient
    # size keeps the update a smooth function of the gradient (rounding stays at rounding level).
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2, eps=0.1)
    opt_twin = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-2, eps=0.1)
    start = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    fusedpeft.from_peft(pm)
    for _ in range(3):
        x = make_input(kind)
        g = torch.randn_like(run(twin, kind, x))
        for model, o in ((pm, opt), (twin, opt_twin)):
            o.zero_grad()
            (run(model, kind, x) * g).sum().backward()
            o.step()
    assert {id(p) for p in opt.state} == {id(p) for p in pm.parameters() if p.requires_grad}, "optimizer lost track"
    twin_params = dict(twin.named_parameters())
    for n, p in pm.named_parameters():
        assert_close(p, twin_params[n], torch.float32, f"{n} after 3 Adam steps")
        if n in start:
            assert not torch.equal(p, start[n]), f"{n} did not train"


@pytest.mark.parametrize("case", ["llama-lora", "mlp-ia3", "gpt2-lora"])
def test_from_peft_then_save_pretrained_loads_back_into_peft(case, tmp_path):
    kind, method, kw = SWAP_CASES[case]
    base, pm = _peft_model(kind, method, kw)
    fusedpeft.from_peft(pm)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = make_input(kind)
    assert_close(run(back, kind, x), run(pm, kind, x), torch.float32, "peft reload of a swapped model")


@pytest.mark.parametrize("case", ["llama-lora", "mlp-ia3"])
def test_from_peft_disable_adapter_gives_base_output(case):
    kind, method, kw = SWAP_CASES[case]
    base, pm = _peft_model(kind, method, kw)
    fusedpeft.from_peft(pm)
    x = make_input(kind)
    y_base, y_adapted = run(base, kind, x), run(pm, kind, x)
    with pm.disable_adapter():
        assert_close(run(pm, kind, x), y_base, torch.float32, "inside disable_adapter()")
    assert_close(run(pm, kind, x), y_adapted, torch.float32, "after disable_adapter()")
    assert all(p.requires_grad for n, p in pm.named_parameters() if "lora_" in n or "ia3_l" in n)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_from_peft_set_adapter_and_peft_load_adapter(method, tmp_path):
    kind = "llama" if method == "lora" else "mlp"
    kw = dict(SWAP_CASES[f"{kind}-{method}"][2])
    base, pm = _peft_model(kind, method, kw)
    other = dict(kw, target_modules=kw["target_modules"][:2]) if method == "lora" else kw
    pm.add_adapter("b", peft_config(method, **other))
    # a third adapter, saved by peft, loaded by peft after the swap (peft calls update_layer on our layers)
    _, donor = _peft_model(kind, method, kw)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    donor.save_pretrained(tmp_path)
    twin = copy.deepcopy(pm)
    fusedpeft.from_peft(pm)
    for model in (pm, twin):
        model.load_adapter(str(tmp_path), adapter_name="c", is_trainable=True)
    assert all(isinstance(m, (PeftLoraLinear, PeftIA3Linear)) for m in pm.modules()
               if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
    x = make_input(kind)
    for name in ("b", "c", "default"):
        pm.set_adapter(name)
        twin.set_adapter(name)
        assert_close(run(pm, kind, x), run(twin, kind, x), torch.float32, f"active adapter {name}")
        flags = {n: p.requires_grad for n, p in twin.named_parameters()}
        assert {n: p.requires_grad for n, p in pm.named_parameters()} == flags, f"requires_grad after set_adapter({name})"
    assert pm.get_model_status().active_adapters == ["default"]
    for model in (pm, twin):
        model.delete_adapter("b")
        model.merge_adapter(["c"])
    assert pm.get_model_status().available_adapters == ["c", "default"]
    assert_close(run(pm, kind, x), run(twin, kind, x), torch.float32, "after delete_adapter('b') and merging 'c'")


def test_from_peft_keeps_merged_state_and_unmerges_and_unloads():
    kind, method, kw = SWAP_CASES["llama-lora"]
    base, pm = _peft_model(kind, method, kw)
    x = make_input(kind)
    y_adapted = run(pm, kind, x)
    pm.merge_adapter()
    y_merged = run(pm, kind, x)
    fusedpeft.from_peft(pm)
    layers = [m for m in pm.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(m.merged_adapters == ["default"] for m in layers)
    assert_close(run(pm, kind, x), y_merged, torch.float32, "merged, after the swap")
    pm.unmerge_adapter()
    assert not any(m.merged for m in layers)
    assert_close(run(pm, kind, x), y_adapted, torch.float32, "unmerged after the swap")
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, fusedpeft.LoraLinear) for m in plain.modules())
    assert_close(run(plain, kind, x), y_adapted, torch.float32, "merge_and_unload after the swap")


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def test_from_peft_leaves_unsupported_layers_with_a_warning():
    model = peft.get_peft_model(WithEmbedding(), peft.LoraConfig(target_modules=["emb", "proj"], r=2, init_lora_weights=False))
    ids = torch.randint(0, 30, (3, 5))
    y0 = model(ids)
    with pytest.warns(UserWarning, match=r"(?s)left 1 layer.*emb: .*Embedding"):
        fusedpeft.from_peft(model)
    assert type(model.base_model.model.emb) is peft.tuners.lora.layer.Embedding
    assert type(model.base_model.model.proj) is PeftLoraLinear
    assert_close(model(ids), y0, torch.float32, "partly swapped")

    # A LoRA variant fusedpeft does not run (an aLoRA adapter's variant) stays peft's.
    variant = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    variant.base_model.model.fc1.lora_variant["default"] = object()
    with pytest.warns(UserWarning, match=r"(?s)fc1: LoRA variant \['object'\]"):
        fusedpeft.from_peft(variant)
    assert type(variant.base_model.model.fc1) is peft.tuners.lora.layer.Linear


def test_from_peft_leaves_fusedpeft_ssf_layers_alone():
    """peft has no SSF: from_peft swaps the peft layers and leaves fusedpeft's SSF layers as they are."""
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["fc1"], r=2, init_lora_weights=False))
    fusedpeft.inject(pm.base_model.model, fusedpeft.SSFConfig(target_modules=["fc2", "out"], init_ssf_weights=False))
    ssf = {n: m for n, m in pm.named_modules() if isinstance(m, fusedpeft.SSFLinear)}
    x = make_input("mlp")
    y0 = pm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left over as unswappable either
        fusedpeft.from_peft(pm)
    assert type(pm.base_model.model.fc1) is PeftLoraLinear
    assert {n: m for n, m in pm.named_modules() if isinstance(m, fusedpeft.SSFLinear)} == ssf
    assert_close(pm(x), y0, torch.float32, "after from_peft")


def test_from_peft_ia3_layer_refuses_adapter_names_and_keeps_working():
    # Per-row adapters are LoRA's (tests/test_adapter_names.py); an IA3 layer says so.
    _, pm = _peft_model(*SWAP_CASES["mlp-ia3"][:2], SWAP_CASES["mlp-ia3"][2])
    fusedpeft.from_peft(pm)
    pm.eval()
    x = torch.randn(2, 12)
    with pytest.raises(TypeError, match="LoRA's only"):
        pm.base_model.model.fc1(x, adapter_names=["default", "default"])
    assert pm.base_model.model.fc1(x).shape[0] == 2


def test_import_fusedpeft_does_not_import_peft_or_triton():
    code = ("import sys, fusedpeft; bad = [m for m in ('peft', 'transformers', 'triton', 'torch._dynamo') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
