"""Host-side launch helpers: the compiled-kernel cache key must separate exactly the argument
facts Triton specialises on, and the plain-Python grid helpers must agree with Triton's."""
import pytest
import torch
import triton

from fusedpeft._kernels import triton_kernels

launch = triton_kernels.launch


def _key(*args):
    return launch._specialization_key(args)


def test_specialization_key_separates_what_triton_specialises_on():
    base = torch.empty(64, dtype=torch.bfloat16)
    aligned_other = torch.empty(64, dtype=torch.bfloat16)
    misaligned = base[1:]
    assert _key(base, 32, 0.5) == _key(aligned_other, 48, 0.25)  # same facts, other values
    assert _key(base) != _key(misaligned)  # 16-byte alignment
    assert _key(base) != _key(base.float())  # dtype
    assert _key(1) != _key(2)  # the value 1
    assert _key(16) != _key(17)  # divisibility by 16
    assert _key(17) == _key(33)
    assert _key(5) != _key(2**31 + 5)  # int32 or int64
    assert _key(-(2**31) - 16) != _key(-16)
    assert _key(True) != _key(False)
    assert _key(1) != _key(1.0)
    param = torch.nn.Parameter(torch.empty(8))
    assert _key(param) == _key(torch.empty(8))  # subclasses key like their tensor


@pytest.mark.parametrize("a", [0, 1, 2, 15, 16, 17, 1000, 4097])
@pytest.mark.parametrize("b", [1, 3, 16, 64])
def test_grid_helpers_match_triton(a, b):
    assert launch.cdiv(a, b) == (a + b - 1) // b
    assert launch.next_power_of_2(a) == triton.next_power_of_2(a)


@pytest.mark.parametrize("M,C", [(1, 1), (37, 24), (4096, 16), (10, 5000)])
def test_split_rows_covers_every_row_once(M, C):
    col_blocks, splits, rows_per_split = launch.split_rows(M, C, 16, 16, torch.device("cpu"))
    assert col_blocks * 16 >= C and (col_blocks - 1) * 16 < C
    assert rows_per_split % 16 == 0 and splits * rows_per_split >= M and (splits - 1) * rows_per_split < M
