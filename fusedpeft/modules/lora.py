"""LoraLinear: an nn.Linear (or transformers Conv1D) with LoRA adapters, run through the fused
``lora_linear`` op. Its parameters carry peft's names (``base_layer.weight``,
``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``) so state dicts and optimizers carry over.

What an adapter computes, and how it merges, is its variant's (``LoraVariant``, as peft's): plain
LoRA by default, and a variant such as DoRA is a subclass that overrides the hooks it changes, not
a copy of the layer."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from .. import distributed
from ..ops.lora import lora_linear
from ..config import is_lora_init, lora_scaling
from .base import AdapterLayer, param_of


class LoraVariant:
    """The hooks through which a LoraLinear runs one adapter; this class is plain LoRA. A variant
    subclasses it and overrides what it changes. Hooks are static: the state lives on the layer
    (its per-adapter dicts and containers, and whatever ``init`` adds), the variant holds code only.

    - ``init(module, adapter_name)``: once the adapter's lora_A, lora_B and scaling exist (a variant
      adds its own parameters here).
    - ``forward(module, adapter_name, x) -> y``: the layer's output with this adapter the only
      active one, base included (plain LoRA: one fused ``lora_linear`` call).
    - ``update(module, adapter_name, x, y) -> y``: ``y``, the output so far (the base and the
      adapters before this one), plus this adapter's part, with its own dropout mask (several
      active adapters, and per-row adapter_names).
    - ``merge(module, adapter_name, weight) -> weight`` / ``unmerge(...)``: the base weight, as
      (out, in) in float32 (float64 for a float64 base), with this adapter folded in / taken out.
    """

    @staticmethod
    def init(module: "LoraLinear", adapter_name: str) -> None:
        return None

    @staticmethod
    def forward(module: "LoraLinear", adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias, lora_A, lora_B, dropout_p = module.adapter_operands(adapter_name)
        return lora_linear(x, weight, bias, lora_A, lora_B, module.scaling[adapter_name], dropout_p, module.training)

    @staticmethod
    def update(module: "LoraLinear", adapter_name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
        x_n = module.lora_dropout[adapter_name](x.to(lora_A.weight.dtype))
        return y + (module.scaling[adapter_name] * lora_B(lora_A(x_n))).to(y.dtype)

    @staticmethod
    def merge(module: "LoraLinear", adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + module.delta_weight(adapter_name, weight.dtype)

    @staticmethod
    def unmerge(module: "LoraLinear", adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - module.delta_weight(adapter_name, weight.dtype)


class LoraLinear(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_variant", "lora_bias", "use_rslora")

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
        variant: Optional[type[LoraVariant]] = None,
        lora_bias: bool = False,
    ):
        super().__init__(base_layer, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's magnitudes (fusedpeft.modules.dora), as peft keeps them
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        # The adapters that are not plain LoRA, and their variants (as peft keeps them).
        self.lora_variant: dict[str, type[LoraVariant]] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, autocast_adapter_dtype,
                          variant=variant, lora_bias=lora_bias)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        autocast_adapter_dtype: bool = True,
        variant: Optional[type[LoraVariant]] = None,
        lora_bias: bool = False,
    ):
        """Add an adapter. The first one becomes active; later ones are added inactive and frozen
        until set_adapter names them (as in peft). ``variant``: a LoraVariant subclass that runs
        and merges this adapter (None: plain LoRA). ``lora_bias``: lora_B gets a trainable bias
        b_B, so the adapter adds scaling * b_B too (peft's lora_bias)."""
        self._check_new_adapter(adapter_name)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
        if r > min(self.in_features, self.out_features):
            warnings.warn(
                f"LoRA rank r={r} exceeds min(in_features, out_features)={min(self.in_features, self.out_features)}: "
                "the update cannot have that rank and only costs memory and time"
            )
        if lora_bias and variant is not None and variant is not LoraVariant:
            raise ValueError(f"lora_bias=True is not supported with {variant.__name__} (as in peft)")
        device, dtype = self._adapter_param_device_dtype(autocast_adapter_dtype)
        if lora_bias and self.base_layer.bias is None:
            warnings.warn(f"lora_bias=True on a layer without a bias: adapter {adapter_name!r} cannot be merged")
        try:
            self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
            self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, device=device, dtype=dtype)
            self.lora_bias[adapter_name] = bool(lora_bias)
            self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.use_rslora[adapter_name] = use_rslora
            self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
            self.reset_lora_parameters(adapter_name, init_lora_weights)
            if variant is not None and variant is not LoraVariant:
                self.lora_variant[adapter_name] = variant
            self._variant(adapter_name).init(self, adapter_name)
        except BaseException:  # a refused init (or a failed allocation) leaves the layer as it was
            self._drop_entries(adapter_name)
            raise
        self.set_adapter(self.active_adapters or adapter_name)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights):
        """The adapter's starting values (see LoraConfig.init_lora_weights). pissa and olora also
        rewrite the base weight to the residual W - scaling B A, so the layer's output is unchanged."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if not is_lora_init(init_lora_weights):
            raise ValueError(f"unknown init_lora_weights {init_lora_weights!r}")
        if init_lora_weights is False:
            return  # nn.Linear's own init: all random (for tests; the adapter is not a no-op)
        if self.lora_bias[adapter_name]:
            nn.init.zeros_(self.lora_B[adapter_name].bias)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            self._init_from_base(adapter_name, init_lora_weights)
            return
        nn.init.zeros_(B)

    def _init_from_base(self, adapter_name: str, init: str):
        """pissa / pissa_niter_<n> / olora: B, A from the base weight W (out, in), in float32, and
        W rewritten to W - scaling B A (one rounding to its dtype)."""
        w = self.base_weight()
        if not w.dtype.is_floating_point:
            raise TypeError(f"init_lora_weights={init!r} needs a floating-point base weight, got {w.dtype}")
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if r > min(w.shape):
            raise ValueError(f"init_lora_weights={init!r} needs r <= min(in, out) = {min(w.shape)}, got r={r}")
        W = w.to(self._merge_dtype(w))
        if init == "olora":
            Q, R = torch.linalg.qr(W)  # W = Q R: B = Q_r (out, r), A = R_r (r, in)
            B, A = Q[:, :r], R[:r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:  # pissa_niter_<n>: a randomised SVD with n subspace iterations
                U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[1]))
                Vh = V.T
            root = torch.sqrt(S / scaling)
            B, A = U * root, root[:, None] * Vh
        self.lora_A[adapter_name].weight.copy_(A)
        self.lora_B[adapter_name].weight.copy_(B)
        self._write_base((W - scaling * (B @ A)).to(w.dtype), None, False, adapter_name)

    def layer_bias(self, *adapter_names: str) -> Optional[torch.Tensor]:
        """The bias the fused op adds for these adapters: the base bias, plus scaling * b_B of each
        with lora_bias (a differentiable sum, so b_B's gradient is scaling * sum_rows(grad_y))."""
        bias = self.base_layer.bias
        for name in adapter_names:
            if self.lora_bias.get(name, False):
                lora_b = self.lora_B[name].bias * self.scaling[name]
                bias = lora_b if bias is None else bias + lora_b
        return bias

    def adapter_operands(self, name: str):
        """(base weight as (out, in), the bias the op adds, lora_A, lora_B, dropout p) of one adapter:
        what its fused call takes. Read through the containers' dicts: each nn.Module attribute
        look-up costs about a microsecond of host time, and a small layer's step is bound by host
        time (this is every forward's path)."""
        modules = self._modules
        bias = self.layer_bias(name) if self.lora_bias.get(name, False) else param_of(modules["base_layer"], "bias")
        return (self.base_weight(), bias, param_of(modules["lora_A"]._modules[name], "weight"),
                param_of(modules["lora_B"]._modules[name], "weight"), self._dropout_p(name))

    def _dropout_p(self, name: str) -> float:
        module = self._modules["lora_dropout"]._modules[name]
        return module.p if isinstance(module, nn.Dropout) else 0.0

    def _variant(self, name: str) -> type[LoraVariant]:
        return self.lora_variant.get(name, LoraVariant)

    def _adapted_forward(self, x: torch.Tensor, names=None) -> torch.Tensor:
        names = self.active_adapters if names is None else names
        variants = self.lora_variant
        if len(names) == 1:
            name = names[0]
            return variants.get(name, LoraVariant).forward(self, name, x)
        plain = not any(n in variants for n in names)
        if plain and (not self.training or all(self._dropout_p(n) == 0.0 for n in names)):
            # Several plain adapters without dropout are one adapter of rank sum(r): concatenate A
            # along rows and scaling_i * B_i along columns, and run a single fused call.
            dtype = self.lora_A[names[0]].weight.dtype
            A = torch.cat([self.lora_A[n].weight.to(dtype) for n in names], 0)
            B = torch.cat([self.lora_B[n].weight.to(dtype) * self.scaling[n] for n in names], 1)
            return lora_linear(x, self.base_weight(), self.layer_bias(*names), A, B, 1.0)
        # Otherwise each adapter needs its own mask (or its own variant): the first one runs with
        # the base (fused, for plain LoRA), the others add their part on top.
        y = self._variant(names[0]).forward(self, names[0], x)
        for n in names[1:]:
            y = self._variant(n).update(self, n, x, y)
        return y

    def _per_row_forward(self, x: torch.Tensor, adapter_names: list) -> torch.Tensor:
        """peft's mixed-batch forward: the base output for every row, plus each named adapter's
        update on its own rows (computed in the adapter's dtype, as peft does). A name this layer
        does not hold, and ``"__base__"``, leave their rows at the base output."""
        self._check_per_row(x, adapter_names)
        if self._bank_applies(x, adapter_names):
            return self._per_row_through_bank(x, adapter_names)
        result = self.base_layer(x)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.lora_A:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            part = self._variant(name).update(self, name, x.index_select(0, rows), result.index_select(0, rows))
            result = result.index_copy(0, rows, part)
        return result

    def _bank_applies(self, x: torch.Tensor, adapter_names: list) -> bool:
        """Whether a mixed batch can run through fusedpeft.ops.multi_lora_linear (the serving
        op): no gradient wanted, no dropout in play, plain LoRA adapters (no variant, no lora_bias)."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        names = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]
        return all(n not in self.lora_variant and not self.lora_bias.get(n, False)
                   and (not self.training or self._dropout_p(n) == 0.0) for n in names)

    def _per_row_through_bank(self, x: torch.Tensor, adapter_names: list) -> torch.Tensor:
        """The mixed batch as one multi_lora_linear call: the layer's adapters stacked into a bank
        (kept while none of them changes) and one slot index per row of x flattened."""
        from ..ops.multi_lora import multi_lora_linear

        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        names = list(self.lora_A)
        key = (dtype, tuple((n, self.lora_A[n].weight._version, self.lora_B[n].weight._version,
                             self.lora_A[n].weight.data_ptr(), self.lora_B[n].weight.data_ptr(), self.scaling[n])
                            for n in names))
        # Not kept under torch.distributed: FSDP2 all-gathers the adapters into the same storage
        # at every forward and keeps their version counters, so changed weights look unchanged.
        cached = None if distributed.initialized() else self.__dict__.get("_bank_cache")
        if cached is None or cached[0] != key:
            R = max(self.r[n] for n in names)
            A = torch.zeros(len(names), R, self.in_features, dtype=dtype, device=x.device)
            B = torch.zeros(len(names), self.out_features, R, dtype=dtype, device=x.device)
            for s, n in enumerate(names):
                A[s, :self.r[n]] = self.lora_A[n].weight.detach()
                B[s, :, :self.r[n]] = self.lora_B[n].weight.detach()
            scalings = torch.tensor([float(self.scaling[n]) for n in names], dtype=torch.float32, device=x.device)
            ranks = torch.tensor([self.r[n] for n in names], dtype=torch.int32, device=x.device)
            cached = self.__dict__["_bank_cache"] = (key, (A, B, scalings, ranks, {n: s for s, n in enumerate(names)}))
        A, B, scalings, ranks, slot = cached[1]
        per_seq = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
        idx = per_seq.repeat_interleave(x[0].numel() // x.shape[-1]) if x.dim() > 1 else per_seq
        w, b = self.base_weight(), self.base_layer.bias
        y = multi_lora_linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), A, B, scalings, ranks, idx)
        return y

    # ------------------------------------------------------------------ merge
    def delta_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """scaling * B A as (out, in), computed in ``dtype``."""
        A = self.lora_A[adapter_name].weight.to(dtype)
        B = self.lora_B[adapter_name].weight.to(dtype)
        return (B @ A) * self.scaling[adapter_name]

    def check_merge(self, adapter_name: str):
        if self.lora_bias.get(adapter_name, False) and self.base_layer.bias is None:
            raise RuntimeError(f"adapter {adapter_name!r} has lora_bias=True but the base layer has no bias to merge "
                               "it into; nothing was changed")

    def _merged_bias(self, name: str, sign: float) -> Optional[torch.Tensor]:
        """The base bias with sign * scaling * b_B folded in (lora_bias), or None."""
        if not self.lora_bias.get(name, False):
            return None
        bias = self.base_layer.bias
        dt = self._merge_dtype(bias)
        return (bias.to(dt) + sign * self.scaling[name] * self.lora_B[name].bias.to(dt)).to(bias.dtype)

    def _merge_one(self, name: str, safe_merge: bool):
        w = self.base_weight()
        merged = self._variant(name).merge(self, name, w.to(self._merge_dtype(w))).to(w.dtype)
        self._write_base(merged, self._merged_bias(name, 1.0), safe_merge, name)

    def _unmerge_one(self, name: str):
        w = self.base_weight()
        restored = self._variant(name).unmerge(self, name, w.to(self._merge_dtype(w))).to(w.dtype)
        self._write_base(restored, self._merged_bias(name, -1.0), False, name)
