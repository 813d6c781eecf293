"""The adapter bank: every loaded adapter on the host, some of them in the device slots.

Three parts, each with one job:

- :func:`parse_adapter` turns a peft adapter (its config and tensors, as
  ``fusedpeft.io.peft_format._read_config`` / ``_read_weights`` read them) into a
  :class:`HostAdapter` for the wrapped layers: every check happens here, before anything changes.
  LoRA tensors are stored padded to max_rank (A: (R, K), B: (N, R), zeros past the rank), in the
  bank's dtype, in pinned memory when the bank is on a CUDA device, so that filling a slot is one
  plain copy per tensor.
- :class:`SlotTable`: which adapter holds which slot, in least-recently-used order. Pure host
  bookkeeping; :meth:`SlotTable.plan` says what a batch needs (slots to fill, adapters to evict)
  and raises before anything changes; :meth:`SlotTable.apply` carries a plan out.
- :class:`AdapterBank`: the host store (the source of truth: an adapter evicted from its slot is
  still there and comes back on demand), the slot table and the copies into the layers' buffers.

Copies. On the CPU a slot is filled with plain ``copy_``. On CUDA the copies run on a side stream,
non-blocking from pinned memory; the compute stream waits on an event the copies recorded (a
device-side wait: no host sync), and the copy into a slot first waits until the compute that last
read that slot is done (an event recorded when the batch that used it was replaced). A slot not
used by work still in flight is therefore refilled while that work runs: :meth:`AdapterBank.prefetch`
brings the next batch's adapters in ahead of time, overlapping the current batch's compute.
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Optional

import torch

from ..config import IA3Config, LoraConfig
from ..io import peft_format

BASE = "__base__"  # the name that means "no adapter" in adapter_names (as does None)


# ----------------------------------------------------------------------------- host adapters
@dataclasses.dataclass
class LoraEntry:
    A: torch.Tensor  # (R, K), rows past `rank` zero
    B: torch.Tensor  # (N, R), columns past `rank` zero
    rank: int
    scaling: float


@dataclasses.dataclass
class IA3Entry:
    scale: torch.Tensor  # (K,) with feedforward, else (N,)
    feedforward: bool


@dataclasses.dataclass
class HostAdapter:
    """One loaded adapter on the host: {wrapped module name: its entry}; modules it does not touch
    get an empty slot (LoRA rank 0, IA3 ones)."""

    kind: str  # "lora" or "ia3"
    entries: dict
    config: object
    source: str

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries.values()
                   for t in ((e.A, e.B) if isinstance(e, LoraEntry) else (e.scale,)))


_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_IA3_SUFFIX = ".ia3_l"
# Keys of peft features the bank does not serve, with the feature's name for the error.
_REFUSED_KEYS = (
    (".lora_B.bias", "lora_bias (a bias on lora_B)"),
    ("lora_magnitude_vector", "DoRA (use_dora=True)"),
    (".lora_embedding_A", "LoRA on an nn.Embedding"),
    (".lora_embedding_B", "LoRA on an nn.Embedding"),
)


def read_adapter(path: str):
    """(config, tensors) of a peft adapter directory, read by fusedpeft.io.peft_format (which
    refuses the peft features fusedpeft does not implement, naming them)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    config = peft_format._read_config(path, residual_base_ok=False)
    weights = peft_format._read_weights(path)
    return config, weights


