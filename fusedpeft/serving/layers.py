"""The serving layers: one per targeted linear layer, holding that layer's share of the adapter bank.

Each layer replaces an ``nn.Linear`` (or a transformers ``Conv1D``, whose weight is stored as
(in, out): the op gets a transposed view, no copy) and keeps the original as ``.base_layer``. Its
slots are **buffers** allocated once, when the model is wrapped, in the base weight's dtype and on
its device (they are not parameters: serving is inference):

    MultiLoraLinear   lora_A (S, R, K), lora_B (S, N, R), scalings (S,) float32, ranks (S,) int32
    MultiIA3Linear    ia3_out (S, N) (output scaling), ia3_in (S, K) (feed-forward input scaling)

Once the model is wrapped, each LoRA layer moves its base weight and its A slots into one buffer,
A's rows right after W's (``stack_bank_under_weight``): one GEMM then gives x W^T and x A[s]^T for
every slot, the op's ``stacked`` backend, which the tuner measures beside the others.

S = max_adapters and R = max_rank. Slot s holds the same adapter in every layer (the slot table is
the model's: ``fusedpeft.serving.bank``); a layer the adapter does not touch holds rank 0 and zeros
in that slot (IA3: ones). Rows of A and columns of B past an adapter's rank are zero, so nothing
from an earlier occupant of the slot is ever read.

Which slot a row uses. The wrapper keeps one :class:`BatchIndex` shared by all layers: a fixed
int32 buffer per device with one slot per *sequence* (-1 for the base model), and the number of
sequences n (a host int). A layer sees x of shape (..., K) with M = x.numel() / K rows; the rows of
a batch-first model are sequence-major, so row m belongs to sequence m // (M / n). The layer passes
``index[:n]`` (decode: one row per sequence; a view, no kernel) or ``index[:n]`` repeated M / n
times each (prefill, beam or num_return_sequences copies: transformers lays those out as
contiguous repeats of their sequence) to :func:`fusedpeft.ops.multi_lora_linear`; the LoRA layer
passes a prefill's x (sequences, tokens, K) with one entry per sequence (repeated only for beam or
return copies), which the op's grouped backends take as it is. Nothing in that
path reads a device value on the host, so a step can be captured in a CUDA graph: replaying it
reads whatever slots the buffer holds at replay time.

Shortcuts (eager only). With no batch set (n = 0: a call without adapter_names) the layer runs its
base layer alone; and a layer that holds none of the batch's adapters does too. Both choices are
made on the host from the slots of the batch, so a CUDA graph captured through them would keep
them for later batches: a model wrapped with ``cuda_graphs=True`` never takes them (every layer
runs the op, with -1 for base rows), and its layers ask the op's tuner to time their candidates as
graph replays (``graphed=True``): in a graph only the kernels' GPU time counts, not their launches.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..modules.base import is_conv1d, linear_shape
from ..ops.multi_lora import (multi_ia3_linear, multi_lora_linear, run_multi_ia3, run_multi_lora, stack_bank,
                              stacked_weight)


class BatchIndex:
    """The per-sequence slot index every serving layer reads (one object per wrapped model).

    ``buffers``: {device: int32 tensor (capacity,)}, allocated when the model is wrapped and
    regrown only when a call brings more sequences than ``capacity`` (never within a generate call,
    never per step). ``n``: how many sequences the current batch has (0: none set, every layer
    runs its base). ``slots``: the set of slots the batch uses (host side, for the eager
    shortcuts). ``stale``: why the batch may no longer be used (an adapter of it was unloaded)."""

    def __init__(self, devices, capacity: int, graph_safe: bool):
        self.capacity = max(int(capacity), 1)
        self.buffers = {d: torch.full((self.capacity,), -1, dtype=torch.int32, device=d) for d in devices}
        self.n = 0
        self.slots: frozenset = frozenset()
        self.graph_safe = bool(graph_safe)
        self.stale: Optional[str] = None
        # {(device, M): index (M,)}: a prefill's rows index is expanded once per batch and shape,
        # not once per layer (each expansion is a copy kernel).
        self._expanded: dict = {}
        # {device: buffer[:n]}: the view every layer of a decode step passes, made once per batch
        # (a slice is a tensor made on the host, and a step reads it once per layer).
        self._current: dict = {}

    def set(self, slots: list[int]) -> None:
        """Write one slot per sequence (-1: base) into the fixed buffers, without a host sync."""
        n = len(slots)
        if n > self.capacity:  # a larger batch than ever before: the only time the buffers move
            self.capacity = max(n, 2 * self.capacity)
            self.buffers = {d: torch.full((self.capacity,), -1, dtype=torch.int32, device=d) for d in self.buffers}
        host = torch.tensor(slots, dtype=torch.int32)
        for d, buf in self.buffers.items():
            if buf.is_cuda:
                buf[:n].copy_(host.pin_memory(), non_blocking=True)
            else:
                buf[:n].copy_(host)
        self.n = n
        self.slots = frozenset(s for s in slots if s >= 0)
        self.stale = None
        self._expanded.clear()
        self._current = {d: buf[:n] for d, buf in self.buffers.items()}

    def clear(self) -> None:
        """No batch: every layer runs its base layer (the buffers keep their contents)."""
        self.n = 0
        self.slots = frozenset()
        self.stale = None
        self._expanded.clear()
        self._current = {}

    def rows(self, x: torch.Tensor, device: torch.device, per_leading: bool = False) -> torch.Tensor:
        """One slot per row of x flattened to (M, K), from the per-sequence buffer; with
        ``per_leading``, one per entry of x's first dimension where x has three or more dimensions
        and that dimension holds whole sequences (the op's per-sequence index: each entry covers
        x.shape[1:-1] rows)."""
        n = self.n
        M = x.shape[:-1].numel()
        if M % n:
            raise ValueError(
                f"a serving layer got {M} rows (input of shape {tuple(x.shape)}) for a batch of {n} sequences: the "
                f"rows must be the sequences' rows in order (a batch-first model), {n} times a whole number")
        index = self._current.get(device)
        if index is None:
            raise RuntimeError(f"the batch index lives on {sorted(map(str, self.buffers))} but this layer runs on "
                               f"{device}: wrap the model on the device(s) it runs on (moving it afterwards does not "
                               "move the serving bank's index)")
        if per_leading and x.dim() >= 3 and x.shape[0] % n == 0:
            M = x.shape[0]  # entries of the first dimension: a sequence, or its beam / return copies
        if M == n:
            return index
        if index.is_cuda and torch.cuda.is_current_stream_capturing():
            # A graph must read the buffer on each replay, never a copy made before it.
            return index.unsqueeze(1).expand(n, M // n).reshape(M)
        rows = self._expanded.get((device, M))
        if rows is None:
            rows = self._expanded[(device, M)] = index.unsqueeze(1).expand(n, M // n).reshape(M)
        return rows


class _ServingLayer(nn.Module):
    """What both serving layers share: the wrapped base layer, the (out, in) view of its weight, the
    batch index and the host-side set of slots that hold an adapter touching this layer."""

    def __init__(self, base_layer: nn.Module, batch: BatchIndex):
        super().__init__()
        self.in_features, self.out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        object.__setattr__(self, "_batch", batch)  # shared, not a submodule
        self.filled: set[int] = set()  # slots whose adapter touches this layer (host side)

    # The hot path (a decode step calls every serving layer once) reads submodules and buffers from
    # the module's dicts: nn.Module.__getattr__ costs about half a microsecond a lookup, and a
    # layer's call made a dozen.
    def base_weight(self) -> torch.Tensor:
        w = self._modules["base_layer"].weight
        return w.T if self.fan_in_fan_out else w

    def _index(self, x: torch.Tensor, device: torch.device, per_leading: bool = False) -> Optional[torch.Tensor]:
        """The row index on ``device`` (the weight's; see BatchIndex.rows), or None where the base
        layer alone gives the answer (eager shortcuts)."""
        batch = self._batch
        if batch.stale is not None:
            raise RuntimeError(batch.stale)
        if batch.n == 0:
            return None
        if not batch.graph_safe and not (batch.slots & self.filled):
            return None
        return batch.rows(x, device, per_leading)

    def _takes_unchecked(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Whether x may skip the op's checks: the bank was checked when it was made, the index is
        the batch's own, so x is all that is left (no autograd, the layer's width, the dtype and
        device of w, the base weight). Anything else goes through the checked op, which names what is wrong."""
        return (x.shape[-1] == self.in_features and x.dtype == w.dtype and x.device == w.device
                and not torch.is_grad_enabled())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.slots}"


