"""Many adapters in one batch, each row its own (inference: serving several fine-tunes of one base).

    LoRA   y[m] = x[m] W^T + b + s[i] (x[m] A[i]^T) B[i]^T          i = adapter_index[m]
    IA3    y[m] = (x[m] W^T + b) * l[i]            (output scaling, l: N entries per slot)
           y[m] = (x[m] * l[i]) W^T + b            (input scaling, l: K entries per slot)

with i = -1 meaning the base alone for that row. ``adapter_index`` has one entry per row of x
flattened to (M, K), or, for x of three or more dimensions, one per entry of its first dimension (a
sequence: every row of x[j] takes adapter_index[j]), as a server batches sequences. The adapters
live in a bank of fixed slots (``fusedpeft.serving`` keeps it): for LoRA, ``lora_A`` (S, R, K), ``lora_B`` (S, N, R),
``scalings`` (S,) and ``ranks`` (S,): slot s holds an adapter of rank ranks[s] <= R, its A rows and
B columns past that rank are zero and the kernels do not read them (a rank-8 adapter costs rank-8
work beside rank-64 ones). For IA3, ``scales`` (S, N) or (S, K).

The torch backend is the reference (any device, float64 included): a loop over the slots present
in the batch. Faster backends (``fusedpeft/backends/``) implement ``lora(x, weight, bias, ...,
adapter_index)`` on 2-D x with one index per row, or ``lora_grouped(..., group_index,
rows_per_group)`` on groups of consecutive rows (a sequence's), chosen per shape key by measurement;
the op expands a per-sequence index for those that take one per row. The ops take no gradient: they
are for serving (training several adapters at once runs through the adapter layers,
``adapter_names=``).
"""
from __future__ import annotations

import functools

import types
from typing import Optional

import torch

from .. import backends, tuning
from ..settings import settings
from . import _common

OP = "multi_lora_linear"
IA3_OP = "multi_ia3_linear"


# ----------------------------------------------------------------------------- references
def multi_lora_linear_reference(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """Row by row, written plainly (tests run it in float64)."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    rows = []
    for m in range(x.shape[0]):
        i = int(adapter_index[m])
        if i < 0:
            rows.append(y[m])
            continue
        r = int(ranks[i])
        A, B = lora_A[i, :r], lora_B[i, :, :r]
        rows.append(y[m] + float(scalings[i]) * ((x[m] @ A.T) @ B.T))
    return torch.stack(rows) if rows else y


def multi_ia3_linear_reference(x, weight, bias, scales, adapter_index, feedforward: bool):
    """Row by row, written plainly (tests run it in float64)."""
    rows = []
    for m in range(x.shape[0]):
        i = int(adapter_index[m])
        l = scales[i] if i >= 0 else None
        if feedforward:
            xm = x[m] if l is None else x[m] * l
            ym = xm @ weight.T + (0 if bias is None else bias)
        else:
            ym = x[m] @ weight.T + (0 if bias is None else bias)
            ym = ym if l is None else ym * l
        rows.append(ym)
    return torch.stack(rows) if rows else x @ weight.T


# ----------------------------------------------------------------------------- torch backend
def _torch_lora(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index):
    """The base GEMM, then per slot present: its rows' shrink and expand (the rows of one slot
    gathered, their update added back). One host sync per call (the slots present)."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    for i in torch.unique(adapter_index).tolist():
        if i < 0:
            continue
        rows = (adapter_index == i).nonzero().squeeze(1)
        r = int(ranks[i])
        if r == 0:
            continue
        u = x.index_select(0, rows) @ lora_A[i, :r].T
        y.index_add_(0, rows, (u @ lora_B[i, :, :r].T) * scalings[i].to(y.dtype))
    return y


def _torch_ia3(x, weight, bias, scales, adapter_index, feedforward):
    has = adapter_index >= 0
    l = scales.index_select(0, adapter_index.clamp_min(0))  # (M, N or K)
    l = torch.where(has[:, None], l, torch.ones((), dtype=l.dtype, device=l.device)).to(x.dtype)
    if feedforward:
        x = x * l
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    return y if feedforward else y * l