def parse_adapter(config, weights: dict, layers: dict, kind: str, max_rank: Optional[int], dtype_of,
                  pin: bool, source: str, ia3_modes: dict) -> HostAdapter:
    """Check a peft adapter against the wrapped layers and build its host copy. Raises (ValueError,
    TypeError) naming the problem; changes nothing.

    layers: {module name: serving layer}. kind: the bank's method ("lora" or "ia3").
    dtype_of(name): the bank dtype of that layer. ia3_modes: {module name: feedforward} of the
    IA3 adapters already loaded (one layer takes one IA3 mode)."""
    peft_type = getattr(config, "peft_type", None)
    want = {"lora": "LORA", "ia3": "IA3"}[kind]
    if peft_type != want:
        raise ValueError(f"{source}: a {peft_type} adapter cannot join this bank, which serves {want} adapters "
                         f"(one MultiAdapterModel serves one method; choose it with method=)")
    _check_config(config, source)
    modules: dict[str, dict] = {}
    for key, tensor in weights.items():
        for part, feature in _REFUSED_KEYS:
            if part in key:
                raise ValueError(f"{source}: the adapter uses {feature} (key {key}), which the serving bank does not "
                                 "implement")
        if not key.startswith(peft_format.PREFIX):
            raise ValueError(f"{source}: unexpected key {key!r} (peft's keys start with {peft_format.PREFIX!r})")
        rest = key[len(peft_format.PREFIX):]
        if kind == "lora":
            found = [(rest[: -len(s)], part) for s, part in _LORA_SUFFIXES.items() if rest.endswith(s)]
        else:
            found = [(rest[: -len(_IA3_SUFFIX)], "l")] if rest.endswith(_IA3_SUFFIX) else []
        if not found:
            raise ValueError(f"{source}: unexpected key {key!r} for a {want} adapter (a base-model bias or another "
                             "tensor the serving bank does not hold)")
        module, part = found[0]
        if not torch.is_tensor(tensor) or not tensor.dtype.is_floating_point:
            raise ValueError(f"{source}: {key} is not a floating-point tensor")
        modules.setdefault(module, {})[part] = tensor
    if not modules:
        raise ValueError(f"{source}: the adapter holds no {want} tensors")
    not_wrapped = sorted(m for m in modules if m not in layers)
    if not_wrapped:
        raise ValueError(f"{source}: the adapter targets {not_wrapped}, which this MultiAdapterModel does not wrap "
                         f"(it wraps {peft_format.describe(layers, limit=4)}); wrap them with target_modules=")

    entries = {}
    for module in sorted(modules):
        parts, layer = modules[module], layers[module]
        K, N = layer.in_features, layer.out_features
        dtype = dtype_of(module)
        if kind == "lora":
            entries[module] = _lora_entry(config, module, parts, K, N, max_rank, dtype, pin, source)
        else:
            entries[module] = _ia3_entry(config, module, parts, K, N, dtype, pin, source, ia3_modes)
    return HostAdapter(kind=kind, entries=entries, config=config, source=source)


def _check_config(config, source: str) -> None:
    bad = []
    if isinstance(config, LoraConfig):
        if config.use_dora:
            bad.append("DoRA (use_dora=True)")
        if config.lora_bias:
            bad.append("lora_bias=True")
    if getattr(config, "bias", "none") != "none":
        bad.append(f"bias={config.bias!r} (the adapter trains base-model biases, which every sequence shares)")
    if config.modules_to_save:
        bad.append(f"modules_to_save={config.modules_to_save!r} (whole-module copies, which every sequence shares)")
    if bad:
        raise ValueError(f"{source}: the adapter uses {', '.join(bad)}, which the serving bank does not implement")


