"""Swap the LoRA / IA3 linear layers of a live HF ``PeftModel`` for fusedpeft's fused layers.

The new layers take over the peft layer's modules and parameters as they are (same base_layer,
same ``lora_A`` / ``lora_B`` ModuleDicts, same ``ia3_l`` ParameterDict), so parameter names,
Parameter objects, optimizer state and ``save_pretrained`` are unaffected. They are subclasses of
LoraLinear / IA3Linear that also speak peft's layer protocol (``set_adapter(..., inference_mode)``,
``enable_adapters`` toggling requires_grad, ``delete_adapter``, ``update_layer(..., config=...)``,
...), and they are registered as virtual subclasses of peft's ``LoraLayer`` / ``IA3Layer`` when
:func:`from_peft` first runs, so peft's model-wide code (``disable_adapter()``, ``set_adapter``,
``merge_adapter``, ``save_pretrained``, ``add_adapter`` / ``load_adapter``, ``merge_and_unload``)
finds and drives them. peft is imported only inside :func:`from_peft`.

peft has no SSF, so there is nothing to swap for it: fusedpeft's SSFLinear layers (like any layer
fusedpeft already made) are left as they are by :func:`from_peft`.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import methods
from .config import is_lora_init, lora_scaling
from .modules import AdapterLayer, IA3Linear, LoraLinear, is_conv1d
from .modules.dora import DoraVariant


def _names(adapter_names) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _set_requires_grad(item, flag: bool):
    params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    for p in params:
        p.requires_grad_(flag)


class _PeftLayerProtocol:
    """peft's BaseTunerLayer behaviour on top of a fusedpeft AdapterLayer.

    Differences from fusedpeft's own layer: ``_active_adapter`` keeps the names peft set, also
    ones this layer does not hold (peft sets them model-wide); ``active_adapters`` lists only the
    ones present here, which are the ones that run. ``set_adapter`` / ``enable_adapters`` set
    requires_grad as peft does."""

    frozen_peft_weight_names: dict = {}
    quantization_backend = None
    # Set by each method's class: its registry record; the peft module, the peft layer it replaces
    # and peft's layer class whose isinstance checks must see it; the submodules a peft layer may
    # hold for the adapters fusedpeft runs (anything else is state fusedpeft does not know).
    method: "methods.Method"
    peft_module: str
    peft_layer: str
    peft_base: str
    peft_children: set

    @classmethod
    def swap_reason(cls, layer) -> Optional[str]:
        """Why a peft layer of this method cannot be swapped for ``cls``, or None."""
        adapters = getattr(layer, cls.adapter_layer_names[0])
        return _shared_reason(layer, adapters, cls.method.name, cls.peft_children) or cls._method_reason(layer)

    @staticmethod
    def _method_reason(layer) -> Optional[str]:
        return None

    @property
    def active_adapters(self) -> list[str]:
        # peft's semantics: the active names this layer holds. Every forward asks, so the common
        # case (each active name in the first adapter container) is answered from that
        # container's dict without building the set of all names.
        active = self._active_adapter
        first = self._modules[self.adapter_layer_names[0]]
        if len(active) == 1 and active[0] in first or all(n in first for n in active):
            return list(active)
        present = self._get_available_adapters()
        return [n for n in active if n in present]

    def _get_available_adapters(self) -> set[str]:
        names: set[str] = set()
        for layer_name in self.adapter_layer_names:
            names.update(getattr(self, layer_name).keys())
        return names

    def _all_available_adapter_names(self) -> list[str]:
        names: set[str] = set()
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if hasattr(container, "keys"):
                names.update(container.keys())
        return sorted(names)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False):
        names = _names(adapter_names)
        for layer_name in self.adapter_layer_names:
            for key, item in getattr(self, layer_name).items():
                _set_requires_grad(item, key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool):
        if enabled:
            self.set_adapter(self._active_adapter)
        else:
            for layer_name in self.adapter_layer_names:
                for item in getattr(self, layer_name).values():
                    _set_requires_grad(item, False)
        self._disable_adapters = not enabled

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True):
        names = set(_names(adapter_names))
        for layer_name in self.adapter_layer_names:
            for key, item in getattr(self, layer_name).items():
                if key in names:
                    _set_requires_grad(item, requires_grad)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None):
        return None  # plain LoRA / IA3 train all their weights

    def delete_adapter(self, adapter_name: str):
        """peft's semantics: a no-op where the layer lacks the adapter; when an active adapter goes,
        the remaining active ones stay, or else the first remaining adapter becomes active."""
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the base weight: unmerge it before deleting it")
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [n for n in self._active_adapter if n != adapter_name]
            if not remaining:
                remaining = self._all_available_adapter_names()[:1]
                if remaining:
                    warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.")
            self.set_adapter(remaining)

    def get_base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.data

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None):
        w = self.base_layer.weight
        device = w.device if device is None else device
        dtype = w.dtype if w.dtype.is_floating_point else None
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                moved = item.detach().to(device, dtype or item.dtype)
                container[adapter_name] = nn.Parameter(moved, requires_grad=item.requires_grad)
            elif dtype is not None:
                item.to(device, dtype)
            else:
                item.to(device)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None):
        # peft calls merge model-wide: names this layer does not hold are skipped, not an error.
        names = self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.adapter_names]
        super().merge(safe_merge=safe_merge, adapter_names=names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # peft's forward hooks pass adapter_names (its mixed batch) to every LoRA layer; the fused
        # layers run it with peft's semantics (AdapterLayer.forward).
        if not (args or kwargs) and not self._disable_adapters and not self.merged_adapters:
            # The common call, answered here (AdapterLayer.forward's checks are for the others).
            names = self.active_adapters
            return self._adapted_forward(x, names) if names else self.base_layer(x)  # none of them lives here
        kwargs.pop("alora_offsets", None)  # only set by peft for aLoRA, which from_peft never swaps in
        if not (args or kwargs) and not self._disable_adapters and not self.merged and not self.active_adapters:
            return self.base_layer(x)
        return super().forward(x, *args, **kwargs)


class PeftLoraLinear(_PeftLayerProtocol, LoraLinear):
    """LoraLinear that peft's LoraModel can drive (made by :func:`from_peft`)."""

    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "use_dora", "lora_bias")
    method = methods.LORA
    peft_module, peft_layer, peft_base = "peft.tuners.lora.layer", "Linear", "LoraLayer"
    peft_children = {"base_layer", "lora_dropout", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                     "lora_magnitude_vector"}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, *args, config=None, **kwargs):
        """fusedpeft's positional signature, or peft's ``update_layer(name, r, lora_alpha=..., config=...)``
        (used by ``PeftModel.add_adapter`` / ``load_adapter`` on an already adapted layer)."""
        if "use_dora" not in self.__dict__:
            self.use_dora = {}
        if config is None:
            super().update_layer(adapter_name, r, lora_alpha, *args, **kwargs)
        else:
            bad = [f"{f}={getattr(config, f)!r}" for f in methods.LORA.variant_keys if getattr(config, f, None)]
            if getattr(config, "use_dora", False) and getattr(config, "lora_bias", False):
                bad.append("use_dora with lora_bias")
            if not is_lora_init(config.init_lora_weights):
                bad.append(f"init_lora_weights={config.init_lora_weights!r}")
            if bad:
                raise NotImplementedError(
                    f"this layer was swapped to fusedpeft, which cannot add adapter {adapter_name!r} with {', '.join(bad)}; "
                    "add such adapters before calling fusedpeft.from_peft"
                )
            active = list(self._active_adapter)
            super().update_layer(
                adapter_name, r, lora_alpha, config.lora_dropout, config.init_lora_weights, config.use_rslora,
                autocast_adapter_dtype=False,  # peft creates them in the base dtype and upcasts model-wide after
                lora_bias=bool(getattr(config, "lora_bias", False)), variant=methods.lora_variant(config),
            )
            self.set_adapter(active, inference_mode=config.inference_mode)
        self.use_dora[adapter_name] = adapter_name in self.lora_variant

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B A in the adapter dtype (computed in float32 for half types), laid out like
        the base weight (transposed for Conv1D)."""
        dtype = self.lora_B[adapter].weight.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        delta = self.delta_weight(adapter, compute).to(dtype)
        return delta.T if self.fan_in_fan_out else delta

    def _initial_scaling(self, adapter: str) -> float:
        r, alpha = self.r[adapter], self.lora_alpha[adapter]
        return lora_scaling(r, alpha, self.use_rslora.get(adapter, False))

    def set_scale(self, adapter: str, scale: float):
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float):
        for name in self.active_adapters:
            self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None):
        for name in self.active_adapters:
            self.scaling[name] = self._initial_scaling(name) if scale is None else self.scaling[name] / scale

    @staticmethod
    def _method_reason(layer) -> Optional[str]:
        dora = {n for n, on in layer.use_dora.items() if on}
        others = sorted({type(v).__name__ for n, v in getattr(layer, "lora_variant", {}).items()
                         if not (n in dora and type(v).__name__ == "DoraLinearVariant")})
        if others:
            return f"LoRA variant {others}"
        for name in dora:
            magnitude = layer.lora_magnitude_vector[name] if name in layer.lora_magnitude_vector else None
            if not isinstance(getattr(magnitude, "weight", None), nn.Parameter):
                return f"DoRA adapter {name!r} has no magnitude vector"
            if getattr(layer, "lora_bias", {}).get(name, False):
                return f"DoRA adapter {name!r} with lora_bias"
        if set(layer.lora_magnitude_vector) - dora:
            return "magnitude vectors of adapters that are not DoRA"
        if len(layer.lora_embedding_A):
            return "embedding LoRA weights"
        for name in layer.lora_A:
            if name not in layer.lora_B or name not in layer.lora_dropout:
                return f"adapter {name!r} has no lora_B / lora_dropout entry"
            a, b = layer.lora_A[name], layer.lora_B[name]
            with_bias = bool(getattr(layer, "lora_bias", {}).get(name, False))
            if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or (b.bias is not None) != with_bias:
                return f"adapter {name!r} has lora_A / lora_B that are not nn.Linear with the biases lora_bias says"
            drop = layer.lora_dropout[name]
            if type(drop) not in (nn.Dropout, nn.Identity):
                return f"adapter {name!r} has dropout module {type(drop).__name__}"
            if name not in layer.scaling:
                return f"adapter {name!r} has no scaling"
        return None

    @classmethod
    def from_peft_layer(cls, layer: nn.Module) -> "PeftLoraLinear":
        names = list(layer.lora_A.keys())
        new = _construct(cls, layer, lambda base: cls(
            base, names[0], r=layer.r[names[0]], lora_alpha=layer.lora_alpha[names[0]],
            init_lora_weights=False, use_rslora=layer.use_rslora.get(names[0], False),
            fan_in_fan_out=layer.fan_in_fan_out, autocast_adapter_dtype=False,
        ))
        for attr in ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            setattr(new, attr, getattr(layer, attr))
        for attr in ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias"):
            setattr(new, attr, dict(getattr(layer, attr)))
        for name in names:
            new.use_rslora.setdefault(name, False)
            new.use_dora.setdefault(name, False)
            new.lora_bias.setdefault(name, False)
        for attr in ("cast_input_dtype_enabled", "ephemeral_gpu_offload", "is_target_conv_1d_layer", "kwargs"):
            if hasattr(layer, attr):
                setattr(new, attr, getattr(layer, attr))
        # DoRA adapters run through fusedpeft's variant, which reads peft's magnitude modules as they are.
        new.lora_variant = {name: DoraVariant for name in names if new.use_dora[name]}
        new._caches = {}
        return _finish(new, layer)


class PeftIA3Linear(_PeftLayerProtocol, IA3Linear):
    """IA3Linear that peft's IA3Model can drive (made by :func:`from_peft`)."""

    method = methods.IA3
    peft_module, peft_layer, peft_base = "peft.tuners.ia3.layer", "Linear", "IA3Layer"
    peft_children = {"base_layer", "ia3_l"}

    def update_layer(self, adapter_name: str, *args, config=None, **kwargs):
        """fusedpeft's signature, or peft's ``update_layer(name, config=...)``."""
        if config is None:
            return super().update_layer(adapter_name, *args, **kwargs)
        active = list(self._active_adapter)
        super().update_layer(adapter_name, config.init_ia3_weights, autocast_adapter_dtype=False)
        self.set_adapter(active, inference_mode=config.inference_mode)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # a rescaling, not an additive update

    @staticmethod
    def _method_reason(layer) -> Optional[str]:
        shape = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
        for name, p in layer.ia3_l.items():
            if tuple(p.shape) != shape:
                return f"ia3_l[{name!r}] has shape {tuple(p.shape)}, expected {shape}"
        return None

    @classmethod
    def from_peft_layer(cls, layer: nn.Module) -> "PeftIA3Linear":
        new = _construct(cls, layer, lambda base: cls(
            base, next(iter(layer.ia3_l.keys())), is_feedforward=layer.is_feedforward,
            fan_in_fan_out=layer.fan_in_fan_out, autocast_adapter_dtype=False,
        ))
        new.ia3_l = layer.ia3_l
        if hasattr(layer, "is_target_conv_1d_layer"):
            new.is_target_conv_1d_layer = layer.is_target_conv_1d_layer
        return _finish(new, layer)


