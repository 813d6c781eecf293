"""transformers' save_pretrained / from_pretrained of a fusedpeft-patched model
(fusedpeft/io/hf_checkpoint.py): the base under its own names, bit for bit; the adapters in peft's
format beside it; the Trainer's ways of saving and resuming; multi-adapter, merged, Conv1D; and
everything back to plain transformers after uninstall / eject.

``patch`` calls ``hf_checkpoint.install`` right after ``fusedpeft.inject``, as the injector is to do
itself; ``test_without_install_the_base_weights_are_lost`` shows what the rest would meet without it."""
import copy
import json
import os
import sys

import pytest
import torch
from torch import nn

import fusedpeft
from fusedpeft.io import hf_checkpoint

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file
from transformers.trainer_utils import load_sharded_checkpoint  # imported here: the no_peft fixture hides peft

transformers.utils.logging.disable_progress_bar()

PATCHED_MARKS = (".base_layer.", ".original_module.")
ADAPTER_MARKS = (".lora_A.", ".lora_B.", ".ia3_l.", ".ssf_scale.", ".ssf_shift.", ".modules_to_save.")


def tiny_llama(bias=False):
    config = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_bias=bias, mlp_bias=bias,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=60, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


CONFIGS = {
    "lora": lambda: fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         init_lora_weights=False, modules_to_save=["lm_head"]),
    "ia3": lambda: fusedpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"], init_ia3_weights=False),
    "ssf": lambda: fusedpeft.SSFConfig(target_modules=["q_proj", "o_proj", "up_proj"], init_ssf_weights=False),
}


def patch(model, config, adapter_name="default"):
    fusedpeft.inject(model, config, adapter_name)
    hf_checkpoint.install(model)  # what fusedpeft.inject is to call itself
    return model


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ids(seed=0):
    return torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def assert_same_base(model, reference):
    state = model.state_dict()
    assert set(state) == set(reference)
    for k, v in reference.items():
        assert torch.equal(state[k], v), k


def adapter_dir(directory, method, name="default"):
    """Where save_pretrained puts an adapter: peft's layout, SSF (which peft cannot read) in a subfolder."""
    return str(directory) if name == "default" and method != "ssf" else os.path.join(directory, name)


@pytest.fixture
def no_peft(monkeypatch):
    """transformers and fusedpeft as they run where peft is not installed."""
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "is_peft_available", lambda: False)
    monkeypatch.setitem(sys.modules, "peft", None)


def saved_keys(directory):
    return set(load_file(os.path.join(directory, "model.safetensors")))


# ----------------------------------------------------------------------------- the round trip
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_pretrained_then_from_pretrained_and_load_adapter(method, no_peft, tmp_path):
    model = tiny_llama()
    reference = base_state(model)
    patch(model, CONFIGS[method]())
    before = logits(model)
    live_keys = list(model.state_dict())
    model.save_pretrained(tmp_path)

    keys = saved_keys(tmp_path)
    assert not [k for k in keys if any(m in k for m in PATCHED_MARKS)]
    assert set(reference) <= keys  # every base weight, under its own name
    assert all(any(m in k for m in ADAPTER_MARKS) for k in keys - set(reference))
    assert os.path.isfile(os.path.join(adapter_dir(tmp_path, method), "adapter_config.json"))
    assert os.path.isfile(os.path.join(adapter_dir(tmp_path, method), "adapter_model.safetensors"))
    assert list(model.state_dict()) == live_keys  # the live model keeps fusedpeft's names

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert all(any(m in k for m in ADAPTER_MARKS) for k in info["unexpected_keys"])
    assert_same_base(loaded, reference)  # bit for bit: nothing re-initialised

    fusedpeft.load_adapter(loaded, adapter_dir(tmp_path, method))
    assert torch.equal(logits(loaded.eval()), before)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_trainer_style_state_dict_argument(method, no_peft, tmp_path):
    model = tiny_llama()
    reference = base_state(model)
    patch(model, CONFIGS[method]())
    before = logits(model)
    model.save_pretrained(tmp_path / "a", state_dict=model.state_dict())  # as the Trainer calls it
    model.save_pretrained(tmp_path / "b")
    assert saved_keys(tmp_path / "a") == saved_keys(tmp_path / "b")

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a", output_loading_info=True)
    assert not info["missing_keys"]
    assert_same_base(loaded, reference)
    fusedpeft.load_adapter(loaded, str(tmp_path / "a"))
    assert torch.equal(logits(loaded.eval()), before)