def _pinned(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.pin_memory() if pin else t


def _lora_entry(config: LoraConfig, module, parts, K, N, max_rank, dtype, pin, source) -> LoraEntry:
    if set(parts) != {"A", "B"}:
        missing = "lora_B" if "A" in parts else "lora_A"
        raise ValueError(f"{source}: {module} has no {missing}.weight")
    A, B = parts["A"], parts["B"]
    r_config, alpha = config.rank_and_alpha(module)
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != K or B.shape[0] != N or B.shape[1] != A.shape[0]:
        raise ValueError(f"{source}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which do not fit "
                         f"the layer (in_features={K}, out_features={N}): expected (r, {K}) and ({N}, r)")
    r = A.shape[0]
    if r != r_config:
        raise ValueError(f"{source}: {module} has rank {r} in its tensors but {r_config} in its config (r / rank_pattern)")
    if r > max_rank:
        raise ValueError(f"{source}: {module} has rank {r}, above this bank's max_rank={max_rank}")
    A_pad = torch.zeros(max_rank, K, dtype=dtype)
    B_pad = torch.zeros(N, max_rank, dtype=dtype)
    A_pad[:r] = A
    B_pad[:, :r] = B
    return LoraEntry(A=_pinned(A_pad, pin), B=_pinned(B_pad, pin), rank=r, scaling=float(config.scaling(r, alpha)))


def _ia3_entry(config: IA3Config, module, parts, K, N, dtype, pin, source, ia3_modes) -> IA3Entry:
    l = parts["l"]
    ff = bool(config.is_feedforward(module))
    want = (1, K) if ff else (N, 1)
    if tuple(l.shape) != want:
        raise ValueError(f"{source}: {module}.ia3_l has shape {tuple(l.shape)} but the layer (in_features={K}, "
                         f"out_features={N}, {'feed-forward' if ff else 'output'} scaling) needs {want}")
    if module in ia3_modes and ia3_modes[module] != ff:
        have = "input (feed-forward)" if ia3_modes[module] else "output"
        raise ValueError(f"{source}: {module} is {'a feed-forward' if ff else 'an output-scaling'} module for this "
                         f"adapter but the adapters already loaded scale its {have}; one layer takes one IA3 mode")
    return IA3Entry(scale=_pinned(l.reshape(-1).to(dtype), pin), feedforward=ff)


# ----------------------------------------------------------------------------- slot table
@dataclasses.dataclass
class Plan:
    """What a batch needs: (adapter, slot, adapter evicted from that slot or None) per copy, and the
    batch's distinct adapters in order (they become the most recently used)."""

    fills: list
    names: list


class SlotTable:
    """name -> slot, least recently used first. ``free`` holds the empty slots, lowest first."""

    def __init__(self, slots: int):
        self.size = int(slots)
        self.resident: "OrderedDict[str, int]" = OrderedDict()
        self.free: list[int] = list(range(slots))

    def slot_of(self, name: str) -> Optional[int]:
        return self.resident.get(name)

    def plan(self, names: list[str], protect=()) -> Plan:
        """Slots for the distinct adapters ``names`` (all known to the caller): the resident ones
        stay; the others take a free slot, else evict the least recently used adapter that is in
        neither ``names`` nor ``protect``. Raises ValueError, changing nothing, when the batch has
        more distinct adapters than there are slots."""
        names = list(dict.fromkeys(names))
        if len(names) > self.size:
            raise ValueError(f"the batch uses {len(names)} distinct adapters but the bank has {self.size} slots "
                             f"(max_adapters); split the batch")
        keep = set(names) | set(protect)
        free = list(self.free)
        victims = [n for n in self.resident if n not in keep]
        fills = []
        for name in names:
            if name in self.resident:
                continue
            if free:
                fills.append((name, free.pop(0), None))
            elif victims:
                victim = victims.pop(0)
                fills.append((name, self.resident[victim], victim))
            else:  # only with protect: no slot that may be taken
                raise ValueError(f"no slot for {name!r}: every slot holds an adapter of the batch or one in use")
        return Plan(fills=fills, names=names)

    def apply(self, plan: Plan) -> None:
        for name, slot, victim in plan.fills:
            if victim is not None:
                del self.resident[victim]
            else:
                self.free.remove(slot)
            self.resident[name] = slot
        for name in plan.names:
            self.resident.move_to_end(name)

    def remove(self, name: str) -> Optional[int]:
        slot = self.resident.pop(name, None)
        if slot is not None:
            self.free.append(slot)
            self.free.sort()
        return slot


# ----------------------------------------------------------------------------- the bank
class AdapterBank:
    """The host store, the slot table and the copies into the serving layers' buffers (see the
    module docstring). ``layers``: {module name: serving layer}, all with the same slot count."""

    def __init__(self, layers: dict, slots: int, kind: str, max_rank: Optional[int]):
        self.layers = layers
        self.kind = kind
        self.max_rank = max_rank
        self.table = SlotTable(slots)
        self.store: "OrderedDict[str, HostAdapter]" = OrderedDict()
        self.devices = sorted({next(iter(l.bank_tensors().values())).device for l in layers.values()}, key=str)
        self.cuda = any(d.type == "cuda" for d in self.devices)
        self._copy_streams = {d: torch.cuda.Stream(device=d) for d in self.devices if d.type == "cuda"}
        self._ready: dict[int, dict] = {}  # slot -> {device: event} of copies into it not yet waited for
        self._last_use: dict[int, dict] = {}  # slot -> {device: event} after the compute that last read it
        self.copies = 0  # adapters copied into a slot, ever
        self.evictions = 0  # of those, copies that evicted another adapter

    # --- reading adapters
    def ia3_modes(self) -> dict:
        """{module: feedforward} over the loaded IA3 adapters (they agree: parse checks it)."""
        modes = {}
        for adapter in self.store.values():
            if adapter.kind == "ia3":
                modes.update({m: e.feedforward for m, e in adapter.entries.items()})
        return modes

    def parse(self, config, weights, source: str) -> HostAdapter:
        return parse_adapter(config, weights, self.layers, self.kind, self.max_rank,
                             lambda m: next(iter(self.layers[m].bank_tensors().values())).dtype,
                             pin=self.cuda and torch.cuda.is_available(), source=source, ia3_modes=self.ia3_modes())

    # --- store
    def add(self, name: str, adapter: HostAdapter) -> None:
        """Keep ``adapter`` on the host; copy it into a free slot if there is one (no eviction)."""
        self.store[name] = adapter
        if self.kind == "ia3":
            self._set_ia3_modes()
        if self.table.free:
            plan = Plan(fills=[(name, self.table.free[0], None)], names=[name])
            self.table.apply(plan)
            self._copy_in(plan)

    def remove(self, name: str) -> None:
        """Drop ``name`` from the store, and clear its slot if it has one (the caller retired the
        current batch first, so the clearing waits for the compute that reads the slot)."""
        del self.store[name]
        slot = self.table.remove(name)
        if slot is not None:
            self._write(slot, None)
        if self.kind == "ia3":
            self._set_ia3_modes()

    def _set_ia3_modes(self) -> None:
        modes = self.ia3_modes()
        for module, layer in self.layers.items():
            layer.feedforward = modes.get(module)

    # --- slots
    def plan(self, names: list[str], protect=()) -> Plan:
        return self.table.plan(names, protect)

    def apply(self, plan: Plan) -> None:
        """Carry out a plan: evict, copy in, update the LRU order. The caller retired the slots of
        the batch being replaced first (:meth:`retire`)."""
        self.table.apply(plan)
        self._copy_in(plan)

    def _copy_in(self, plan: Plan) -> None:
        for name, slot, victim in plan.fills:
            self._write(slot, self.store[name])
            self.copies += 1
            self.evictions += victim is not None

    def _write(self, slot: int, adapter: Optional[HostAdapter]) -> None:
        """Fill (or clear, adapter None) one slot in every layer."""
        entries = adapter.entries if adapter is not None else {}
        if not self._copy_streams:
            for module, layer in self.layers.items():
                layer.write_slot(slot, entries.get(module), non_blocking=False)
            return
        last_use, earlier = self._last_use.pop(slot, {}), self._ready.pop(slot, {})
        ready = {}
        for device, stream in self._copy_streams.items():
            for event in (last_use.get(device), earlier.get(device)):  # its last readers, an earlier copy into it
                if event is not None:
                    stream.wait_event(event)
            with torch.cuda.stream(stream):
                for module, layer in self.layers.items():
                    if next(iter(layer.bank_tensors().values())).device == device:
                        layer.write_slot(slot, entries.get(module), non_blocking=True)
            ready[device] = torch.cuda.Event()
            ready[device].record(stream)
        self._ready[slot] = ready

    def wait_ready(self, slots) -> None:
        """Make the compute stream wait (on the device, no host sync) for copies into ``slots``."""
        for slot in slots:
            for device, event in self._ready.pop(slot, {}).items():
                torch.cuda.current_stream(device).wait_event(event)

    def retire(self, slots) -> None:
        """The batch that read ``slots`` is being replaced: remember where its compute ends, so a
        later copy into one of them waits for that point and no longer."""
        for slot in slots if self._copy_streams else ():
            events = {}
            for device in self._copy_streams:
                events[device] = torch.cuda.Event()
                events[device].record(torch.cuda.current_stream(device))
            self._last_use[slot] = events

    def buffers(self) -> dict[str, torch.Tensor]:
        """{'<module>.<tensor>': bank tensor} of every layer."""
        return {f"{m}.{k}": t for m, l in self.layers.items() for k, t in l.bank_tensors().items()}
