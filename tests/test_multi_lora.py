"""Per-row adapters from a bank (serving): multi_lora_linear and multi_ia3_linear against their
float64 row-by-row references, every backend (the Triton kernels through the interpreter), with
ragged groups, rows without an adapter, mixed ranks, garbage past a slot's rank, 3-D input, M = 0
and 1, fp32 and bf16; and bad input named."""
import pytest
import torch

import fusedpeft
from fusedpeft.ops import multi_ia3_linear, multi_ia3_linear_reference, multi_lora_linear, multi_lora_linear_reference
from fusedpeft.ops.multi_lora import stack_bank, stacked_weight

from helpers import TOL, rel_err

LORA_BACKENDS = ["torch", "triton", "bgmv", "bgmv_one", "cublas_batched", "sgmv_cublas", "stacked"]
# (leading shape of x, K, N): ragged sizes, 3-D input, M = 1 and M = 0, no input features
SHAPES = [((37,), 40, 24), ((1,), 33, 47), ((0,), 40, 24), ((3, 7), 24, 40), ((70,), 20, 8), ((2, 3), 0, 8)]  # the last: K = 0
RANKS = [16, 4, 0, 9, 1]  # slot ranks: full, partial, an empty slot, odd, 1


def _bank(S, R, K, N, dtype, ranks):
    A, B = torch.randn(S, R, K), torch.randn(S, N, R) / R**0.5
    clean_A = A.clone()
    for s, r in enumerate(ranks):
        clean_A[s, r:] = 0
        B[s, :, r:] = 0
    # Garbage past slot 1's rank, which must never be read: a finite value, then NaN (0 * NaN is NaN,
    # so a backend that multiplies what lies there by a zero scale fails too)
    A[1, ranks[1]:] = 7.0
    A[3, ranks[3]:] = float("nan")
    B[3, :, ranks[3]:] = float("nan")
    return A.to(dtype), clean_A.to(dtype), B.to(dtype)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_multi_lora_linear_matches_reference(backend, dtype, lead, K, N, bias, index_dtype):
    S, R = len(RANKS), 16
    x = torch.randn(*lead, K).to(dtype)
    W, b = (torch.randn(N, K) / K**0.5).to(dtype), torch.randn(N).to(dtype) if bias else None
    A, clean_A, B = _bank(S, R, K, N, dtype, RANKS)
    scalings, ranks = torch.rand(S) + 0.5, torch.tensor(RANKS, dtype=torch.int32)
    M = x.shape[:-1].numel()
    idx = torch.randint(-1, S, (M,))
    if M >= 4:
        idx[:3] = torch.tensor([1, 1, -1])  # a group of two, and a row without an adapter, always there
    with torch.no_grad(), fusedpeft.use_backend(backend):
        y = multi_lora_linear(x, W, b, A, B, scalings, ranks, idx.to(index_dtype))
    assert fusedpeft.last_backend("multi_lora_linear") == backend
    ref = multi_lora_linear_reference(x.double().reshape(M, K), W.double(), None if b is None else b.double(),
                                      clean_A.double(), B.double(), scalings.double(), ranks, idx)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y.reshape(M, N), ref) <= TOL[dtype], backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("feedforward", [False, True])
