"""SSFLinear: an nn.Linear (or transformers Conv1D) followed by SSF's learned per-output-channel
affine map (scale-shift fine-tuning, Lian et al. 2022), run through the fused ``ssf_linear`` op:

    y = (x W^T + b) * ssf_scale + ssf_shift,     ssf_scale, ssf_shift: (out_features,)

Parameters ``ssf_scale.<adapter>`` and ``ssf_shift.<adapter>``, in ParameterDicts as IA3's
``ia3_l``. Several active adapters compose in order, each applied to the previous one's output."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import check_ssf_init
from ..ops.ssf import ssf_linear
from .base import AdapterLayer


class SSFLinear(AdapterLayer):
    adapter_layer_names = ("ssf_scale", "ssf_shift")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        init_ssf_weights=True,
        fan_in_fan_out: bool = False,
        autocast_adapter_dtype: bool = True,
    ):
        super().__init__(base_layer, fan_in_fan_out)
        self.ssf_scale = nn.ParameterDict()
        self.ssf_shift = nn.ParameterDict()
        # The adapter whose merge gave a bias-free base layer its bias; its unmerge removes it.
        self._bias_added_by: Optional[str] = None
        self.update_layer(adapter_name, init_ssf_weights, autocast_adapter_dtype)

    def update_layer(self, adapter_name: str, init_ssf_weights=True, autocast_adapter_dtype: bool = True):
        """Add an adapter; the first one becomes active, later ones wait for set_adapter.
        init_ssf_weights: True (scale 1, shift 0: a no-op), "ssf" (scale ~ N(1, 0.02),
        shift ~ N(0, 0.02), the paper's init) or False (both clearly random, for tests)."""
        self._check_new_adapter(adapter_name)
        check_ssf_init(init_ssf_weights, "init_ssf_weights")
        device, dtype = self._adapter_param_device_dtype(autocast_adapter_dtype)
        scale = torch.ones(self.out_features, device=device, dtype=dtype)
        shift = torch.zeros(self.out_features, device=device, dtype=dtype)
        if init_ssf_weights == "ssf":
            nn.init.normal_(scale, mean=1.0, std=0.02)
            nn.init.normal_(shift, mean=0.0, std=0.02)
        elif init_ssf_weights is False:  # for tests: far from the no-op
            scale.add_(0.5 * torch.randn_like(scale))
            shift.normal_()
        self.ssf_scale[adapter_name] = nn.Parameter(scale)
        self.ssf_shift[adapter_name] = nn.Parameter(shift)
        self.set_adapter(self.active_adapters or adapter_name)

    def combined_scale_shift(self, names=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One (scale, shift) for the active adapters applied in order:
        ((z s1 + t1) s2 + t2) = z (s1 s2) + (t1 s2 + t2)."""
        names = self.active_adapters if names is None else names
        scale, shift = self.ssf_scale[names[0]], self.ssf_shift[names[0]]
        for n in names[1:]:
            s = self.ssf_scale[n]
            scale, shift = scale * s, torch.addcmul(self.ssf_shift[n], shift, s)
        return scale, shift

    def _adapted_forward(self, x: torch.Tensor, names=None) -> torch.Tensor:
        scale, shift = self.combined_scale_shift(names)
        return ssf_linear(x, self.base_weight(), self.base_layer.bias, scale, shift)

    # ------------------------------------------------------------------ merge
    def check_merge(self, name: str):
        self._refuse_zero_scale("SSF", name, self.ssf_scale[name])

    def _merge_one(self, name: str, safe_merge: bool):
        scale, shift = self.ssf_scale[name], self.ssf_shift[name]
        has_bias = self.base_layer.bias is not None
        use_shift = has_bias or bool(shift.any())  # a zero shift needs no bias on a bias-free layer
        w, b = self._output_affine(scale, shift if use_shift else None, invert=False)
        self._write_base(w, b, safe_merge, name)  # a bias-free base gains a frozen bias here
        if use_shift and not has_bias:
            self._bias_added_by = name

    def _unmerge_one(self, name: str):
        has_bias = self.base_layer.bias is not None
        w, b = self._output_affine(self.ssf_scale[name], self.ssf_shift[name] if has_bias else None, invert=True)
        if name == self._bias_added_by:
            self._write_base(w, None, False, name)
            self._remove_base_bias()
            self._bias_added_by = None
        else:
            self._write_base(w, b, False, name)