def _construct(cls, layer, build):
    """Build the fused layer around the peft layer's base layer without touching the base
    parameters' requires_grad (peft's bias="all" / "lora_only" leave biases trainable)."""
    base = layer.base_layer
    flags = [(p, p.requires_grad) for p in base.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Conv1D / fan_in_fan_out notes: peft already set it right
        new = build(base)
    for p, flag in flags:
        p.requires_grad_(flag)
    return new


def _finish(new: AdapterLayer, layer: nn.Module) -> AdapterLayer:
    """Copy the peft layer's state and order the children as peft did (named_parameters and
    named_modules then list the same names in the same order)."""
    new._active_adapter = list(layer.active_adapters)
    new.merged_adapters = list(layer.merged_adapters)
    new._disable_adapters = bool(layer.disable_adapters)
    new.training = layer.training
    order = list(layer._modules) + [k for k in new._modules if k not in layer._modules]
    children = dict(new._modules)
    new._modules.clear()
    for k in order:
        if k in children:
            new._modules[k] = children[k]
    return new


# ----------------------------------------------------------------------------- what can be swapped
def _base_reason(layer) -> Optional[str]:
    base = layer.base_layer
    if getattr(layer, "quantization_backend", None) is not None:
        return f"quantized base layer ({layer.quantization_backend!r})"
    if not (type(base) is nn.Linear or is_conv1d(base)):
        return f"base layer is {type(base).__module__}.{type(base).__name__}, not a plain nn.Linear / Conv1D"
    w = base.weight
    if type(w) is not nn.Parameter or not w.dtype.is_floating_point or w.device.type == "meta":
        return f"base weight is a {type(w).__name__} of {w.dtype} on {w.device}"
    if "forward" in layer.__dict__ or "forward" in base.__dict__:
        return "its forward is patched (accelerate offloading hooks?)"
    return None


def _shared_reason(layer, adapters, method: str, children: set) -> Optional[str]:
    """What every method's layer must satisfy: a swappable base, an adapter, no unknown state."""
    reason = _base_reason(layer)
    if reason:
        return reason
    if not len(adapters):
        return f"holds no {method} adapter"
    extra = sorted(set(layer._modules) - children) + sorted(layer._parameters) + sorted(layer._buffers)
    if extra:
        return f"holds state fusedpeft does not know: {extra}"
    return None


# The layers from_peft swaps in, one per method peft also has.
_SWAPS = (PeftLoraLinear, PeftIA3Linear)
_SWAP_FOR: Optional[dict] = None  # {peft's layer class: the class that replaces it}, once peft is imported


def _swap_classes() -> dict:
    """{peft's layer class: its fused replacement}. On the first call, also makes peft's
    isinstance(module, LoraLayer / IA3Layer / BaseTunerLayer) checks see the replacements (those
    are ABCs). Only the Peft* subclasses are registered: layers made by fusedpeft.inject stay
    invisible to peft."""
    global _SWAP_FOR
    if _SWAP_FOR is None:
        swaps = {}
        for cls in _SWAPS:
            module = importlib.import_module(cls.peft_module)
            getattr(module, cls.peft_base).register(cls)
            swaps[getattr(module, cls.peft_layer)] = cls
        _SWAP_FOR = swaps
    return _SWAP_FOR


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace, in place, every peft LoRA ``Linear`` and IA3 ``Linear`` layer of ``peft_model`` (a
    ``peft.PeftModel``, or any module holding peft layers) by fusedpeft's fused layers, and return
    ``peft_model``.

    The new layers (:class:`PeftLoraLinear` / :class:`PeftIA3Linear`, subclasses of LoraLinear /
    IA3Linear) reuse the peft layer's base layer and adapter containers, so every parameter keeps
    its name and identity (an optimizer built before keeps working), and keep its active adapters,
    scaling, dropout, merged and disabled state. peft keeps working on the model:
    ``save_pretrained``, ``disable_adapter()``, ``set_adapter``, ``merge_adapter`` /
    ``unmerge_adapter``, ``merge_and_unload``, and adding plain LoRA / IA3 adapters.

    Layers fusedpeft cannot run (LoRA on Embedding / Conv layers, other LoRA
    variants, quantized or patched base layers, other peft methods) stay peft's and keep working
    beside the fused ones; one warning names each of them and why. This is deliberately not an
    error: a partly fused model computes the same thing.

    Adapters peft adds later to layers that are already fused (``add_adapter`` / ``load_adapter``)
    are built as fused adapters (plain LoRA / IA3 only: DoRA etc. raise); on modules not adapted
    before, peft creates its own layers again: call ``from_peft`` once more to swap those.
    Not supported on swapped layers: peft's mixed-batch inference (``adapter_names=...``) raises.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer

        swaps = _swap_classes()
    except ImportError as e:
        raise ImportError("fusedpeft.from_peft needs the optional peft package (pip install peft)") from e

    done: list[str] = []  # swapped or left alone: their insides are not visited
    skipped: dict[str, str] = {}
    for name, module in list(peft_model.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(module, AdapterLayer):
            done.append(name)  # already fused
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        done.append(name)
        cls = swaps.get(type(module))
        if cls is None:
            reason = f"{type(module).__module__}.{type(module).__name__} has no fused counterpart"
        else:
            reason = cls.swap_reason(module)
        if reason:
            skipped[name] = reason
            continue
        new = cls.from_peft_layer(module)
        parent_name, _, child = name.rpartition(".")
        parent = peft_model.get_submodule(parent_name) if parent_name else peft_model
        setattr(parent, child, new)
    if skipped:
        lines = "\n".join(f"  {n}: {r}" for n, r in skipped.items())
        warnings.warn(f"fusedpeft.from_peft left {len(skipped)} layer(s) as peft's:\n{lines}")
    return peft_model
