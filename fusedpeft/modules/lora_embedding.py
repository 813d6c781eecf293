"""LoraEmbedding: an nn.Embedding with LoRA adapters, as peft's ``lora.Embedding``.

    y = E[x] + scaling * (A^T[x]) B^T        E: (num_embeddings, dim), A: (r, num_embeddings),
                                             B: (dim, r); A^T[x] looks rows of A^T up by token

Parameter names and shapes are peft's (``lora_embedding_A.<adapter>`` (r, num_embeddings),
``lora_embedding_B.<adapter>`` (dim, r)), so its state dicts and adapter files carry over. A
lookup and an r-wide product are memory-bound: plain torch ops, no fused kernel. As in peft, the
init is the reverse of a linear layer's (A zero, B normal: the adapter starts as a no-op), dropout
does not apply to token ids, an ``embed_scale`` of the base layer (Gemma's scaled embeddings)
scales the adapter's part too, and ``lora_bias`` is refused."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import lora_scaling
from .base import AdapterLayer


class LoraEmbedding(AdapterLayer):
    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(
        self,
        base_layer: nn.Embedding,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        autocast_adapter_dtype: bool = True,
        lora_bias: bool = False,
        variant=None,
    ):
        super().__init__(base_layer, False)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()  # kept for peft's state layout: ids take no dropout
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          autocast_adapter_dtype, lora_bias=lora_bias, variant=variant)

    @staticmethod
    def base_shape(base_layer: nn.Module) -> tuple[int, int]:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps an nn.Embedding, got {type(base_layer).__name__}")
        return base_layer.num_embeddings, base_layer.embedding_dim

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, autocast_adapter_dtype: bool = True,
                     lora_bias: bool = False, variant=None):
        """Add an adapter (the first becomes active; later ones wait for set_adapter, as in peft).
        Plain LoRA only: a variant (DoRA) is refused."""
        self._check_new_adapter(adapter_name)
        if variant is not None:
            raise ValueError(f"{getattr(variant, '__name__', variant)} is not implemented on an nn.Embedding")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
        if lora_bias:
            raise ValueError("lora_bias=True is not supported on an nn.Embedding (as in peft)")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported on an nn.Embedding: True, "
                             "False or 'gaussian'")
        device, dtype = self._adapter_param_device_dtype(autocast_adapter_dtype)
        A = torch.randn(r, self.in_features, device=device, dtype=dtype)
        B = torch.randn(self.out_features, r, device=device, dtype=dtype)
        if init_lora_weights is not False:  # True or "gaussian": A zero, B normal (peft's embedding init)
            A.zero_()
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        self.set_adapter(self.active_adapters or adapter_name)

    def _embed_scale(self) -> Optional[torch.Tensor]:
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)):
            scale = torch.tensor(scale, device=self.base_layer.weight.device, dtype=self.base_layer.weight.dtype)
        return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None

    def _adapter_part(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """scaling * A^T[ids] B^T (times the base's embed_scale), in the adapter's dtype."""
        base = self.base_layer
        after_A = F.embedding(ids, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        part = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]
        scale = self._embed_scale()
        return part if scale is None else part * scale.to(part.dtype)

    def _adapted_forward(self, ids: torch.Tensor, names=None) -> torch.Tensor:
        result = self.base_layer(ids)
        out = result
        for name in self.active_adapters if names is None else names:
            out = out + self._adapter_part(name, ids)
        return out.to(result.dtype)

    def _per_row_forward(self, ids: torch.Tensor, adapter_names: list) -> torch.Tensor:
        """peft's mixed batch: each row of ids through its named adapter ("__base__": none)."""
        self._check_per_row(ids, adapter_names)
        result = self.base_layer(ids)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.lora_embedding_A:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=ids.device)
            part = self._adapter_part(name, ids.index_select(0, rows))
            result = result.index_add(0, rows, part.to(result.dtype))
        return result

    def delta_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """scaling * (B A)^T as (num_embeddings, dim), in ``dtype``."""
        A = self.lora_embedding_A[adapter_name].to(dtype)
        B = self.lora_embedding_B[adapter_name].to(dtype)
        return (B @ A).T * self.scaling[adapter_name]

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _merge_one(self, name: str, safe_merge: bool):
        w = self.base_layer.weight
        dt = self._merge_dtype(w)
        self._write_base((w.to(dt) + self.delta_weight(name, dt)).to(w.dtype), None, safe_merge, name)

    def _unmerge_one(self, name: str):
        w = self.base_layer.weight
        dt = self._merge_dtype(w)
        self._write_base((w.to(dt) - self.delta_weight(name, dt)).to(w.dtype), None, False, name)
