"""LoraLinear: an nn.Linear (or transformers Conv1D) with LoRA adapters, run through the fused
``lora_linear`` op. Its parameters carry peft's names (``base_layer.weight``,
``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``) so state dicts and optimizers carry over."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..ops.lora import lora_linear
from .base import AdapterLayer


class LoraLinear(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        autocast_adapter_dtype: bool = True,
    ):
        super().__init__(base_layer, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, autocast_adapter_dtype)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        autocast_adapter_dtype: bool = True,
    ):
        """Add an adapter. The first one becomes active; later ones are added inactive and frozen
        until set_adapter names them (as in peft)."""
        self._check_new_adapter(adapter_name)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
        if r > min(self.in_features, self.out_features):
            warnings.warn(
                f"LoRA rank r={r} exceeds min(in_features, out_features)={min(self.in_features, self.out_features)}: "
                "the update cannot have that rank and only costs memory and time"
            )
        device, dtype = self._adapter_param_device_dtype(autocast_adapter_dtype)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self.active_adapters or adapter_name)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights):
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if init_lora_weights is False:
            return  # nn.Linear's own init: both random (for tests; the adapter is not a no-op)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            raise ValueError(f"unknown init_lora_weights {init_lora_weights!r}")
        nn.init.zeros_(B)

    def _dropout_p(self, name: str) -> float:
        module = self.lora_dropout[name]
        return module.p if isinstance(module, nn.Dropout) else 0.0

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.active_adapters
        weight, bias = self.base_weight(), self.base_layer.bias
        if len(names) == 1:
            name = names[0]
            return lora_linear(
                x, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                self.scaling[name], self._dropout_p(name), self.training,
            )
        if not self.training or all(self._dropout_p(n) == 0.0 for n in names):
            # Several adapters without dropout are one adapter of rank sum(r): concatenate A along
            # rows and scaling_i * B_i along columns, and run a single fused call.
            dtype = self.lora_A[names[0]].weight.dtype
            A = torch.cat([self.lora_A[n].weight.to(dtype) for n in names], 0)
            B = torch.cat([self.lora_B[n].weight.to(dtype) * self.scaling[n] for n in names], 1)
            return lora_linear(x, weight, bias, A, B, 1.0)
        # Several adapters with dropout need independent masks: the first one runs fused with the
        # base, the others add their update on top.
        y = lora_linear(
            x, weight, bias, self.lora_A[names[0]].weight, self.lora_B[names[0]].weight,
            self.scaling[names[0]], self._dropout_p(names[0]), self.training,
        )
        for n in names[1:]:
            A, B = self.lora_A[n].weight, self.lora_B[n].weight
            x_n = self.lora_dropout[n](x.to(A.dtype))
            y = y + (self.scaling[n] * ((x_n @ A.T) @ B.T)).to(y.dtype)
        return y

    def _per_row_forward(self, x: torch.Tensor, adapter_names: list) -> torch.Tensor:
        """peft's mixed-batch forward: the base output for every row, plus each named adapter's
        update on its own rows (computed in the adapter's dtype, as peft does). A name this layer
        does not hold, and ``"__base__"``, leave their rows at the base output."""
        self._check_per_row(x, adapter_names)
        result = self.base_layer(x)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.lora_A:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            sub = self.lora_dropout[name](x.index_select(0, rows).to(A.dtype))
            update = (sub @ A.T) @ B.T * self.scaling[name]
            result = result.index_add(0, rows, update.to(result.dtype))
        return result

    # ------------------------------------------------------------------ merge
    def delta_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """scaling * B A as (out, in), computed in ``dtype``."""
        A = self.lora_A[adapter_name].weight.to(dtype)
        B = self.lora_B[adapter_name].weight.to(dtype)
        return (B @ A) * self.scaling[adapter_name]

    def _merge_one(self, name: str, safe_merge: bool):
        w = self.base_weight()
        dt = self._merge_dtype(w)
        merged = (w.to(dt) + self.delta_weight(name, dt)).to(w.dtype)
        self._write_base(merged, None, safe_merge, name)

    def _unmerge_one(self, name: str):
        w = self.base_weight()
        dt = self._merge_dtype(w)
        self._write_base((w.to(dt) - self.delta_weight(name, dt)).to(w.dtype), None, False, name)
