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
past a slot's rank are scaled by 0 too: no host sync, so a step can be captured in a CUDA graph.

Cost over the base GEMM: the gather (2 G R (K + N) bytes in 16-bit types), the shrink (2 M K R
FLOPs, reading x again: 2 M K bytes) and the expand (2 M N R FLOPs, writing y: 2 M N bytes, which the
base GEMM's epilogue then reads). At 32 sequences x 128 tokens of a 4096 x 4096 layer with R = 16
that is 8 MiB gathered, 32 MiB of x and 32 + 32 MiB of y beside the base's 0.14 TFLOP. Measured on
an H100 with the expand last (reading and writing y after the GEMM: 4 M N bytes), 0.27 ms against the
base's 0.178 (1.50x; the fused SGMV kernel, which writes y once, took 0.54 ms: its main loop is far
from cuBLAS's). Mixed ranks are exact (the bank's zeros past a slot's rank are multiplied, its
garbage never reaches y) but cost the bank's maximum rank R. With one row per group
(decode) the gather reads an adapter per row where the BGMV kernels read each distinct adapter once,
and its ten launches make it host-bound (0.19 ms at 64 rows): the tuner measures which wins.
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


def lora_grouped(x, weight, bias, lora_A, lora_B, scalings, ranks, group_index, rows_per_group: int):
    """multi_lora_linear on 2-D x whose rows are len(group_index) groups of ``rows_per_group``
    consecutive rows, group j taking slot group_index[j] (-1: none). The op has checked the rest."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    G, L = group_index.shape[0], rows_per_group
    if M == 0 or N == 0 or lora_A.shape[1] == 0:
        return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    R = lora_A.shape[1]
    slot = group_index.clamp_min(0)
    A = lora_A.index_select(0, slot)  # (G, R, K)
    B = lora_B.index_select(0, slot)  # (G, N, R)
    # Each group's scale on its slot's first ranks[slot] columns of u, 0 past them and for a group
    # without an adapter: what lies past a slot's rank never reaches y.
    live = torch.arange(R, device=x.device) < ranks.index_select(0, slot).unsqueeze(1)
    live &= (group_index >= 0).unsqueeze(1)
    s = torch.where(live, scalings.index_select(0, slot).unsqueeze(1), 0.0).to(x.dtype)  # (G, R)
    u = torch.bmm(x.reshape(G, L, K), A.transpose(1, 2))  # (G, L, R)
    u.mul_(s.unsqueeze(1))
    if bias is None:
        # The rank-r term first, written once, then the base GEMM accumulates onto it (beta = 1:
        # cuBLAS reads it in the epilogue of a compute-bound GEMM) rather than a second pass over
        # y reading and writing 4 M N bytes after it.
        y = torch.bmm(u, B.transpose(1, 2)).view(M, N)
        return y.addmm_(x, weight.T)
    y = torch.addmm(bias, x, weight.T)
    y.view(G, L, -1).baddbmm_(u, B.transpose(1, 2))
    return y


# Below the cuda backend's 8: a measured candidate on CUDA, never the choice where nothing is
# measured (FUSEDPEFT_AUTOTUNE=0 keeps the Triton kernels first).
register(OP, "cublas_batched", load=lambda: types.SimpleNamespace(lora_grouped=lora_grouped),
         supports=cublas_usable, priority=5, tunable=True)