def test_multi_ia3_linear_matches_reference(backend, dtype, lead, K, N, feedforward):
    S = 4
    x = torch.randn(*lead, K).to(dtype)
    W, b = (torch.randn(N, K) / K**0.5).to(dtype), torch.randn(N).to(dtype)
    scales = (1 + 0.5 * torch.randn(S, K if feedforward else N)).to(dtype)
    M = x.shape[:-1].numel()
    idx = torch.randint(-1, S, (M,))
    with torch.no_grad(), fusedpeft.use_backend(backend):
        y = multi_ia3_linear(x, W, b, scales, idx, feedforward)
    ref = multi_ia3_linear_reference(x.double().reshape(M, K), W.double(), b.double(), scales.double(), idx, feedforward)
    assert y.shape == (*lead, N)
    assert rel_err(y.reshape(M, N), ref) <= TOL[dtype], backend


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("G,L", [(3, 7), (1, 1), (5, 1), (2, 0), (1, 13)])
def test_multi_lora_takes_one_slot_per_sequence(backend, dtype, G, L):
    """3-D x (sequences, tokens, K) with one slot per sequence: as the same slots given per row."""
    S, R, K, N = len(RANKS), 16, 24, 40
    x = torch.randn(G, L, K).to(dtype)
    W, b = (torch.randn(N, K) / K**0.5).to(dtype), torch.randn(N).to(dtype)
    A, clean_A, B = _bank(S, R, K, N, dtype, RANKS)
    scalings, ranks = torch.rand(S) + 0.5, torch.tensor(RANKS, dtype=torch.int32)
    seq = torch.tensor([1, -1, 3, 0, 4])[:G]  # a partial rank, none, odd rank, full, rank 1
    with torch.no_grad(), fusedpeft.use_backend(backend):
        y = multi_lora_linear(x, W, b, A, B, scalings, ranks, seq)
    assert fusedpeft.last_backend("multi_lora_linear") == backend
    ref = multi_lora_linear_reference(x.double().reshape(G * L, K), W.double(), b.double(), clean_A.double(), B.double(),
                                      scalings.double(), ranks, seq.repeat_interleave(L))
    assert y.shape == (G, L, N) and y.dtype == dtype
    assert rel_err(y.reshape(G * L, N), ref) <= TOL[dtype], backend


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_multi_lora_follows_the_bank_written_between_calls(backend):
    """A bank written in place between calls (a slot's rank and scaling, as loading an adapter
    does) or replaced: the next call uses the new values (a backend that keeps anything derived
    from the bank must notice)."""
    S, R, K, N, G, L = len(RANKS), 16, 24, 40, 4, 3
    x = torch.randn(G, L, K)
    W = torch.randn(N, K) / K**0.5
    A, clean_A, B = _bank(S, R, K, N, torch.float32, RANKS)
    if backend == "stacked":  # its own layout: A's slots right after W's rows, written in place below
        W, clean_A, _, _ = _stacked_bank(S, R, K, N, torch.float32, RANKS)
        clean_A[1, RANKS[1]:] = 0
        clean_A[3, RANKS[3]:] = 0
        W.copy_(torch.randn(N, K) / K**0.5)
    scalings, ranks = torch.rand(S) + 0.5, torch.tensor(RANKS, dtype=torch.int32)
    seq = torch.tensor([1, 3, -1, 0])

    def check():
        with torch.no_grad(), fusedpeft.use_backend(backend):
            y = multi_lora_linear(x, W, None, clean_A, B, scalings, ranks, seq)
        ref = multi_lora_linear_reference(x.double().reshape(G * L, K), W.double(), None, clean_A.double(),
                                          B.double(), scalings.double(), ranks, seq.repeat_interleave(L))
        assert rel_err(y.reshape(G * L, N), ref) <= TOL[torch.float32], backend

    check()
    ranks[1].fill_(2)  # slot 1 now rank 2: rows 2.. of its A (non-zero) must no longer count
    scalings[3].fill_(-1.5)
    check()
    ranks = ranks.clone()  # a new tensor of the same values, then one that differs
    ranks[0] = 1
    check()


def test_cublas_batched_keeps_no_scale_table_inside_a_capture(monkeypatch):
    """Inside a CUDA-graph capture (stood in for here) cublas_batched rebuilds its per-slot scale
    table on every call, so that a captured graph reads the bank as it is at each replay; outside
    one it reuses the table kept for the bank's state."""
    from fusedpeft import tuning
    from fusedpeft.backends import cublas

    S, R, K, N, G, L = len(RANKS), 16, 24, 40, 4, 3
    x, W = torch.randn(G, L, K), torch.randn(N, K) / K**0.5
    A, clean_A, B = _bank(S, R, K, N, torch.float32, RANKS)
    scalings, ranks = torch.rand(S) + 0.5, torch.tensor(RANKS, dtype=torch.int32)
    seq = torch.tensor([1, 3, -1, 0])

    def run():
        with torch.no_grad(), fusedpeft.use_backend("cublas_batched"):
            return multi_lora_linear(x, W, None, clean_A, B, scalings, ranks, seq)

    def reference():
        return multi_lora_linear_reference(x.double().reshape(G * L, K), W.double(), None, clean_A.double(),
                                           B.double(), scalings.double(), ranks, seq.repeat_interleave(L))

    run()  # the table kept for this bank state
    scalings.data[3] = -1.5  # a write the version counter does not see: a kept table would be stale
    stale = run()
    assert rel_err(stale.reshape(G * L, N), reference()) > 1e-3  # outside a capture the kept table serves
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    kept = dict(cublas._SCALE_TABLES)
    fresh = run()
    assert rel_err(fresh.reshape(G * L, N), reference()) <= TOL[torch.float32]
    assert cublas._SCALE_TABLES == kept  # nothing made inside the capture is kept