def test_without_install_the_base_weights_are_lost(no_peft, tmp_path):
    """The defect install() fixes: a plain save writes base_layer names, which from_pretrained
    does not find (and re-initialises)."""
    model = tiny_llama()
    fusedpeft.inject(model, CONFIGS["lora"]())
    hf_checkpoint.uninstall(model)  # in case the injector installed it already
    model.save_pretrained(tmp_path)
    assert any(".base_layer." in k for k in saved_keys(tmp_path))
    _, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]


def test_gpt2_conv1d(no_peft, tmp_path):
    model = tiny_gpt2()
    reference = base_state(model)
    with pytest.warns(UserWarning, match="Conv1D"):
        patch(model, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                          init_lora_weights=False))
    before = logits(model)
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert "transformer.h.0.attn.c_attn.weight" in keys and not [k for k in keys if ".base_layer." in k]

    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    state = loaded.state_dict()
    for k, v in reference.items():
        assert torch.equal(state[k], v), k
    fusedpeft.load_adapter(loaded, str(tmp_path))
    assert torch.equal(logits(loaded.eval()), before)


# ----------------------------------------------------------------------------- with peft installed
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_from_pretrained_alone_with_peft_installed(method, tmp_path):
    """With peft installed, transformers loads the adapter in the directory itself, with peft's layers."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    patch(model, CONFIGS[method]())
    before = logits(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].self_attn.v_proj, peft.tuners.tuners_utils.BaseTunerLayer)
    torch.testing.assert_close(logits(loaded), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("peft_installed", [True, False])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_loader_restores_fusedpeft_layers(method, peft_installed, request, tmp_path):
    if peft_installed:
        pytest.importorskip("peft")
    else:
        request.getfixturevalue("no_peft")
    model = tiny_llama()
    reference = base_state(model)
    patch(model, CONFIGS[method]())
    before = logits(model)
    model.save_pretrained(tmp_path)

    loaded, info = hf_checkpoint.from_pretrained(transformers.LlamaForCausalLM, tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(loaded.model.layers[0].self_attn.v_proj if method != "ssf" else loaded.model.layers[0].self_attn.o_proj,
                      fusedpeft.modules.AdapterLayer)
    assert not getattr(loaded, "_hf_peft_config_loaded", False)
    assert torch.equal(logits(loaded.eval()), before)
    assert hf_checkpoint.installed(loaded)
    assert not any(p.requires_grad for n, p in loaded.named_parameters())  # is_trainable=False
    with fusedpeft.disable_adapters(loaded):
        plain = tiny_llama()
        plain.load_state_dict(reference)
        assert torch.equal(logits(loaded), logits(plain))


# ----------------------------------------------------------------------------- several adapters
def test_several_adapters_peft_layout_and_active_set(no_peft, tmp_path):
    model = tiny_llama()
    patch(model, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    patch(model, fusedpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
          "second")
    patch(model, fusedpeft.SSFConfig(target_modules=["o_proj"], init_ssf_weights=False), "shift")
    fusedpeft.set_adapter(model, ["second", "shift"])
    before = logits(model)
    model.save_pretrained(tmp_path)

    assert json.loads((tmp_path / hf_checkpoint.RECORD_NAME).read_text()) == {
        "adapters": {"default": ".", "second": "second", "shift": "shift"}, "active": ["second", "shift"]}
    for sub in ("", "second", "shift"):
        assert (tmp_path / sub / "adapter_config.json").is_file() and (tmp_path / sub / "adapter_model.safetensors").is_file()

    loaded = hf_checkpoint.from_pretrained(transformers.LlamaForCausalLM, tmp_path)
    assert sorted(loaded.fusedpeft_config) == ["default", "second", "shift"]
    assert torch.equal(logits(loaded.eval()), before)

    # by hand: from_pretrained, then each adapter, then the active set
    by_hand = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    fusedpeft.load_adapter(by_hand, str(tmp_path))
    fusedpeft.load_adapter(by_hand, str(tmp_path / "second"), adapter_name="second")
    fusedpeft.load_adapter(by_hand, str(tmp_path / "shift"), adapter_name="shift")
    fusedpeft.set_adapter(by_hand, ["second", "shift"])
    assert torch.equal(logits(by_hand.eval()), before)


def test_no_default_adapter_removes_a_stale_top_level_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    stale = tiny_llama()
    patch(stale, CONFIGS["lora"]())
    stale.save_pretrained(tmp_path)  # leaves adapter_config.json in tmp_path
    model = tiny_llama()
    reference = base_state(model)
    patch(model, CONFIGS["ia3"](), "other")
    before = logits(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)  # peft installed: nothing stale applied
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in loaded.modules())
    assert_same_base(loaded, reference)
    assert torch.equal(logits(hf_checkpoint.from_pretrained(transformers.LlamaForCausalLM, tmp_path).eval()), before)


# ----------------------------------------------------------------------------- merged
def test_merged_model_saves_the_unmerged_base(no_peft, tmp_path):
    model = tiny_llama()  # no biases: the merged SSF shift gives o_proj one
    reference = base_state(model)
    patch(model, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    patch(model, fusedpeft.SSFConfig(target_modules=["o_proj"], init_ssf_weights=False), "shift")
    fusedpeft.set_adapter(model, ["default", "shift"])
    before = logits(model)
    fusedpeft.merge(model)
    merged_state = base_state(model)
    assert model.model.layers[0].self_attn.o_proj.base_layer.bias is not None
    model.save_pretrained(tmp_path)

    assert all(torch.equal(v, merged_state[k]) for k, v in model.state_dict().items())  # the live model untouched
    assert model.model.layers[0].self_attn.q_proj.merged
    keys = saved_keys(tmp_path)
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    state = loaded.state_dict()
    for k, v in reference.items():  # the unmerged base: the original up to one rounding
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)

    restored = hf_checkpoint.from_pretrained(transformers.LlamaForCausalLM, tmp_path).eval()
    assert not restored.model.layers[0].self_attn.q_proj.merged
    torch.testing.assert_close(logits(restored), before, rtol=1e-4, atol=1e-5)


def test_merged_biases_in_an_adapter_file_are_written_unmerged(no_peft, tmp_path):
    """LoRA with bias="all" saves every bias in its adapter file; an IA3 adapter merged into v_proj
    has scaled v_proj's bias: the file must hold the unmerged one, as the base file does."""
    model = tiny_llama(bias=True)
    patch(model, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, bias="all"))
    patch(model, fusedpeft.IA3Config(target_modules=["v_proj"], feedforward_modules=[], init_ia3_weights=False), "ia")
    fusedpeft.set_adapter(model, ["default", "ia"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn_like(p))  # "trained" biases
    before = logits(model)
    unmerged_bias = model.model.layers[0].self_attn.v_proj.base_layer.bias.detach().clone()
    fusedpeft.merge(model, adapter_names=["ia"])
    model.save_pretrained(tmp_path)

    key = "base_model.model.model.layers.0.self_attn.v_proj.base_layer.bias"
    torch.testing.assert_close(load_file(str(tmp_path / "adapter_model.safetensors"))[key], unmerged_bias)
    torch.testing.assert_close(load_file(str(tmp_path / "model.safetensors"))["model.layers.0.self_attn.v_proj.bias"],
                               unmerged_bias)
    restored = hf_checkpoint.from_pretrained(transformers.LlamaForCausalLM, tmp_path).eval()
    torch.testing.assert_close(logits(restored), before, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- resuming (load_state_dict)
def test_load_state_dict_of_a_saved_checkpoint_restores_base_and_adapters(no_peft, tmp_path):
    """The Trainer's resume_from_checkpoint: model.load_state_dict(model.safetensors, strict=False)
    into the live patched model."""
    model = tiny_llama(bias=True)
    patch(model, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      bias="all", modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.base_layer.bias.add_(1.0)  # a trained bias
        model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    before = logits(model)
    model.save_pretrained(tmp_path)

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    assert not torch.equal(logits(other), before)
    result = other.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(other), before)
    other.load_state_dict(model.state_dict(), strict=True)  # fusedpeft's own names load as before


def test_sharded_save_reloads_both_ways(no_peft, tmp_path):
    model = tiny_llama()
    reference = base_state(model)
    patch(model, CONFIGS["lora"]())
    before = logits(model)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not [k for k in index["weight_map"] if any(m in k for m in PATCHED_MARKS)]

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert_same_base(loaded, reference)
    fusedpeft.load_adapter(loaded, str(tmp_path))
    assert torch.equal(logits(loaded.eval()), before)

    other = copy.deepcopy(model)  # the Trainer's resume of a sharded checkpoint
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    load_sharded_checkpoint(other, str(tmp_path), strict=False)
    assert torch.equal(logits(other), before)


def test_trainer_resume_from_checkpoint(tmp_path):
    pytest.importorskip("accelerate")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = ids(i)[0]
            return {"input_ids": x, "labels": x}

    def trainer(model, max_steps):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, save_safetensors=True, logging_steps=100,
        ) if "save_safetensors" in transformers.TrainingArguments.__dataclass_fields__ else transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100,
        )
        return transformers.Trainer(model=model, args=args, train_dataset=Data())

    torch.manual_seed(1)
    base = tiny_llama()
    first = copy.deepcopy(base)
    patch(first, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer(first, 2).train()
    trained = logits(first.eval())
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file()
    assert not [k for k in saved_keys(checkpoint) if ".base_layer." in k]

    second = copy.deepcopy(base)
    patch(second, fusedpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert not torch.equal(logits(second.eval()), trained)
    trainer(second, 2).train(resume_from_checkpoint=str(checkpoint))  # nothing left to train: only the load
    assert torch.equal(logits(second.eval()), trained)


def test_loading_base_names_into_a_merged_layer_raises(no_peft):
    model = tiny_llama()
    plain = base_state(model)
    patch(model, CONFIGS["lora"]())
    fusedpeft.merge(model)
    with pytest.raises(ValueError, match="merged"):
        model.load_state_dict(plain, strict=False)
    fusedpeft.unmerge(model)
    result = model.load_state_dict(plain, strict=False)  # a plain model's state dict loads into the base
    assert not result.unexpected_keys
    assert all(any(m in k for m in ADAPTER_MARKS) for k in result.missing_keys)


# ----------------------------------------------------------------------------- install / uninstall
def test_install_changes_only_transformers_models_and_not_state_dict():
    seq = nn.Sequential(nn.Linear(4, 4))
    fusedpeft.inject(seq, fusedpeft.LoraConfig(r=2, target_modules=["0"]))
    assert hf_checkpoint.install(seq) is False and not hf_checkpoint.installed(seq)

    model = tiny_llama()
    fusedpeft.inject(model, CONFIGS["lora"]())
    keys = list(model.state_dict())
    assert hf_checkpoint.install(model) is True
    hooks = len(model._load_state_dict_pre_hooks)
    assert hf_checkpoint.install(model) is True and len(model._load_state_dict_pre_hooks) == hooks  # idempotent
    assert list(model.state_dict()) == keys
    assert hf_checkpoint.installed(model)
    hf_checkpoint.uninstall(model)
    assert not hf_checkpoint.installed(model) and "save_pretrained" not in model.__dict__
    assert len(model._load_state_dict_pre_hooks) == hooks - 1
    hf_checkpoint.uninstall(model)  # twice: nothing to do


def test_deepcopy_saves_the_copy(no_peft, tmp_path):
    model = tiny_llama()
    patch(model, CONFIGS["lora"]())
    twin = copy.deepcopy(model)
    assert hf_checkpoint.installed(twin) and twin.save_pretrained.model is twin
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    expected = logits(twin)
    twin.save_pretrained(tmp_path)
    restored = hf_checkpoint.from_pretrained(transformers.LlamaForCausalLM, tmp_path).eval()
    assert torch.equal(logits(restored), expected)


def test_after_uninstall_and_eject_save_pretrained_is_transformers(no_peft, tmp_path):
    model = tiny_llama()
    reference = base_state(model)
    base_out = logits(model)
    patch(model, CONFIGS["lora"]())
    hf_checkpoint.uninstall(model)  # what eject is to call first
    model.save_pretrained(tmp_path / "uninstalled")  # plain transformers: the patched names
    assert any(".base_layer." in k for k in saved_keys(tmp_path / "uninstalled"))
    assert not (tmp_path / "uninstalled" / "adapter_config.json").exists()

    fusedpeft.eject(model)
    model.save_pretrained(tmp_path / "ejected")
    assert saved_keys(tmp_path / "ejected") == set(reference)
    assert sorted(os.listdir(tmp_path / "ejected")) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ejected", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_base(loaded, reference)
    assert torch.equal(logits(loaded.eval()), base_out)


def test_push_to_hub_is_refused_before_anything_is_written(tmp_path):
    model = tiny_llama()
    patch(model, CONFIGS["lora"]())
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "d", push_to_hub=True)
    assert not (tmp_path / "d").exists()
