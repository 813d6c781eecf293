"""``MultiAdapterModel``: one base model, many adapters, one adapter per sequence of a batch.

    served = MultiAdapterModel(model, target_modules="all-linear", max_adapters=8, max_rank=16)
    served.load_adapter("fr", "adapters/fr")          # peft's directory format
    served.load_adapter("de", "adapters/de")
    out = served.generate(input_ids=ids, adapter_names=["fr", None, "de"], max_new_tokens=20)

Wrapping. Every module the target spec names (module-name suffixes, a regex or "all-linear", as
``fusedpeft.LoraConfig`` takes them, matched by ``fusedpeft.inject.find_targets``; None: the
architecture's default targets, as peft's) must be an ``nn.Linear`` or a transformers ``Conv1D``;
it is replaced in place by a serving layer (``fusedpeft.serving.layers``) holding the original as
``.base_layer`` and ``max_adapters`` slots of rank ``max_rank``, allocated now and never again
(a call with more sequences than ``max_batch_size`` regrows the small per-sequence index once).
The model is put in eval mode. ``unwrap()`` puts the original modules back.

Method. One MultiAdapterModel serves one method, ``method="lora"`` (the default) or ``"ia3"``; an
adapter file of the other method is refused. LoRA adapters may have any rank up to max_rank
(per module, rank_pattern / alpha_pattern and use_rslora honoured: slot scaling lora_alpha / r, or
/ sqrt(r)); IA3 adapters scale outputs, or inputs on their feedforward_modules (one mode per layer:
adapters that disagree on a layer are refused). An adapter may target any subset of the wrapped
modules; one that targets a module not wrapped is refused, naming it. Refused too: DoRA,
lora_bias, bias != "none", modules_to_save, LoRA on embeddings, pissa / olora inits.

Adapters and slots. ``load_adapter`` keeps the adapter on the host (the source of truth; pinned
memory on CUDA) and copies it into a free slot if there is one. Any number can be loaded. A call
resolves its names to slots once, on the host: resident adapters stay; the others are copied into
free slots or into the slots of the least recently used adapters the call does not use, which
go back to waiting on the host (see ``fusedpeft.serving.bank`` for the streams and events).
``unload_adapter`` forgets one. ``prefetch(names)`` copies adapters in ahead of the call that needs
them.

Calls. ``model(input_ids=..., adapter_names=[...], **kwargs)`` and ``generate(input_ids=...,
adapter_names=[...], **generate_kwargs)`` take one name per sequence (None or "__base__": the
base model); without adapter_names every row is the base. The slots are written into a fixed
device buffer once per call; transformers' decode loop then runs the model's own forward and KV
cache step after step with nothing per step on the host. Rows that beam search or
num_return_sequences repeat follow their sequence (see ``fusedpeft.serving.layers``). The calls
run under ``torch.no_grad()``. ``activate(adapter_names)`` sets the batch for direct calls of
``served.model`` (a captured CUDA graph, say) and ``deactivate()`` clears it.

Errors. Every refusal (an unknown name, a name loaded twice, a rank above max_rank, tensors that do
not fit a layer, an unwrapped target, an unsupported feature, more distinct adapters in one call
than slots, an adapter_names list of the wrong length) is raised before anything changes: the
slot table, the LRU order, the host store and every bank buffer stay as they were.

CUDA graphs. With ``cuda_graphs=True`` the layers take no host-side shortcut (see
``fusedpeft.serving.layers``), so a step captured with one batch replays correctly for any other
batch of the same size after ``activate``: capture ``served.model(...)`` after ``activate(...)``
(warm the backends up first, as for any capture), then per batch ``activate(names)`` and
``graph.replay()``. The index buffer and the slots never move, and no per-step work reads a
device value on the host. (An IA3 layer that no loaded adapter touched at capture time stays
base in that graph: recapture after loading adapters that touch new layers.) The same setting
suits ``torch.compile``: the layers then read no host state that loading, evicting or a new batch
of the same size changes, so none of them makes the model recompile, and the serving ops enter the
graph as custom ops (``fusedpeft::multi_lora_linear``, ``fusedpeft::multi_ia3_linear``), one node
each, whatever backend runs them: a whole decode step compiles as one graph. transformers' generate
compiles its decode steps that way on CUDA when given a static cache
(``generate(..., cache_implementation="static")``, mode "reduce-overhead": CUDA graphs). With
``cuda_graphs=True`` the serving ops' tuner also times each candidate as a graph replay (GPU time
alone), where eagerly it would charge each its launches' host time too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..config import IA3Config, LoraConfig
from ..inject import _is_linear, _parent, find_targets
from ..modules import AdapterLayer
from ..target_defaults import with_default_targets
from .bank import BASE, AdapterBank, read_adapter
from .layers import BatchIndex, MultiIA3Linear, MultiLoraLinear, _ServingLayer

METHODS = ("lora", "ia3")


class MultiAdapterModel(nn.Module):
    """Serve many adapters of one method on one base model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        target_modules: Union[str, Sequence[str], None] = None,
        max_adapters: int = 8,
        max_rank: int = 16,
        method: str = "lora",
        exclude_modules: Union[str, Sequence[str], None] = None,
        max_batch_size: int = 64,
        cuda_graphs: bool = False,
    ):
        super().__init__()
        method = method.lower() if isinstance(method, str) else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for arg, value in (("max_adapters", max_adapters), ("max_batch_size", max_batch_size)) + (
                (("max_rank", max_rank),) if method == "lora" else ()):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        held = [n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, _ServingLayer))]
        if held or hasattr(model, "peft_config"):
            raise ValueError(
                f"{type(model).__name__} already holds adapter layers ({held[:3] or 'a peft model'}): wrap the plain "
                "base model (merge and unload or eject the adapters first, or unwrap the other MultiAdapterModel)")
        config_class = LoraConfig if method == "lora" else IA3Config
        spec = with_default_targets(config_class(target_modules=target_modules, exclude_modules=exclude_modules), model)
        names = find_targets(model, spec)
        not_linear = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names
                      if not _is_linear(model.get_submodule(n))]
        if not_linear:
            raise TypeError(f"the serving bank wraps linear layers (nn.Linear, transformers Conv1D) only; these targets "
                            f"are not: {not_linear}")
        devices = sorted({model.get_submodule(n).weight.device for n in names}, key=str)

        batch = BatchIndex(devices, max_batch_size, graph_safe=cuda_graphs)
        layers: "OrderedDict[str, _ServingLayer]" = OrderedDict()
        for name in names:  # every bank buffer allocated (out of memory here changes nothing) ...
            base = model.get_submodule(name)
            layers[name] = (MultiLoraLinear(base, batch, max_adapters, max_rank) if method == "lora"
                            else MultiIA3Linear(base, batch, max_adapters))
        for name, layer in layers.items():  # ... before the first layer is swapped in
            parent, child = _parent(model, name)
            setattr(parent, child, layer)
            if method == "lora":  # best effort, one layer at a time: one weight's copy in flight
                layer.stack_bank_under_weight()
        object.__setattr__(self, "_was_training", model.training)
        model.eval()
        self.model = model
        self.method = method
        self.max_adapters = max_adapters
        self.max_rank = max_rank if method == "lora" else None
        self.target_modules = spec.target_modules
        object.__setattr__(self, "_batch", batch)
        object.__setattr__(self, "bank", AdapterBank(layers, max_adapters, method, self.max_rank))
        object.__setattr__(self, "_names", [])  # the current batch's names (None: base), one per sequence
        self.eval()

    # ------------------------------------------------------------------ attribute pass-through
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_modules") or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"], name)

    # ------------------------------------------------------------------ what is loaded
    @property
    def layers(self) -> "OrderedDict[str, _ServingLayer]":
        """{module name: serving layer}."""
        return self.bank.layers

    @property
    def adapters(self) -> list[str]:
        """Every loaded adapter, in load order."""
        return list(self.bank.store)

    @property
    def resident(self) -> "OrderedDict[str, int]":
        """{adapter: slot} of the adapters in device slots, least recently used first."""
        return OrderedDict(self.bank.table.resident)

    # ------------------------------------------------------------------ loading
    def load_adapter(self, name: str, path: str) -> None:
        """Load the peft adapter directory ``path`` (``adapter_config.json`` and
        ``adapter_model.safetensors`` or ``.bin``) as ``name``; into a free slot if there is one."""
        self._check_open()
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"an adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if name in self.bank.store:
            raise ValueError(f"an adapter named {name!r} is loaded already; unload it first or pick another name")
        config, weights = read_adapter(path)
        adapter = self.bank.parse(config, weights, source=str(path))
        self.bank.add(name, adapter)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (its slot, if it had one, is cleared and free)."""
        self._check_open()
        if name not in self.bank.store:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")
        if name in self._names:  # the current batch reads its slot
            self.bank.retire(self._batch.slots)
            self._batch.stale = (f"adapter {name!r} of the current batch was unloaded: pass adapter_names again "
                                 "(or call activate)")
        self.bank.remove(name)

    def prefetch(self, adapter_names: Sequence[Optional[str]]) -> None:
        """Copy these adapters into slots now (on CUDA: on the side stream, overlapping work in
        flight), evicting least recently used adapters that are neither in ``adapter_names`` nor in
        the current batch. Raises, changing nothing, where that is not possible."""
        self._check_open()
        distinct = self._check_names(adapter_names)
        protect = [n for n in self._names if n is not None]
        plan = self.bank.plan(distinct, protect=protect)
        self.bank.apply(plan)

    # ------------------------------------------------------------------ the batch
    def _check_names(self, adapter_names, batch_size: Optional[int] = None) -> list[str]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list with one name (or None) per sequence, got {adapter_names!r}")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch has {batch_size} sequences")
        bad = [n for n in adapter_names if n is not None and not isinstance(n, str)]
        if bad:
            raise TypeError(f"adapter_names entries must be adapter names or None, got {bad[:3]}")
        names = [n for n in adapter_names if n is not None and n != BASE]
        unknown = sorted(set(n for n in names if n not in self.bank.store))
        if unknown:
            raise KeyError(f"unknown adapter name(s) {unknown}; loaded: {self.adapters} (None or {BASE!r} for the base)")
        return list(dict.fromkeys(names))

    def activate(self, adapter_names: Sequence[Optional[str]], batch_size: Optional[int] = None) -> list[int]:
        """Make ``adapter_names`` (one per sequence) the current batch: copy in what is not
        resident, write the per-sequence slots into the device index. Returns the slots (-1: base).
        Direct calls of ``self.model`` then serve this batch until the next call changes it."""
        self._check_open()
        distinct = self._check_names(adapter_names, batch_size)
        plan = self.bank.plan(distinct)
        # All checks passed: change the bank.
        self.bank.retire(self._batch.slots)
        self.bank.apply(plan)
        names = [None if n is None or n == BASE else n for n in adapter_names]
        slots = [-1 if n is None else self.bank.table.resident[n] for n in names]
        self.bank.wait_ready({s for s in slots if s >= 0})
        if all(s < 0 for s in slots) and not self._batch.graph_safe:
            self._batch.clear()
        else:
            self._batch.set(slots)
        object.__setattr__(self, "_names", names)
        return slots

    def deactivate(self) -> None:
        """No current batch: every row runs the base model."""
        self.bank.retire(self._batch.slots)
        self._batch.clear()
        object.__setattr__(self, "_names", [])

    @staticmethod
    def _batch_size(args, kwargs) -> Optional[int]:
        """The number of sequences of a call: the first dimension of input_ids, inputs_embeds or the
        first positional tensor (when it has at least two dimensions)."""
        for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
            if torch.is_tensor(value):
                return value.shape[0] if value.dim() >= 2 else None
        return None

    def _prepare(self, args, kwargs, adapter_names) -> None:
        if adapter_names is None:
            self._check_open()
            self.deactivate()
        else:
            self.activate(adapter_names, batch_size=self._batch_size(args, kwargs))

    # ------------------------------------------------------------------ calls
    def forward(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """The wrapped model's forward with one adapter per sequence (under torch.no_grad())."""
        with torch.no_grad():
            self._prepare(args, kwargs, adapter_names)
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **generate_kwargs):
        """The wrapped model's ``generate`` with one adapter per sequence, fixed for the whole
        generation (prefill and every decode step)."""
        with torch.no_grad():
            self._prepare(args, generate_kwargs, adapter_names)
            return self.model.generate(*args, **generate_kwargs)

    # ------------------------------------------------------------------ undo
    def unwrap(self) -> nn.Module:
        """Put the original linear modules back and return the model; this wrapper is then closed."""
        self._check_open()
        for name, layer in self.bank.layers.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, layer.base_layer)
            if isinstance(layer, MultiLoraLinear):
                layer.unstack_weight()
        self.model.train(self._was_training)
        object.__setattr__(self, "_closed", True)
        return self.model

    def _check_open(self) -> None:
        if self.__dict__.get("_closed"):
            raise RuntimeError("this MultiAdapterModel was unwrapped")
