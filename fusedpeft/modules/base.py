"""What every adapter layer shares: the wrapped frozen base layer, named adapters with one or more
active, enable/disable and merge bookkeeping. Attribute and method names follow peft's
BaseTunerLayer (``base_layer``, ``active_adapters``, ``merged_adapters``, ``set_adapter``,
``enable_adapters``, ``merge``, ``unmerge``) so that code written against peft keeps working and
parameter names stay identical."""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .. import distributed


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def param_of(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter, read from the module's parameter dict where it is
    registered there (about 0.1 us instead of nn.Module.__getattr__'s 0.8 us: the forward of a small
    layer is bound by host time); a parametrised weight or a property falls back to getattr."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers Conv1D)")


class AdapterLayer(nn.Module):
    """Base of LoraLinear / IA3Linear / SSFLinear. Subclasses name their per-adapter containers in
    ``adapter_layer_names`` and implement ``update_layer``, ``_adapted_forward(x, names=None)`` (names:
    the active adapters, where the caller has them already), ``_merge_one``, ``_unmerge_one``."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    # (in_features, out_features) of the wrapped layer; a layer of another kind overrides it.
    base_shape = staticmethod(linear_shape)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        self.in_features, self.out_features = self.base_shape(base_layer)
        if is_conv1d(base_layer) and not fan_in_fan_out:
            warnings.warn("the target is a transformers Conv1D (weight stored as (in, out)): setting fan_in_fan_out=True")
            fan_in_fan_out = True
        elif isinstance(base_layer, nn.Linear) and fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the target is an nn.Linear: setting fan_in_fan_out=False")
            fan_in_fan_out = False
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ peft-style bookkeeping
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view (no copy) for Conv1D."""
        w = param_of(self._modules["base_layer"], "weight")
        return w.T if self.fan_in_fan_out else w

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, adapter_names: Union[str, Iterable[str]]):
        """Make these adapters active (and trainable); the others stay but neither run nor train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise KeyError(f"adapter(s) {unknown} not found in this layer; it has {self.adapter_names}")
        for layer_name in self.adapter_layer_names:
            for key, module in getattr(self, layer_name).items():
                params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
                for p in params:
                    p.requires_grad_(key in names)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool):
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str):
        if adapter_name not in self.adapter_names:
            raise KeyError(f"adapter {adapter_name!r} not found; this layer has {self.adapter_names}")
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the base weight: unmerge it before deleting it")
        self._drop_entries(adapter_name)
        self._active_adapter = [n for n in self._active_adapter if n != adapter_name]

    def _drop_entries(self, adapter_name: str):
        """Remove whatever this adapter has in the per-adapter dicts (delete, or a failed add)."""
        for layer_name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, layer_name)
            if adapter_name in container:
                del container[adapter_name]

    def _check_new_adapter(self, adapter_name: str):
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")

    def _adapter_param_device_dtype(self, autocast_adapter_dtype: bool):
        w = self.base_layer.weight
        dtype = w.dtype
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # float32 master weights for the adapter, as peft does by default
        if not dtype.is_floating_point:
            dtype = torch.float32
        return w.device, dtype

    # ------------------------------------------------------------------ merge
    def check_merge(self, adapter_name: str):
        """Raise, changing nothing, when this adapter cannot be merged (a method's own rule)."""
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None):
        """Fold adapters (default: the active ones) into the base weight in place. The update is
        computed in float32 (float64 for a float64 base) and rounded once. With safe_merge the
        merged weight is checked for NaN/Inf before it is written."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._refuse_sharded("merging")
        for name in names:  # every refusal before the first weight is written
            if name not in self.adapter_names:
                raise KeyError(f"adapter {name!r} not found; this layer has {self.adapter_names}")
            if name not in self.merged_adapters:
                self.check_merge(name)
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; skipping")
                continue
            self._merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self):
        """Undo merge(), newest first. Restores the base weight up to one rounding of its dtype."""
        if self.merged_adapters:
            self._refuse_sharded("unmerging")
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _refuse_sharded(self, what: str):
        """Merging writes the base weight in place: not on FSDP2's DTensor shards (outside forward)."""
        if distributed.initialized() and distributed.is_sharded([self.base_layer.weight]):
            raise NotImplementedError(f"{what} is not supported on a layer sharded by FSDP2 (fully_shard): merge an "
                                      "unsharded model that loads the saved adapter")

    def _write_base(self, new_weight: torch.Tensor, new_bias: Optional[torch.Tensor], safe_merge: bool, name: str):
        """Copy the merged weight (and bias) into the base layer in place. A bias written into a
        layer that has none becomes a new frozen Parameter of the weight's dtype and device (SSF's
        shift); ``_remove_base_bias`` takes it out again."""
        if safe_merge:
            for t in (new_weight, new_bias):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN/Inf into the base layer; nothing was changed")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_(new_weight.T if self.fan_in_fan_out else new_weight)
            if new_bias is not None:
                if self.base_layer.bias is None:
                    zeros = torch.zeros(self.out_features, dtype=w.dtype, device=w.device)
                    self.base_layer.bias = nn.Parameter(zeros, requires_grad=False)
                self.base_layer.bias.copy_(new_bias)

    def _remove_base_bias(self):
        self.base_layer.bias = None  # nn.Module keeps the name registered, as nn.Linear(bias=False) does

    @staticmethod
    def _merge_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @staticmethod
    def _refuse_zero_scale(method: str, name: str, scale: torch.Tensor):
        # unmerge divides by the scale
        if (scale == 0).any():
            raise ValueError(f"{method} adapter {name!r} has zero scales: merging it could not be undone; nothing was changed")

    def _output_affine(self, scale: torch.Tensor, shift: Optional[torch.Tensor], invert: bool):
        """The base (weight as (out, in), bias) with y -> y * scale + shift folded in (``invert``:
        the inverse, y -> (y - shift) / scale): rows of W times scale, bias -> bias * scale +
        shift, where a missing bias counts as zero when there is a shift. Computed in float32
        (float64 for float64) and rounded once to the base dtype."""
        w, b = self.base_weight(), self.base_layer.bias
        dt = self._merge_dtype(w)
        s = scale.flatten().to(dt)
        t = None if shift is None else shift.to(dt)
        if invert:
            s = 1.0 / s
        new_w = (w.to(dt) * s[:, None]).to(w.dtype)
        if b is None and t is None:
            return new_w, None
        bias = torch.zeros_like(s) if b is None else b.to(dt)
        if t is None:
            new_b = bias * s
        else:
            new_b = (bias - t) * s if invert else bias * s + t
        return new_w, new_b.to(w.dtype if b is None else b.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[list] = None, **kwargs) -> torch.Tensor:
        """The adapted layer on x. ``adapter_names`` (one name per row of x's first dimension, as
        peft takes it; ``"__base__"`` for none) runs each row through its own adapter instead of
        the active ones. Any other argument is an error: a linear layer takes its input alone."""
        if args or kwargs:
            raise TypeError(
                f"{type(self).__name__}.forward() takes the input (and adapter_names) only; got "
                f"{len(args)} more positional argument(s) and keyword argument(s) {sorted(kwargs)}"
            )
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            return self._per_row_forward(x, list(adapter_names))
        if self.merged or not self._active_adapter:
            return self.base_layer(x)
        return self._adapted_forward(x)

    def _check_per_row(self, x: torch.Tensor, adapter_names: list):
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} name(s) for an input of shape {tuple(x.shape)}: it "
                "takes one name per row of the input's first (batch) dimension"
            )
        if self.merged:
            raise ValueError(f"adapter_names cannot be used while adapters {self.merged_adapters} are merged "
                             "into the base weight: unmerge them first")

    def _per_row_forward(self, x: torch.Tensor, adapter_names: list) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not take adapter_names: per-row adapters are LoRA's only")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}, active={self.active_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained whole (peft's modules_to_save): the original stays untouched for eject,
    each adapter trains its own copy. Parameter names match peft's
    (``original_module.*``, ``modules_to_save.<adapter>.*``)."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name: str):
        import copy

        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        self.set_adapter(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    def set_adapter(self, adapter_names):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [n for n in names if n in self.modules_to_save]
        for key, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(key in names[:1])
        self._active_adapter = names[:1]

    def enable_adapters(self, enabled: bool):
        self._disable_adapters = not enabled

    def forward(self, *args, **kwargs):
        if self._disable_adapters or not self._active_adapter:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self._active_adapter[0]](*args, **kwargs)