@pytest.mark.parametrize("feedforward", [False, True])
def test_multi_ia3_takes_one_slot_per_sequence(feedforward):
    G, L, K, N, S = 3, 5, 12, 10, 4
    x, W, b = torch.randn(G, L, K), torch.randn(N, K), torch.randn(N)
    scales = 1 + 0.5 * torch.randn(S, K if feedforward else N)
    seq = torch.tensor([2, -1, 0])
    with torch.no_grad():
        y = multi_ia3_linear(x, W, b, scales, seq, feedforward)
    ref = multi_ia3_linear_reference(x.double().reshape(G * L, K), W.double(), b.double(), scales.double(),
                                     seq.repeat_interleave(L), feedforward)
    assert rel_err(y.reshape(G * L, N), ref) <= TOL[torch.float32]


def test_multi_lora_groups_rows_by_slot_without_a_host_sync():
    """The SGMV row grouping: every row once, segments in slot order, the tile table covering
    each segment's rows with partial last tiles, and tiles past the end pointing nowhere."""
    from fusedpeft._kernels import triton_kernels

    idx = torch.tensor([2, -1, 0, 2, 2, 0, -1, 2, 3])
    order, seg_start, tile_seg, tile_start, bound = triton_kernels.multi_lora._row_tiles(idx, 4, 2)
    assert sorted(order.tolist()) == list(range(9))
    assert (idx[order] + 1).tolist() == sorted((idx + 1).tolist())  # grouped by segment, stable
    assert seg_start.tolist() == [0, 2, 4, 4, 8, 9]  # -1: 2 rows, slot 0: 2, slot 1: 0, slot 2: 4, slot 3: 1
    assert tile_start.tolist() == [0, 1, 2, 2, 4, 5]
    assert tile_seg[:5].tolist() == [0, 1, 3, 3, 4] and bound >= 5


