"""The patcher: put fusedpeft adapter layers into any torch model in place, and take them out.

Every function validates first and changes the model only once all checks passed, so a failed call
leaves the model as it was."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Iterable, Optional, Union

from torch import nn

from . import methods
from .config import _AdapterConfig, matches
from .modules import AdapterLayer, ModulesToSaveWrapper, is_conv1d
from .target_defaults import with_default_targets

CONFIG_ATTR = "fusedpeft_config"  # {adapter_name: config} kept on the patched model
_STATE_ATTR = "_fusedpeft_requires_grad"  # {parameter: requires_grad before the first inject}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _output_layer_names(model: nn.Module) -> set[str]:
    """The output head that 'all-linear' leaves out (peft's rule)."""
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            names |= {n for n, m in model.named_modules() if m is head}
    return names


def _candidate_modules(model: nn.Module):
    """(name, module) of the model's own modules: the insides of adapter layers and the copies held
    by modules_to_save wrappers are not targets."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def find_targets(model: nn.Module, config: _AdapterConfig) -> list[str]:
    """Names of the modules ``config`` adapts; raises naming the problem when a target is missing
    or is a kind of module the method does not adapt (linear layers, and what its record's
    other_layers name: LoRA's nn.Embedding)."""
    other_kinds = tuple(methods.for_config(config).other_layers)
    spec = config.target_modules
    if spec is None:
        raise ValueError("target_modules must be given (or be found by fusedpeft.target_defaults for the model's "
                         "architecture): a list of module-name suffixes, a regex, or 'all-linear'")
    modules = list(_candidate_modules(model))
    if spec == "all-linear" or spec == ["all-linear"]:
        heads = _output_layer_names(model)
        targets = [n for n, m in modules if (_is_linear(m) or isinstance(m, AdapterLayer)) and n not in heads]
    else:
        targets = [n for n, _ in modules if matches(spec, n)]
        if isinstance(spec, list):
            missing = [key for key in spec if not any(n == key or n.endswith("." + key) for n in targets)]
            if missing:
                raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
    if config.exclude_modules is not None:
        targets = [n for n in targets if not matches(config.exclude_modules, n)]
    named = set(spec) if isinstance(spec, list) else set()
    targets = [n for n in targets if n in named or config.in_layers(n)]  # a full name given is kept (peft's rule)
    if not targets:
        chosen = getattr(config, "layers_to_transform", None)  # LoRA's field; IA3 and SSF have none
        layers = "" if chosen is None else f" in layers {chosen}"
        raise ValueError(f"target_modules {spec!r} match no module of {type(model).__name__}{layers}")
    modules = dict(modules)
    bad = [f"{n} ({type(modules[n]).__name__})" for n in targets
           if not (_is_linear(modules[n]) or isinstance(modules[n], (AdapterLayer, *other_kinds)))]
    if bad:
        others = "".join(f" and nn.{k.__name__}" for k in other_kinds)
        raise TypeError(f"{config.peft_type} adapts linear layers (nn.Linear, transformers Conv1D){others} only; "
                        f"these targets are not: {bad}")
    return targets


def inject(
    model: nn.Module,
    config: _AdapterConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Patch ``model`` in place with the adapter ``config`` describes and return it.

    Targeted nn.Linear / Conv1D modules become the method's layer (LoraLinear, IA3Linear, SSFLinear:
    see fusedpeft.methods) wrapping the same module (no weight copy); a target that already holds
    adapters of the same method gets one more.
    An adapter added beside existing ones arrives inactive, as in peft: ``set_adapter`` turns it on.
    Only the adapter (plus modules_to_save, plus biases as ``config.bias`` says) is left trainable.
    With autocast_adapter_dtype, adapter weights of a bf16/fp16 base are kept in float32 (peft's
    default)."""
    method = methods.for_config(config)  # a TypeError naming any other type
    dataclasses.replace(config)  # re-runs the config's checks: fields may have been set after construction
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    configs = getattr(model, CONFIG_ATTR, {})
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    config = with_default_targets(config, model)  # the stored config names its targets, as peft's does
    targets = find_targets(model, config)
    if not config.fan_in_fan_out and any(is_conv1d(model.get_submodule(n)) for n in targets):
        # peft's rule: a Conv1D (GPT-2) target stores its weight as (in, out); the adapter's config
        # records it, so its file says so too.
        warnings.warn("the targets include transformers Conv1D layers (weight stored as (in, out)): setting "
                      "fan_in_fan_out=True")
        config = dataclasses.replace(config, fan_in_fan_out=True)
    init = getattr(config, "init_lora_weights", True)
    if configs and isinstance(init, str) and init.startswith(("pissa", "olora")):
        warnings.warn(f"init_lora_weights={init!r} rewrites the base weights that the model's other adapters "
                      f"{sorted(configs)} were made for")
    layer_classes = method.layer_classes()
    for name in targets:
        module = model.get_submodule(name)
        if method.check_target is not None:
            method.check_target(config, name, module)
        if isinstance(module, AdapterLayer) and not isinstance(module, layer_classes):
            raise TypeError(
                f"{name} already holds {type(module).__name__} adapters; one layer takes one method "
                f"({config.peft_type} asked)"
            )
    save_names = _modules_to_save_names(model, config)
    previous_active = _active_names(model) if configs else None

    # All checks passed: change the model.
    if not hasattr(model, _STATE_ATTR):
        object.__setattr__(model, _STATE_ATTR, {p: p.requires_grad for p in model.parameters()})
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            method.add_adapter(module, config, name, adapter_name, autocast_adapter_dtype)
        else:
            parent, child = _parent(model, name)
            setattr(parent, child, method.new_layer(config, name, module, adapter_name, autocast_adapter_dtype))
    for name in save_names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            parent, child = _parent(model, name)
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
    object.__setattr__(model, CONFIG_ATTR, {**configs, adapter_name: config})
    if previous_active is not None:
        # As in peft, an adapter added beside others arrives inactive everywhere (also in layers
        # that hold only it): the model keeps running, and training, what was active before.
        set_adapter(model, previous_active)
    mark_only_adapters_trainable(model, bias=getattr(config, "bias", "none"))
    from .io import hf_checkpoint  # here: fusedpeft.io imports this module

    hf_checkpoint.install(model)  # a transformers model's save_pretrained writes the base under its own names
    return model


def _modules_to_save_names(model: nn.Module, config: _AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in _candidate_modules(model) if matches(list(config.modules_to_save), n)]
    missing = [k for k in config.modules_to_save if not any(n == k or n.endswith("." + k) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    return names


def _active_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in list(adapter_layers(model)) + list(_wrappers(model)):
        names += [n for n in m.active_adapters if n not in names]
    return names


def adapter_layers(model: nn.Module) -> Iterable[tuple[str, AdapterLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer))


def _wrappers(model: nn.Module):
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))


def _require_adapters(model: nn.Module):
    if not any(True for _ in adapter_layers(model)):
        raise ValueError(f"{type(model).__name__} has no fusedpeft adapter layers (call fusedpeft.inject first)")


def merge(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> nn.Module:
    """Fold the (active, or named) adapters into every adapted layer's base weight."""
    _require_adapters(model)
    plan = [(layer, layer.active_adapters if adapter_names is None else [n for n in adapter_names if n in layer.adapter_names])
            for _, layer in adapter_layers(model)]
    for layer, names in plan:  # every layer's refusal before any layer changes
        for name in names:
            if name not in layer.merged_adapters:
                layer.check_merge(name)
    for layer, names in plan:
        layer.merge(safe_merge=safe_merge, adapter_names=names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    _require_adapters(model)
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def set_adapter(model: nn.Module, adapter_names: Union[str, list[str]]) -> nn.Module:
    """Make the named adapter(s) active (and trainable) in every layer that has them."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = set(getattr(model, CONFIG_ATTR, {}))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"adapter(s) {unknown} not found; the model has {sorted(known)}")
    for _, layer in adapter_layers(model):
        present = [n for n in names if n in layer.adapter_names]
        if present:
            layer.set_adapter(present)
        else:
            layer.set_adapter([])  # this layer has none of them: it runs as the base, all frozen
    for _, wrapper in _wrappers(model):
        wrapper.set_adapter(names)
    return model


def enable_adapters(model: nn.Module, enabled: bool = True) -> nn.Module:
    for _, m in list(adapter_layers(model)) + list(_wrappers(model)):
        m.enable_adapters(enabled)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes its base outputs bit for bit."""
    enable_adapters(model, False)
    try:
        yield model
    finally:
        enable_adapters(model, True)


def eject(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take every fusedpeft layer out again. With merge=False the original modules come back as the
    same objects with their weights bit for bit (any merged adapter is unmerged first, which is
    exact up to one rounding, and a bias a merged SSF shift added is removed) and their
    requires_grad flags as before inject; with merge=True the active adapters are folded in first
    and modules_to_save keep their trained copies."""
    from .io import hf_checkpoint

    hf_checkpoint.uninstall(model)
    flags = dict(getattr(model, _STATE_ATTR, {}))
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        base = layer.base_layer
        for p in base.parameters():  # a bias that merging gave the layer (SSF's shift) trains as its weight did
            flags.setdefault(p, flags.get(base.weight, p.requires_grad))
        parent, child = _parent(model, name)
        setattr(parent, child, base)
    for name, wrapper in list(_wrappers(model)):
        parent, child = _parent(model, name)
        keep = wrapper.modules_to_save[wrapper.active_adapters[0]] if merge and wrapper.active_adapters else wrapper.original_module
        setattr(parent, child, keep)
    for p in model.parameters():
        if p in flags:
            p.requires_grad_(flags[p])
    for attr in (CONFIG_ATTR, _STATE_ATTR):
        if attr in model.__dict__:
            object.__delattr__(model, attr)
    return model


def mark_only_adapters_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but the active adapters' parameters and modules_to_save copies.
    bias: "none", "all" (every bias in the model trains) or "lora_only" (biases of adapted layers)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        if layer.active_adapters:
            layer.set_adapter(layer.active_adapters)
        if bias == "lora_only" and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in _wrappers(model):
        wrapper.set_adapter(wrapper.active_adapters)
    if bias == "all":
        for name, p in model.named_parameters():
            # The originals kept beside modules_to_save copies stay frozen (as in peft).
            if (name == "bias" or name.endswith(".bias")) and ".original_module." not in name and not name.startswith("original_module."):
                p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints peft's line: trainable params: N || all params: N || trainable%: P."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
