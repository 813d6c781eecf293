"""IA3Linear: an nn.Linear (or transformers Conv1D) with IA3 rescaling, run through the fused
``ia3_linear`` op. Parameter names and shapes follow peft (``ia3_l.<adapter>``, (out, 1) for
output scaling, (1, in) for feedforward input scaling)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.ia3 import ia3_linear
from .base import AdapterLayer, param_of


class IA3Linear(AdapterLayer):
    adapter_layer_names = ("ia3_l",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        is_feedforward: bool = False,
        init_ia3_weights: bool = True,
        fan_in_fan_out: bool = False,
        autocast_adapter_dtype: bool = True,
    ):
        super().__init__(base_layer, fan_in_fan_out)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter_name, init_ia3_weights, autocast_adapter_dtype)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True, autocast_adapter_dtype: bool = True):
        """Add an adapter; the first one becomes active, later ones wait for set_adapter."""
        self._check_new_adapter(adapter_name)
        device, dtype = self._adapter_param_device_dtype(autocast_adapter_dtype)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        scale = torch.ones(shape, device=device, dtype=dtype)
        if not init_ia3_weights:
            scale = torch.randn(shape, device=device, dtype=dtype)  # for tests: not a no-op
        self.ia3_l[adapter_name] = nn.Parameter(scale)
        self.set_adapter(self.active_adapters or adapter_name)

    def combined_scale(self, names=None) -> torch.Tensor:
        """Product of the active adapters' scales (peft composes IA3 adapters this way), in peft's
        (out, 1) / (1, in) shape, which ia3_linear takes: one adapter's is its parameter itself,
        with no view for autograd to record and run back."""
        names = self.active_adapters if names is None else names
        scales = self._modules["ia3_l"]
        scale = param_of(scales, names[0])
        for n in names[1:]:
            scale = scale * param_of(scales, n)
        return scale

    def _adapted_forward(self, x: torch.Tensor, names=None) -> torch.Tensor:
        return ia3_linear(x, self.base_weight(), param_of(self._modules["base_layer"], "bias"),
                          self.combined_scale(names), self.is_feedforward)

    def _scaled_base(self, name: str, invert: bool):
        if not self.is_feedforward:  # output scaling: rows of W and the bias scaled
            return self._output_affine(self.ia3_l[name], None, invert)
        # input scaling: column k of W times l_k; the bias is not scaled
        w = self.base_weight()
        scale = self.ia3_l[name].flatten().to(self._merge_dtype(w))
        if invert:
            scale = 1.0 / scale
        return (w.to(scale.dtype) * scale[None, :]).to(w.dtype), None

    def check_merge(self, name: str):
        self._refuse_zero_scale("IA3", name, self.ia3_l[name])

    def _merge_one(self, name: str, safe_merge: bool):
        w, b = self._scaled_base(name, invert=False)
        self._write_base(w, b, safe_merge, name)

    def _unmerge_one(self, name: str):
        w, b = self._scaled_base(name, invert=True)
        self._write_base(w, b, False, name)