def test_multi_ops_refuse_bad_input_by_name():
    x, W = torch.randn(5, 8), torch.randn(6, 8)
    A, B = torch.randn(3, 4, 8), torch.randn(3, 6, 4)
    s, r = torch.ones(3), torch.full((3,), 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="adapter_index entries must be -1 or a slot in \\[0, 3\\)"):
        multi_lora_linear(x, W, None, A, B, s, r, torch.tensor([0, 1, 2, 3, -1]))
    with pytest.raises(ValueError, match="one entry per row of x \\(5\\)"):
        multi_lora_linear(x, W, None, A, B, s, r, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="one entry per row of x \\(15\\) or per entry of its first dimension \\(3\\)"):
        multi_lora_linear(torch.randn(3, 5, 8), W, None, A, B, s, r, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="int32 or int64"):
        multi_lora_linear(x, W, None, A, B, s, r, torch.zeros(5))
    with pytest.raises(TypeError, match="graphed must be True or False"):
        multi_lora_linear(x, W, None, A, B, s, r, torch.zeros(5, dtype=torch.int64), graphed=1)
    with pytest.raises(TypeError, match="graphed must be True or False"):
        multi_ia3_linear(x, W, None, torch.ones(3, 6), torch.zeros(5, dtype=torch.int64), False, graphed="yes")
    with pytest.raises(ValueError, match="lora_B must be \\(slots, out_features, max_rank\\)"):
        multi_lora_linear(x, W, None, A, B[:, :5], s, r, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="ranks must be an integer tensor"):
        multi_lora_linear(x, W, None, A, B, s, r.float(), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="scalings must be a floating-point tensor"):
        multi_lora_linear(x, W, None, A, B, r, r, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="scalings must be a floating-point tensor on cpu"):
        multi_lora_linear(x, W, None, A, B, s.to("meta"), r, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="takes no gradient"):
        multi_lora_linear(x.requires_grad_(), W, None, A, B, s, r, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="scales must be \\(slots, out_features=6\\)"):
        multi_ia3_linear(torch.randn(5, 8), W, None, torch.ones(3, 8), torch.zeros(5, dtype=torch.int64), False)


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["per-row", "per-sequence"])
def test_each_backend_runs_its_own_kernels(lead, monkeypatch):
    """A forced backend runs its own schedule, per-row and per-sequence calls alike (the op takes a
    backend's lora_grouped where it has one: a backend standing for a whole kernel module would take
    another schedule's)."""
    from fusedpeft._kernels import triton_kernels

    fast_launch = triton_kernels.fast_launch
    launched = []
    real = fast_launch.cached_launch

    def spy(kernel, *args, **kwargs):
        launched.append(kernel.fn.__name__)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(fast_launch, "cached_launch", spy)
    S, R, K, N = len(RANKS), 16, 24, 40
    x, W = torch.randn(*lead, K), torch.randn(N, K) / K**0.5
    _, A, B = _bank(S, R, K, N, torch.float32, RANKS)
    index = torch.tensor([0, 1, -1, 3, 4, 0][:lead[0]])
    expected = {"triton": {"sgmv_kernel"}, "bgmv": {"bgmv_shrink_kernel", "bgmv_expand_kernel"},
                "bgmv_one": {"bgmv_one_kernel"}, "sgmv_cublas": {"grouped_shrink_kernel", "grouped_expand_kernel"},
                "stacked": {"bgmv_shrink_kernel", "bgmv_expand_kernel"}}  # a bank not stacked under W: bgmv's
    for backend, kernels in expected.items():
        launched.clear()
        with torch.no_grad(), fusedpeft.use_backend(backend):
            multi_lora_linear(x, W, None, A, B, torch.rand(S) + 0.5, torch.tensor(RANKS, dtype=torch.int32), index)
        assert set(launched) == kernels, (backend, launched)


def _stacked_bank(S, R, K, N, dtype, ranks):
    """W (N, K) and A (S, R, K) as views of one (N + S R, K) buffer, A's rows right after W's (as the
    serving layers allocate them), with _bank's garbage past the ranks; B, and A without the garbage."""
    A, clean_A, B = _bank(S, R, K, N, dtype, ranks)
    W, A = stack_bank((torch.randn(N, K) / max(K, 1)**0.5).to(dtype), A)
    return W, A, clean_A, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_bank_takes_its_shrink_from_the_base_gemm(dtype, lead, K, N, bias, monkeypatch):
    """A bank whose A slots lie right after W in memory: the ``stacked`` backend runs one GEMM over
    [W; A] and its expand (no shrink kernel), and matches the float64 reference, garbage past the
    ranks never read, rows without an adapter, 3-D input, M = 0 and 1, K = 0."""
    from fusedpeft._kernels import triton_kernels
    launched = []
    real = triton_kernels.fast_launch.cached_launch
    monkeypatch.setattr(triton_kernels.fast_launch, "cached_launch",
                        lambda kernel, *a, **kw: launched.append(kernel.fn.__name__) or real(kernel, *a, **kw))
    S, R = len(RANKS), 16
    W, A, clean_A, B = _stacked_bank(S, R, K, N, dtype, RANKS)
    assert stacked_weight(W, A.clone()) is None
    assert (stacked_weight(W, A) is not None) == (K > 0)
    x = torch.randn(*lead, K).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    scalings, ranks = torch.rand(S) + 0.5, torch.tensor(RANKS, dtype=torch.int32)
    M = x.shape[:-1].numel()
    idx = torch.randint(-1, S, (M,))
    if M >= 4:
        idx[:4] = torch.tensor([1, 1, -1, 3])  # garbage (7.0, NaN) past slots 1 and 3's ranks
    with torch.no_grad(), fusedpeft.use_backend("stacked"):
        y = multi_lora_linear(x, W, b, A, B, scalings, ranks, idx)
    ref = multi_lora_linear_reference(x.double().reshape(M, K), W.double(), None if b is None else b.double(),
                                      clean_A.double(), B.double(), scalings.double(), ranks, idx)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y.reshape(M, N), ref) <= TOL[dtype]
    if M and K and N:
        assert launched == ["stacked_expand_kernel"], launched