torch_backend = types.SimpleNamespace(lora=_torch_lora, ia3=_torch_ia3)
for _op in (OP, IA3_OP):
    backends.register(_op, "torch", load=lambda: torch_backend, supports=lambda x, weight, forced=False: None,
                      priority=0, tunable=True)


# ----------------------------------------------------------------------------- bank layout
def stacked_weight(weight, lora_A):
    """The (N + S R, K) view of [W; A] where lora_A (S, R, K) lies right after weight (N, K) in one
    storage, both contiguous (else None; and where K = 0, whose empty storages all look alike)."""
    N, K = weight.shape
    S, R = lora_A.shape[:2]
    if (K > 0 and weight.is_contiguous() and lora_A.is_contiguous() and lora_A.dtype == weight.dtype
            and lora_A.storage_offset() == weight.storage_offset() + N * K
            and lora_A.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()):
        return torch.as_strided(weight, (N + S * R, K), (K, 1))
    return None


def stack_bank(weight, lora_A):
    """(weight, lora_A) copied into one new (N + S R, K) buffer, A's rows right after W's, returned
    as views of it: the layout ``stacked_weight`` recognises (the serving layers hold their banks so).
    Raises what the allocation raises (out of memory)."""
    N, K = weight.shape
    rows = lora_A.shape[0] * lora_A.shape[1]
    buf = torch.empty(N + rows, K, dtype=weight.dtype, device=weight.device)
    buf[:N].copy_(weight)
    buf[N:].copy_(lora_A.reshape(rows, K))
    return buf[:N], buf[N:].view(lora_A.shape)


# ----------------------------------------------------------------------------- checks
def _check_index(op, adapter_index, x, slots, device):
    M = x.shape[:-1].numel()
    sizes = (M,) if x.dim() < 3 or x.shape[0] == M else (M, x.shape[0])
    if adapter_index.dim() != 1 or adapter_index.shape[0] not in sizes:
        each = (f"one entry per row of x ({M})" if len(sizes) == 1 else
                f"one entry per row of x ({M}) or per entry of its first dimension ({x.shape[0]})")
        raise ValueError(f"{op}: adapter_index must have {each}, got shape {tuple(adapter_index.shape)}")
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: adapter_index must be int32 or int64, got {adapter_index.dtype}")
    if adapter_index.device != device:
        raise ValueError(f"{op}: adapter_index is on {adapter_index.device} but x is on {device}")
    if not adapter_index.is_cuda and M and (int(adapter_index.min()) < -1 or int(adapter_index.max()) >= slots):
        # On CUDA this would cost a host sync per call: the serving bank builds valid indices.
        raise ValueError(f"{op}: adapter_index entries must be -1 or a slot in [0, {slots})")


def _flag(op, graphed):
    """``graphed`` as a bool, refusing anything else (a truthy tensor or string is a caller's slip)."""
    if not isinstance(graphed, bool):
        raise TypeError(f"{op}: graphed must be True or False, got {graphed!r}")
    return graphed


def _refuse_grad(op, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} is for inference and takes no gradient: run it under torch.no_grad() (training "
                           "several adapters at once runs through the adapter layers' adapter_names)")


# The choice per call signature, as the autograd entries keep theirs (ops/_autograd.py): a decode
# step calls every serving layer with the same shapes step after step, and select's key, the
# tuner's look-up and the registry's checks cost host time of the order of the layer's kernels.
_MEMO = tuning.ChoiceMemo()


