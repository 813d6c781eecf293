"""Operand layout and grid arithmetic shared by every launcher: plain Python on the host path."""
from __future__ import annotations

import functools
import os

import torch

from fusedpeft.settings import settings


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def descriptor_ok(*tensors) -> bool:
    """TMA needs a 16-byte-aligned base, 16-byte-multiple row strides and a unit last stride
    (and settings.tensor_descriptors on). float32 operands take pointer loads: with descriptors,
    the LoRA backward's grad_x kernel of a float32 layer faulted (illegal memory access) on an
    H100 under Triton 3.6 through the flattened persistent loop, and passed with descriptors off
    or the per-tile loop (benchmarks/RESULTS.md, "float32 on the GPU")."""
    if not settings.tensor_descriptors:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dtype == torch.float32:
            return False
        if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16:
            return False
        if (t.stride(0) * t.element_size()) % 16 or t.shape[1] * t.element_size() < 16:
            return False
    return True


def weight_operand(mat: torch.Tensor):
    """``mat`` is the logical [N_out, K_red] matrix of ``out = a @ mat^T``. Returns the tensor to
    pass, W_KMAJOR, stride_wn, stride_wk so that no copy is made when either orientation of mat has
    a unit stride (nn.Linear weight: K-major; its transpose, or a Conv1D weight: N-major)."""
    if mat.stride(1) == 1:
        return mat, True, mat.stride(0), 1
    if mat.stride(0) == 1:
        return mat.T, False, 1, mat.stride(1)
    mat = mat.contiguous()
    return mat, True, mat.stride(0), 1


# Plain-Python helpers: triton.cdiv / triton.next_power_of_2 are constexpr-function wrappers in
# recent Triton, about 15 us a call on the host, and the launchers call them on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0



def split_rows(M: int, C: int, block_m: int, block_c: int, device, programs_per_sm: int = 4) -> tuple[int, int, int]:
    """Grid of the column reductions (weight gradients, column dot products): (column blocks,
    row splits, rows per split). M is split across programs so that narrow C still fills the
    GPU (about programs_per_sm programs per SM); each split's partial result is summed afterwards
    in a fixed order, so the result is deterministic."""
    col_blocks = cdiv(C, block_c)
    target = 2 if interpreting() else programs_per_sm * num_sms(device.index or 0)
    splits = max(1, min(cdiv(M, block_m * 4), cdiv(target, col_blocks)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    return col_blocks, cdiv(M, rows_per_split), rows_per_split


def column_sums(partial: torch.Tensor, with_second: bool):
    """The column reductions' result from their float32 partials [1 or 2, parts, C]: the parts
    summed in a fixed order (deterministic), as (first [C], second [C] or None). One part needs
    no sum."""
    sums = partial[:, 0] if partial.shape[1] == 1 else partial.sum(1)
    return sums[0], (sums[1] if with_second else None)


def zero_column_sums(C: int, with_second: bool, device):
    """column_sums of an empty reduction (M = 0)."""
    zeros = torch.zeros(C, dtype=torch.float32, device=device)
    return zeros, (zeros.clone() if with_second else None)


def block_r(r: int) -> int:
    return max(16, next_power_of_2(r))


