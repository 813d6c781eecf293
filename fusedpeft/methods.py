"""The methods fusedpeft runs, one record each. The injector, the adapter files and peft's
interop read what is particular to a method from its record; none of them tests a config's type.

Adding a method is one ``Method`` record in ``METHODS`` plus its own files: the config class
(``config.py``), the layer (``modules/``) and the op (``ops/``). A method that peft also has and
whose peft layers ``from_peft`` should swap adds a layer of peft's protocol to ``peft_compat.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from torch import nn

from .config import IA3Config, LoraConfig, SSFConfig, _AdapterConfig
from .modules import AdapterLayer, IA3Linear, LoraEmbedding, LoraLinear, SSFLinear
from .modules.dora import DoraVariant
from .ops import ia3_linear, lora_linear, ssf_linear


@dataclasses.dataclass(frozen=True)
class Method:
    """What is particular to one method.

    name: as users write it ("LoRA"). peft_type: the config's ``peft_type``, and the
    ``"peft_type"`` of its adapter_config.json. config_class / layer_class / op: its config, its
    nn.Module around a linear layer (an AdapterLayer) and the functional op the layer runs.
    other_layers: {base module type: its AdapterLayer} for the other kinds of module the method
    adapts (LoRA: nn.Embedding).
    file_keys: the tensors a layer of this method writes per adapter in an adapter file, after
    ``base_model.model.<module path>.`` (the adapter name taken out, as peft writes them).
    layer_args(config, module_name): keyword arguments of ``layer_class`` that hold for the whole
    layer, beyond the base layer, the adapter name, fan_in_fan_out and autocast_adapter_dtype.
    adapter_args(config, module_name): keyword arguments of one adapter, taken by both
    ``layer_class`` and its ``update_layer``.
    init_key: the config field that only picks the adapter's starting values (a file's tensors
    overwrite them, so two configs that differ only there describe the same adapter).
    file_inits: the ``init_key`` values an adapter file may hold, each mapped to the value it loads
    as; any other value is refused (it rewrote the base weights too). None: the config checks it.
    variant_keys: peft config keys that turn an adapter into a variant fusedpeft does not run
    (DoRA, ...); any of them truthy, a file is refused and ``from_peft``'s layers refuse the adapter.
    unsupported_keys: other peft config keys, model-wide, that change the computation and that
    fusedpeft does not implement; any of them truthy, a file is refused.
    check_target(config, module_name, module): raises (a ValueError naming the module) where the
    method cannot adapt this target under this config; the injector asks it of every target
    before it changes anything.
    """

    name: str
    peft_type: str
    config_class: type
    layer_class: type
    op: Callable[..., Any]
    file_keys: tuple[str, ...]
    layer_args: Callable[[Any, str], dict]
    adapter_args: Callable[[Any, str], dict]
    init_key: str
    file_inits: Optional[dict] = None
    variant_keys: tuple[str, ...] = ()
    unsupported_keys: tuple[str, ...] = ()
    check_target: Optional[Callable[[Any, str, nn.Module], None]] = None
    other_layers: dict = dataclasses.field(default_factory=dict)

    def layer_classes(self) -> tuple[type, ...]:
        return (self.layer_class, *self.other_layers.values())

    def layer_for(self, module: nn.Module) -> type:
        """The AdapterLayer class that wraps ``module``."""
        for kind, cls in self.other_layers.items():
            if isinstance(module, kind):
                return cls
        return self.layer_class

    def new_layer(self, config: _AdapterConfig, module_name: str, base: nn.Module, adapter_name: str,
                  autocast_adapter_dtype: bool) -> AdapterLayer:
        """The adapter layer wrapping ``base`` (the module named ``module_name``), holding one adapter."""
        return self.layer_for(base)(
            base, adapter_name, fan_in_fan_out=config.fan_in_fan_out, autocast_adapter_dtype=autocast_adapter_dtype,
            **self.layer_args(config, module_name), **self.adapter_args(config, module_name),
        )

    def add_adapter(self, layer: AdapterLayer, config: _AdapterConfig, module_name: str, adapter_name: str,
                    autocast_adapter_dtype: bool) -> None:
        """One more adapter on a layer of this method."""
        layer.update_layer(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                           **self.adapter_args(config, module_name))


def _lora_adapter_args(config: LoraConfig, module_name: str) -> dict:
    r, alpha = config.rank_and_alpha(module_name)
    return dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                use_rslora=config.use_rslora, lora_bias=config.lora_bias, variant=lora_variant(config))


def lora_variant(config: LoraConfig):
    """The LoraVariant an adapter of this config runs (None: plain LoRA)."""
    return DoraVariant if config.use_dora else None


def _no_args(config, module_name: str) -> dict:
    return {}


def _check_lora_target(config: LoraConfig, module_name: str, module: nn.Module) -> None:
    init = config.init_lora_weights
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    if isinstance(base, nn.Embedding):
        if config.lora_bias:
            raise ValueError(f"lora_bias=True is not supported on the nn.Embedding {module_name} (as in peft)")
        if config.use_dora:
            raise ValueError(f"use_dora=True is not implemented on the nn.Embedding {module_name}")
        if init not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} is not supported on the nn.Embedding {module_name}")
        return
    if isinstance(init, str) and init != "gaussian":  # pissa, pissa_niter_<n>, olora: from the base weight
        r, _ = config.rank_and_alpha(module_name)
        shape = module.base_layer.weight.shape if isinstance(module, AdapterLayer) else module.weight.shape
        if r > min(shape):
            raise ValueError(f"init_lora_weights={init!r} needs r <= min(in, out) = {min(shape)} at {module_name}, "
                             f"got r={r}")


LORA = Method(
    name="LoRA", peft_type="LORA", config_class=LoraConfig, layer_class=LoraLinear, op=lora_linear,
    file_keys=("lora_A.weight", "lora_B.weight"),
    layer_args=_no_args, adapter_args=_lora_adapter_args,
    init_key="init_lora_weights",
    check_target=_check_lora_target,
    other_layers={nn.Embedding: LoraEmbedding},
    # Starting values only: eva and orthogonal inits load as the default init. pissa ("pissa_niter_<n>"
    # reads as "pissa") and olora rewrote the base weights too: the file loads onto the residual
    # base saved after injection, which only the user has (load_adapter warns). corda, loftq,
    # lora_ga, mica, ... need more than the file and a residual base: refused.
    file_inits={True: True, False: False, "gaussian": "gaussian", "eva": True, "orthogonal": True, "pissa": True,
                "olora": True},
    variant_keys=("arrow_config", "use_bdlora", "alora_invocation_tokens", "velora_config",
                  "monteclora_config", "kasa_config"),
    unsupported_keys=("layer_replication", "target_parameters", "trainable_token_indices"),
)
IA3 = Method(
    name="IA3", peft_type="IA3", config_class=IA3Config, layer_class=IA3Linear, op=ia3_linear,
    file_keys=("ia3_l",),
    layer_args=lambda config, module_name: dict(is_feedforward=config.is_feedforward(module_name)),
    adapter_args=lambda config, module_name: dict(init_ia3_weights=config.init_ia3_weights),
    init_key="init_ia3_weights",
)
SSF = Method(
    name="SSF", peft_type="SSF", config_class=SSFConfig, layer_class=SSFLinear, op=ssf_linear,
    file_keys=("ssf_scale", "ssf_shift"),
    layer_args=_no_args,
    adapter_args=lambda config, module_name: dict(init_ssf_weights=config.init_ssf_weights),
    init_key="init_ssf_weights",
)

METHODS: tuple[Method, ...] = (LORA, IA3, SSF)

_BY_PEFT_TYPE = {m.peft_type: m for m in METHODS}
_BY_CONFIG = {m.config_class: m for m in METHODS}
# Refused in any adapter file, whatever method it names: a key that changes the computation is
# never dropped quietly.
UNSUPPORTED_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for m in METHODS for k in m.variant_keys + m.unsupported_keys))
INIT_KEYS: frozenset = frozenset(m.init_key for m in METHODS)


def _config_names() -> str:
    names = [m.config_class.__name__ for m in METHODS]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def for_config(config: Any) -> Method:
    """The method of a config (a subclass of a method's config class counts as that method);
    a TypeError naming the type for anything else."""
    if isinstance(config, type) or not any(cls in _BY_CONFIG for cls in type(config).__mro__):
        raise TypeError(f"config must be a fusedpeft {_config_names()}, got {type(config).__name__}")
    return for_config_class(type(config))


def for_config_class(config_class: type) -> Method:
    """The method whose config class ``config_class`` is (or derives from)."""
    for cls in config_class.__mro__:
        method = _BY_CONFIG.get(cls)
        if method is not None:
            return method
    raise TypeError(f"{config_class.__name__} is no fusedpeft config class ({_config_names()})")


def for_peft_type(peft_type: Any) -> Optional[Method]:
    """The method whose adapter files carry this ``"peft_type"``, or None."""
    return _BY_PEFT_TYPE.get(peft_type) if isinstance(peft_type, str) else None


def config_from_dict(data: dict[str, Any]) -> _AdapterConfig:
    """The config an adapter_config.json dict describes (see the config classes' from_dict)."""
    method = for_peft_type(data.get("peft_type"))
    if method is None:
        raise ValueError(
            f"unsupported peft_type {data.get('peft_type')!r} in adapter config; fusedpeft reads "
            f"{sorted(_BY_PEFT_TYPE)}"
        )
    return method.config_class.from_dict(data)