def _select(op, x, weight, key_extra, call, groups, graphed):
    """The backend for this call, by measurement on CUDA: each candidate's forward timed eagerly
    (host time included), or with ``graphed`` replayed from a CUDA graph (GPU time alone), each
    way a shape key of its own, and each with L2 overwritten before every call, as in a served
    model, whose other layers pass through L2 between two calls of this one (back to back with warm
    L2 the eager timing picked cublas_batched at a 32 x 128-row mixed-rank prefill, 1.64x the base
    in benchmarks.serving's cold-L2 table, over sgmv_cublas's 1.35x)."""
    memo_key = (op, id(settings.values()), x.device, x.dtype, x.shape, groups, weight.dtype, weight.shape, graphed,
                *key_extra)
    hit = _MEMO.get(memo_key)
    if hit is not None:
        backends.record_index(op, hit[0])
        return hit[1]
    M, K = x.shape
    key = (tuning.rows_class(M), K, weight.shape[0], x.dtype, *key_extra) + (("graphed",) if graphed else ())
    timer = tuning.time_graphed_ms if graphed else functools.partial(tuning.time_ms, cold_l2=True)
    tune = (key, lambda impl: timer(lambda: call(impl))) if x.is_cuda else None
    index, impl = backends.select_index(op, x, weight, tune=tune)
    _MEMO.put(memo_key, (index, impl))
    return impl


