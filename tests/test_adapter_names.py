"""Per-row adapters (peft's adapter_names) on fusedpeft's layers, and no argument silently dropped:
on injected layers against a per-row reference, after from_peft against peft's own mixed-batch
forward, and errors that leave the model working."""
import warnings

import pytest
import torch
from torch import nn

import fusedpeft

from helpers import assert_close


def _two_adapter_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 8))
    fusedpeft.inject(model, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    fusedpeft.inject(model, fusedpeft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False),
                     adapter_name="other")
    return model.eval()


def _alone(model, x_row, name):
    if name == "__base__":
        with fusedpeft.disable_adapters(model):
            return model(x_row)
    active = [m.active_adapters for m in model.modules() if isinstance(m, fusedpeft.LoraLinear)]
    fusedpeft.set_adapter(model, name)
    try:
        return model(x_row)
    finally:
        for m, names in zip([m for m in model.modules() if isinstance(m, fusedpeft.LoraLinear)], active):
            m.set_adapter(names)


@pytest.mark.parametrize("lead", [(5,), (5, 3)])
def test_adapter_names_run_each_row_through_its_adapter(lead):
    model = _two_adapter_model()
    x = torch.randn(*lead, 12)
    names = ["default", "other", "__base__", "other", "default"]
    y = model[2](model[1](model[0](x, adapter_names=names)), adapter_names=names)
    for i, name in enumerate(names):
        # "other" lives in layer 0 only: layer 2 gives those rows its base output, as peft does.
        h = model[1](model[0](x[i:i + 1], adapter_names=[name]))
        expect = model[2](h, adapter_names=[name])
        assert_close(y[i:i + 1], expect, torch.float32, f"row {i} ({name})")
    ref0 = _alone(model, x[:1], "default")
    assert_close(y[:1], ref0, torch.float32, "row 0 against the adapter run alone")


def test_adapter_names_gradients_flow_to_each_rows_adapter():
    model = _two_adapter_model().train()
    layer = model[0]
    for name in ("default", "other"):
        for t in (layer.lora_A[name].weight, layer.lora_B[name].weight):
            t.requires_grad_(True)
    x = torch.randn(4, 12)
    layer(x, adapter_names=["other", "__base__", "other", "__base__"]).square().sum().backward()
    assert layer.lora_A["other"].weight.grad.abs().sum() > 0
    assert layer.lora_A["default"].weight.grad is None, "an adapter no row named got a gradient"


def test_layers_refuse_arguments_they_would_ignore():
    model = _two_adapter_model()
    x = torch.randn(3, 12)
    with pytest.raises(TypeError, match="keyword argument.*'scale'"):
        model[0](x, scale=2.0)
    with pytest.raises(TypeError, match="positional"):
        model[0](x, x)
    with pytest.raises(ValueError, match="one name per row"):
        model[0](x, adapter_names=["default"])
    assert model[0](x).shape == (3, 20), "a refused call broke the layer"


def test_adapter_names_refused_while_merged_and_on_rescaling_layers():
    model = _two_adapter_model()
    x = torch.randn(2, 12)
    fusedpeft.merge(model)
    with pytest.raises(ValueError, match="merged"):
        model[0](x, adapter_names=["default", "default"])
    ia3 = nn.Sequential(nn.Linear(12, 6))
    fusedpeft.inject(ia3, fusedpeft.IA3Config(target_modules=["0"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="LoRA's only"):
        ia3[0](x, adapter_names=["default", "default"])


def test_from_peft_adapter_names_match_peft_and_leave_the_model_working():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                 peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    ids = torch.randint(0, 50, (3, 5))
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        expect = pm(input_ids=ids, adapter_names=names).logits
        plain = pm(input_ids=ids).logits
        fusedpeft.from_peft(pm)
        assert_close(pm(input_ids=ids, adapter_names=names).logits, expect, torch.float32, "mixed batch")
        with pytest.raises(ValueError, match="non-existing adapter"):
            pm(input_ids=ids, adapter_names=["nope", "default", "default"])
        assert_close(pm(input_ids=ids).logits, plain, torch.float32, "a plain call after the refused one")


@pytest.mark.parametrize("lead", [(5,), (5, 3)])
def test_adapter_names_without_grad_run_the_serving_op_and_match_the_torch_path(lead):
    """In inference (no gradient, no dropout in play) a mixed batch is one multi_lora_linear call
    over the layer's adapters stacked into a bank; the same as the per-adapter torch path."""
    model = _two_adapter_model()
    x = torch.randn(*lead, 12)
    names = ["default", "other", "__base__", "other", "default"]
    fusedpeft.backends.reset_counts()
    with torch.no_grad():
        fast = model[0](x, adapter_names=names)
    assert fusedpeft.backend_counts().get(("multi_lora_linear", "torch"), 0) == 1
    layer = model[0]
    slow = layer.base_layer(x)
    for i, name in enumerate(names):
        if name != "__base__":
            slow[i] = slow[i] + layer.scaling[name] * (x[i] @ layer.lora_A[name].weight.T) @ layer.lora_B[name].weight.T
    assert_close(fast, slow, torch.float32, "bank path")
    with torch.no_grad():
        layer.lora_B["other"].weight.add_(1.0)  # the bank follows the adapter's weights
        again = model[0](x, adapter_names=names)
    assert not torch.allclose(again[1], fast[1]) and torch.allclose(again[0], fast[0])
