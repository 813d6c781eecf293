"""The ``cublas_batched`` backend of ``multi_lora_linear``: many adapters in one batch as cuBLAS
batched GEMMs through torch ops (no Triton, no extension), for a prefill, where each sequence's
rows are contiguous and share the sequence's adapter.

The op hands it x as G groups of L consecutive rows (G sequences of L tokens) and one slot per
group (fusedpeft.ops.multi_lora: ``adapter_index`` per sequence):

    A_g = A[slot_g], B_g = B[slot_g]                the groups' adapters gathered: G R (K + N) elements
    u = bmm(x_g, A_g^T) * s_g                       (G, L, R): G skinny GEMMs in one batched call
    y_g = u B_g^T                                   batched GEMM writing y once
    y += x W^T                                      cuBLAS GEMM (M = G L rows) accumulating (beta = 1)

With a bias the base GEMM comes first (addmm adds the bias) and the batched GEMM accumulates.

A group without an adapter (slot -1) takes slot 0's tensors with a scale of 0, and the columns of u
and of the gathered B past a slot's rank are zeroed (the scales come from one gather from a per-slot
table kept per bank state, ``slot_scales``; a zero scale marks the columns to clear, since the bank
may hold NaN there): no host sync, so a step can be captured in a CUDA graph. Beside the three GEMMs
a call launches eight small kernels (the slot index twice, the two gathers, the scales' gather, the
zero mask, the scale product and the two clears); with the scale mask built per call it launched
twelve, about 30 us at 4096 rows on an H100 (``python -m tools.serving_split``), a sixth of an
8192 -> 2048 layer's base GEMM.

Cost over the base GEMM: the gather (2 G R (K + N) bytes in 16-bit types), the shrink (2 M K R
FLOPs, reading x again: 2 M K bytes) and the expand (2 M N R FLOPs, writing y: 2 M N bytes, which the
base GEMM's epilogue then reads). At 32 sequences x 128 tokens of a 4096 x 4096 layer with R = 16
that is 8 MiB gathered, 32 MiB of x and 32 + 32 MiB of y beside the base's 0.14 TFLOP. Measured on
an H100 with the expand last (reading and writing y after the GEMM: 4 M N bytes), 0.27 ms against the
base's 0.178 (1.50x; the fused SGMV kernel, which writes y once, took 0.54 ms: its main loop is far
from cuBLAS's); with the expand first and the kept scale table, on an H200, 0.236 against 0.177
(1.34x). Mixed ranks are exact (what lies past a slot's rank never reaches y) but cost the
bank's maximum rank R. With one row per group (decode) the gather reads an adapter per row where
the BGMV kernels read each distinct adapter once, and its eleven launches make it host-bound
(0.15-0.31 ms at 64 rows): the tuner measures which wins.
"""
from __future__ import annotations

import types

from .. import ops  # noqa: F401  (each op registers its torch reference first: registration index 0)
from . import register

OP = "multi_lora_linear"


def cublas_usable(x, weight=None, forced=False):
    """None on CUDA tensors (or anywhere when named: the tests run it on CPU), else why not."""
    if x.device.type == "cuda" or forced:
        return None
    return f"tensors are on {x.device.type}; cublas_batched is a CUDA candidate (name it to run it elsewhere)"


# {(id(scalings), id(ranks), R, dtype, device): (weakrefs to both, their versions, table)}: the
# bank's per-slot scale table, rebuilt when either tensor is written (an in-place write, the bank's
# own way, bumps the version its views share) or replaced.
_SCALE_TABLES: dict = {}


def slot_scales(scalings, ranks, R: int, dtype):
    """(S + 1, R) in ``dtype``: row s holds slot s's scaling on its first ranks[s] columns and zeros
    past them; row S is zeros, the row of a group without an adapter (index -1, taken modulo S + 1).
    A serving layer's bank changes only when an adapter is loaded, so the table is made once per
    bank state rather than in five small launches per call."""
    import weakref

    import torch

    from .. import tuning

    # Inside a CUDA-graph capture the table is made afresh and not kept: the graph then rebuilds it
    # from the bank at every replay (a kept table would hold the slots of capture time, and a table
    # made in the capture lives in the graph's memory).
    capturing = tuning.capturing()
    key = (id(scalings), id(ranks), R, dtype, scalings.device)
    hit = None if capturing else _SCALE_TABLES.get(key)
    if hit is not None:
        s_ref, r_ref, versions, table = hit
        if s_ref() is scalings and r_ref() is ranks and versions == (scalings._version, ranks._version):
            return table
    S = scalings.shape[0]
    live = torch.arange(R, device=scalings.device) < ranks.to(scalings.device).unsqueeze(1)
    table = torch.zeros(S + 1, R, dtype=dtype, device=scalings.device)
    table[:S] = torch.where(live, scalings.unsqueeze(1), 0.0)
    if not capturing:
        if len(_SCALE_TABLES) > 4096:
            _SCALE_TABLES.clear()
        _SCALE_TABLES[key] = (weakref.ref(scalings), weakref.ref(ranks), (scalings._version, ranks._version), table)
    return table


def lora_grouped(x, weight, bias, lora_A, lora_B, scalings, ranks, group_index, rows_per_group: int):
    """multi_lora_linear on 2-D x whose rows are len(group_index) groups of ``rows_per_group``
    consecutive rows, group j taking slot group_index[j] (-1: none). The op has checked the rest."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    G, L = group_index.shape[0], rows_per_group
    if M == 0 or N == 0 or lora_A.shape[1] == 0:
        return torch.nn.functional.linear(x, weight, bias)
    R, S = lora_A.shape[1], lora_A.shape[0]
    slot = group_index.clamp_min(0)
    A = lora_A.index_select(0, slot)  # (G, R, K)
    B = lora_B.index_select(0, slot)  # (G, N, R)
    # Each group's scale on its slot's first ranks[slot] columns of u, 0 past them and for a group
    # without an adapter (-1 modulo S + 1 is the table's zero row): what lies past a slot's rank
    # never reaches y.
    s = slot_scales(scalings, ranks, R, x.dtype).index_select(0, group_index.remainder(S + 1))  # (G, R)
    # The bank past a slot's rank may hold anything (NaN included: it is never meant to be read), and
    # 0 * NaN is NaN, so those columns of u and of the gathered B are zeroed, not scaled by 0.
    dead = (s == 0).unsqueeze(1)  # (G, 1, R); a live slot of scaling 0 adds nothing either way
    B.masked_fill_(dead, 0)
    u = torch.bmm(x.reshape(G, L, K), A.transpose(1, 2))  # (G, L, R)
    u.mul_(s.unsqueeze(1)).masked_fill_(dead, 0)
    if bias is None:
        # The rank-r term first, written once, then the base GEMM accumulates onto it (beta = 1:
        # cuBLAS reads it in the epilogue of a compute-bound GEMM) rather than a second pass over
        # y reading and writing 4 M N bytes after it.
        y = torch.bmm(u, B.transpose(1, 2)).view(M, N)
        return y.addmm_(x, weight.T)
    y = torch.nn.functional.linear(x, weight, bias)
    y.view(G, L, -1).baddbmm_(u, B.transpose(1, 2))
    return y


# Below the cuda backend's 8: a measured candidate on CUDA, never the choice where nothing is
# measured (FUSEDPEFT_AUTOTUNE=0 keeps the Triton kernels first).
register(OP, "cublas_batched", load=lambda: types.SimpleNamespace(lora_grouped=lora_grouped),
         supports=cublas_usable, priority=5, tunable=True)