# ----------------------------------------------------------------------------- ops
def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    adapter_index: torch.Tensor,
    graphed: bool = False,
) -> torch.Tensor:
    """Per-row LoRA over any leading shape of x (see the module docstring). adapter_index: one
    slot per row of x flattened to (M, K), or per entry of x's first dimension, -1 for none.
    lora_A (S, R, K) and lora_B (S, N, R) in the compute dtype; scalings (S,) float; ranks (S,)
    int, 0 <= ranks[s] <= R. ``graphed``: the call is (also) run inside a captured CUDA graph, so
    the tuner times its candidates as graph replays (GPU time) where it would time them eagerly."""
    _common.check_linear_inputs(OP, x, weight, bias)
    N, K = weight.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != K:
        raise ValueError(f"{OP}: lora_A must be (slots, max_rank, in_features={K}), got {tuple(lora_A.shape)}")
    S, R = lora_A.shape[:2]
    if tuple(lora_B.shape) != (S, N, R):
        raise ValueError(f"{OP}: lora_B must be (slots, out_features, max_rank) = {(S, N, R)}, got {tuple(lora_B.shape)}")
    if tuple(scalings.shape) != (S,) or tuple(ranks.shape) != (S,):
        raise ValueError(f"{OP}: scalings and ranks must have one entry per slot ({S}), got "
                         f"{tuple(scalings.shape)} and {tuple(ranks.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise TypeError(f"{OP}: {name} must be {weight.dtype} on {weight.device} (the bank holds the compute "
                            f"dtype), got {t.dtype} on {t.device}")
    for name, t, floating in (("scalings", scalings, True), ("ranks", ranks, False)):
        ok = t.dtype.is_floating_point if floating else not (t.dtype.is_floating_point or t.dtype.is_complex)
        if t.device != x.device or not ok or t.dtype == torch.bool:
            kind = "a floating-point" if floating else "an integer"
            raise TypeError(f"{OP}: {name} must be {kind} tensor on {x.device} (every kernel reads it there), "
                            f"got {t.dtype} on {t.device}")
    _refuse_grad(OP, x, weight, bias, lora_A, lora_B)
    _check_index(OP, adapter_index, x, S, x.device)
    return run_multi_lora(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, _flag(OP, graphed))


def _groups(x2, adapter_index):
    """(index, rows per entry): the index as given, each entry covering that many consecutive rows
    (1: one per row)."""
    M, G = x2.shape[0], adapter_index.shape[0]
    if M == 0:
        return adapter_index[:0], 1
    return adapter_index, M // G


def per_row(index, rows_per_entry: int):
    """One entry per row: each entry repeated for its rows (a copy; no host sync)."""
    return index if rows_per_entry == 1 else index.repeat_interleave(rows_per_entry)


def _run_lora(impl, x, weight, bias, lora_A, lora_B, scalings, ranks, index, rows_per_entry):
    grouped = getattr(impl, "lora_grouped", None)
    if grouped is not None:
        return grouped(x, weight, bias, lora_A, lora_B, scalings, ranks, index, rows_per_entry)
    return impl.lora(x, weight, bias, lora_A, lora_B, scalings, ranks, per_row(index, rows_per_entry))


def run_multi_lora(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, graphed: bool = False) -> torch.Tensor:
    """multi_lora_linear past its checks, for a caller that owns a bank it validated when it made
    it and the index it builds (fusedpeft.serving's layers, checking x itself): a decode step runs
    one such call per adapted layer, and its host time is the step's. Under torch.compile it is
    one custom op (``fusedpeft::multi_lora_linear``)."""
    if torch.compiler.is_compiling():
        return _multi_lora_op(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, graphed)
    x2 = _common.flatten_rows(x)
    index, L = _groups(x2, adapter_index)
    args = (x2, weight, bias, lora_A, lora_B, scalings, ranks, index, L)
    # The rows per index entry are part of the shape key by size class (a prefill's prompt length
    # varies from call to call; what wins depends on its order of magnitude).
    # A bank stacked under the weight (stacked_weight) is a key of its own: one backend's GEMM takes
    # its shrink there, nowhere else.
    stacked = stacked_weight(weight, lora_A) is not None
    impl = _select(OP, x2, weight, (lora_A.shape[1], bias is not None, tuning.rows_class(L), stacked),
                   lambda impl: _run_lora(impl, *args), index.shape[0], graphed)
    y = _run_lora(impl, *args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def multi_ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    feedforward: bool,
    graphed: bool = False,
) -> torch.Tensor:
    """Per-row IA3 over any leading shape of x: scales (S, K) with ``feedforward`` (input
    scaling), else (S, N) (output scaling, bias included); adapter_index and ``graphed`` as
    multi_lora_linear's."""
    _common.check_linear_inputs(IA3_OP, x, weight, bias)
    N, K = weight.shape
    if scales.dim() != 2 or scales.shape[1] != (K if feedforward else N):
        raise ValueError(f"{IA3_OP}: scales must be (slots, {'in' if feedforward else 'out'}_features="
                         f"{K if feedforward else N}), got {tuple(scales.shape)}")
    _refuse_grad(IA3_OP, x, weight, bias, scales)
    _check_index(IA3_OP, adapter_index, x, scales.shape[0], x.device)
    return run_multi_ia3(x, weight, bias, scales, adapter_index, feedforward, _flag(IA3_OP, graphed))


def run_multi_ia3(x, weight, bias, scales, adapter_index, feedforward: bool, graphed: bool = False) -> torch.Tensor:
    """multi_ia3_linear past its checks (see run_multi_lora; under torch.compile the custom op
    ``fusedpeft::multi_ia3_linear``)."""
    if torch.compiler.is_compiling():
        return _multi_ia3_op(x, weight, bias, scales, adapter_index, bool(feedforward), graphed)
    x2 = _common.flatten_rows(x)
    args = (x2, weight, bias, scales, per_row(*_groups(x2, adapter_index)), bool(feedforward))
    impl = _select(IA3_OP, x2, weight, (bool(feedforward), bias is not None), lambda impl: impl.ia3(*args),
                   adapter_index.shape[0], graphed)
    y = impl.ia3(*args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- torch.compile
# Each op is one opaque node of a compiled graph: dynamo does not trace the backend choice (a dict
# memo, the tuner) or a backend's own code (a pybind11 call into the CUDA extension would break
# the graph), and the node runs the eager path above. Every backend picked on CUDA reads no device
# value on the host, so a compiled decode step also captures into a CUDA graph (mode
# "reduce-overhead", as transformers' generate compiles it with a static cache): the tuner
# measures during the compiled function's eager warm-up runs, before any capture.
_multi_lora_op = torch.library.custom_op(
    "fusedpeft::multi_lora_linear", run_multi_lora, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scalings, Tensor ranks, "
           "Tensor adapter_index, bool graphed=False) -> Tensor")
_multi_ia3_op = torch.library.custom_op(
    "fusedpeft::multi_ia3_linear", run_multi_ia3, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor scales, Tensor adapter_index, bool feedforward, "
           "bool graphed=False) -> Tensor")


@_multi_lora_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, graphed=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_multi_ia3_op.register_fake
def _(x, weight, bias, scales, adapter_index, feedforward, graphed=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