class MultiLoraLinear(_ServingLayer):
    """A linear layer with a LoRA bank: row m gets ``scalings[i] * (x A[i]^T) B[i]^T`` added,
    i its sequence's slot (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, batch: BatchIndex, slots: int, max_rank: int):
        super().__init__(base_layer, batch)
        w = base_layer.weight
        self.slots, self.max_rank = int(slots), int(max_rank)
        K, N, d = self.in_features, self.out_features, w.device
        # Not persistent: runtime state of the server, never part of the model's state_dict.
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, K, dtype=w.dtype, device=d), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, N, max_rank, dtype=w.dtype, device=d), persistent=False)
        self.register_buffer("scalings", torch.zeros(slots, dtype=torch.float32, device=d), persistent=False)
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.int32, device=d), persistent=False)

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "scalings": self.scalings, "ranks": self.ranks}

    def stack_bank_under_weight(self) -> bool:
        """Move the base weight (N, K) and the A slots (S, R, K) into one (N + S R, K) buffer, A's
        rows right after W's, so that one GEMM gives x W^T and every slot's x A^T (the op's
        ``stacked`` backend: the decode's shrink inside the base GEMM). The weight stays the same
        Parameter with the same values (its ``.data`` a view of the buffer), the slots keep theirs.
        Best effort: a weight that is not a plain contiguous (out, in) tensor, or a buffer that does
        not fit in memory, leaves both as they are (False); the op runs either layout."""
        w = self._modules["base_layer"].weight
        if (self.fan_in_fan_out or type(w.data) is not torch.Tensor or w.dim() != 2 or not w.is_contiguous()
                or not w.dtype.is_floating_point or stacked_weight(w, self.lora_A) is not None):
            return False
        try:
            w.data, self._buffers["lora_A"] = stack_bank(w.data, self.lora_A)
        except (torch.OutOfMemoryError, RuntimeError):  # a CPU allocator's failure is a RuntimeError
            return False
        return True

    def unstack_weight(self) -> None:
        """Give the base weight its own storage again (unwrap: the model keeps no bank rows beside
        its weight). Where that copy does not fit in memory the weight stays a view of the buffer:
        the same values, the bank's rows beside it until the layer is dropped."""
        w = self._modules["base_layer"].weight
        if stacked_weight(w, self.lora_A) is None:
            return
        try:
            w.data = w.data.clone()
        except (torch.OutOfMemoryError, RuntimeError):
            return

    def write_slot(self, slot: int, entry, non_blocking: bool) -> None:
        """Fill one slot from a host entry (A (R, K) and B (N, R) already padded with zeros past the
        rank) or clear it (entry None: rank 0, zeros). Copies into the existing buffers."""
        if entry is None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.ranks[slot].fill_(0)
            self.scalings[slot].fill_(0.0)
            self.filled.discard(slot)
            return
        self.lora_A[slot].copy_(entry.A, non_blocking=non_blocking)
        self.lora_B[slot].copy_(entry.B, non_blocking=non_blocking)
        self.ranks[slot].fill_(entry.rank)
        self.scalings[slot].fill_(entry.scaling)
        self.filled.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One slot per sequence where x holds whole sequences (a prefill): the op's grouped
        # backends take the sequences' rows as groups, the others get the index expanded per row.
        base, w = self._modules["base_layer"], self.base_weight()
        index = self._index(x, w.device, per_leading=True)
        if index is None:
            return base(x)
        run = run_multi_lora if self._takes_unchecked(x, w) else multi_lora_linear
        bank = self._buffers
        return run(x, w, base.bias, bank["lora_A"], bank["lora_B"], bank["scalings"], bank["ranks"], index,
                   graphed=self._batch.graph_safe)


class MultiIA3Linear(_ServingLayer):
    """A linear layer with an IA3 bank. Both scalings are allocated (they are vectors); which one
    the layer applies (``feedforward``: input scaling, else output scaling) follows the loaded
    adapters that touch it (all must agree; None while none does). Slots of adapters that do not
    touch the layer hold ones."""

    def __init__(self, base_layer: nn.Module, batch: BatchIndex, slots: int):
        super().__init__(base_layer, batch)
        w = base_layer.weight
        self.slots = int(slots)
        d = w.device
        self.register_buffer("ia3_out", torch.ones(slots, self.out_features, dtype=w.dtype, device=d), persistent=False)
        self.register_buffer("ia3_in", torch.ones(slots, self.in_features, dtype=w.dtype, device=d), persistent=False)
        self.feedforward: Optional[bool] = None

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_out": self.ia3_out, "ia3_in": self.ia3_in}

    def write_slot(self, slot: int, entry, non_blocking: bool) -> None:
        if entry is None:
            self.ia3_out[slot].fill_(1.0)
            self.ia3_in[slot].fill_(1.0)
            self.filled.discard(slot)
            return
        dst, other = (self.ia3_in, self.ia3_out) if entry.feedforward else (self.ia3_out, self.ia3_in)
        dst[slot].copy_(entry.scale, non_blocking=non_blocking)
        other[slot].fill_(1.0)
        self.filled.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward is None:
            if self._batch.stale is not None:
                raise RuntimeError(self._batch.stale)
            return self.base_layer(x)
        base, w = self._modules["base_layer"], self.base_weight()
        index = self._index(x, w.device)
        if index is None:
            return base(x)
        scales = self._buffers["ia3_in" if self.feedforward else "ia3_out"]
        run = run_multi_ia3 if self._takes_unchecked(x, w) else multi_ia3_linear
        return run(x, w, base.bias, scales, index, self.feedforward, graphed=self._batch.graph_safe)
