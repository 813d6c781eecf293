"""GPU checks at real sizes of DoRA and of the serving ops (marked cuda; skipped without a GPU):
every backend against float64, the automatic choice included. Run on the device with
python -m pytest -q -m cuda tests/test_cuda_new_ops.py"""
import pytest
import torch

import fusedpeft
from fusedpeft.ops import (dora_linear, dora_linear_reference, multi_ia3_linear, multi_ia3_linear_reference,
                           multi_lora_linear, multi_lora_linear_reference)
from fusedpeft.ops.multi_lora import stack_bank

from helpers import GPU_TOL, backend_mask, leaf, lora_upstream_grad, pin_dropout_seed, rel_err

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("backend", ["torch", "triton", "cublas", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
# The last shape has M > K: the backward scales W and B, not grad_y, by the magnitude over the norm.
@pytest.mark.parametrize("lead,K,N", [((512,), 1024, 768), ((3, 111), 1000, 1496), ((16,), 4096, 4096),
                                      ((2048,), 4096, 1024), ((1536,), 1024, 768)])
@pytest.mark.parametrize("r", [16, 64])
# "output" (grad_m's z read back from y) where the op takes it: without dropout and bias
@pytest.mark.parametrize("dropout,grad_mode", [(0.0, "output"), (0.0, "save"), (0.0, "recompute"), (0.05, "save"),
                                               (0.05, "recompute")])
def test_dora_matches_float64(backend, dtype, lead, K, N, r, dropout, grad_mode, monkeypatch, use_settings):
    use_settings(output_scale_grad=grad_mode)
    d = "cuda"
    x = leaf(torch.randn(*lead, K, device=d), dtype)
    W = leaf(torch.randn(N, K, device=d) / K**0.5, dtype, requires_grad=False)
    b = leaf(torch.randn(N, device=d), dtype) if grad_mode != "output" else None
    A = leaf(torch.randn(r, K, device=d) / K**0.5, dtype)
    B = leaf(torch.randn(N, r, device=d) / r**0.5, dtype)
    m = leaf(torch.rand(N, device=d) + 0.5, dtype)
    seed = pin_dropout_seed(monkeypatch)
    with fusedpeft.use_backend(backend or "auto"):
        y = dora_linear(x, W, b, A, B, 0.75, m, dropout_p=dropout, training=True)
    used = fusedpeft.last_backend("dora_linear")
    assert backend is None or used == backend
    g = lora_upstream_grad(y, B)
    y.backward(g)
    mask = backend_mask("dora_linear", used, seed, x, dropout)
    refs = [None if t is None else leaf(t, torch.float64, requires_grad=t.requires_grad) for t in (x, W, b, A, B, m)]
    y_ref = dora_linear_reference(*refs[:5], 0.75, refs[5], dropout_mask=mask, dropout_p=dropout)
    y_ref.backward(g.double())
    errs = {"y": rel_err(y, y_ref)}
    for name, t, ref in zip(["x", "b", "A", "B", "m"], (x, b, A, B, m), (refs[0], *refs[2:])):
        if t is not None:
            errs["grad_" + name] = rel_err(t.grad, ref.grad)
    bad = {k: v for k, v in errs.items() if not v <= GPU_TOL[dtype]}
    assert not bad, f"dora[{used}] {lead}x{K}x{N} r={r} {dtype} p={dropout} {grad_mode}: {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead,K,N", [((512,), 1024, 768), ((3, 111), 1000, 1496), ((16,), 4096, 4096),
                                      ((2048,), 4096, 1024), ((1536,), 1024, 768)])
@pytest.mark.parametrize("r", [16, 64])
def test_dora_composed_matches_float64(dtype, lead, K, N, r, monkeypatch, use_settings):
    """cublas_autograd (the composition autograd differentiates), where it runs: no dropout, grad_m
    from the saved z."""
    test_dora_matches_float64("cublas_autograd", dtype, lead, K, N, r, 0.0, "save", monkeypatch, use_settings)


# The GPU candidates of multi_lora_linear (the torch reference aside).
MULTI_LORA_BACKENDS = ["triton", "bgmv", "bgmv_one", "cuda", "cuda_overlap", "cublas_batched", "sgmv_cublas",
                       "stacked"]


def _bank(S, R, K, N, dtype, ranks, device="cuda"):
    A = torch.randn(S, R, K, device=device) / K**0.5
    B = torch.randn(S, N, R, device=device) / R**0.5
    for s, r in enumerate(ranks):
        A[s, r:] = 0
        B[s, :, r:] = 0
    return A.to(dtype), B.to(dtype)


@pytest.mark.parametrize("backend", ["torch", *MULTI_LORA_BACKENDS, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (7, 1000, 1496), (64, 4096, 4096), (256, 2048, 512),
                                   (4096, 4096, 4096)])
@pytest.mark.parametrize("n_slots", [1, 8, 32])
def test_multi_lora_matches_float64(backend, dtype, M, K, N, n_slots):
    if backend is not None and backend not in fusedpeft.backends.registered("multi_lora_linear"):
        pytest.skip(f"backend {backend} is not registered")
    ranks = [(8, 16, 32, 64)[s % 4] for s in range(n_slots)]
    A, B = _bank(n_slots, max(ranks), K, N, dtype, ranks)
    scalings = torch.rand(n_slots, device="cuda") + 0.5
    rank_t = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    idx = torch.randint(-1, n_slots, (M,), device="cuda")
    if backend in ("stacked", None):  # the serving layers' layout (the others' measured with it when auto)
        W, A = stack_bank(W, A)
    with torch.no_grad(), fusedpeft.use_backend(backend or "auto"):
        y = multi_lora_linear(x, W, bias, A, B, scalings, rank_t, idx)
    # float64 on the GPU: a 4096-cubed reference on the host's CPUs, beside 15 other workers, ran past the
    # run's time limit
    ref = multi_lora_linear_reference(x.double(), W.double(), bias.double(), A.double(), B.double(), scalings.double(),
                                      rank_t, idx)
    err = rel_err(y, ref)
    assert err <= GPU_TOL[dtype], f"{fusedpeft.last_backend('multi_lora_linear')}: {err}"


@pytest.mark.parametrize("backend", ["torch", *MULTI_LORA_BACKENDS, None])
@pytest.mark.parametrize("G,L,K,N", [(32, 128, 4096, 4096), (5, 77, 1000, 1496), (3, 1, 2048, 512)])
@pytest.mark.parametrize("n_slots", [8, 32])
def test_multi_lora_per_sequence_matches_float64(backend, G, L, K, N, n_slots):
    """A prefill as the serving layers pass it: x (sequences, tokens, K), one slot per sequence."""
    if backend is not None and backend not in fusedpeft.backends.registered("multi_lora_linear"):
        pytest.skip(f"backend {backend} is not registered")
    ranks = [(8, 16, 32, 64)[s % 4] for s in range(n_slots)]
    A, B = _bank(n_slots, max(ranks), K, N, torch.bfloat16, ranks)
    scalings = torch.rand(n_slots, device="cuda") + 0.5
    rank_t = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    x = torch.randn(G, L, K, device="cuda").to(torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    seq = torch.randint(-1, n_slots, (G,), device="cuda")
    if backend in ("stacked", None):
        W, A = stack_bank(W, A)
    with torch.no_grad(), fusedpeft.use_backend(backend or "auto"):
        y = multi_lora_linear(x, W, None, A, B, scalings, rank_t, seq)
    ref = multi_lora_linear_reference(x.double().reshape(G * L, K), W.double(), None, A.double(), B.double(),
                                      scalings.double(), rank_t, seq.repeat_interleave(L))
    err = rel_err(y.reshape(G * L, N), ref)
    assert err <= GPU_TOL[torch.bfloat16], f"{fusedpeft.last_backend('multi_lora_linear')}: {err}"


@pytest.mark.parametrize("backend", ["torch", "triton", None])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (64, 1000, 1496), (4096, 4096, 4096)])
def test_multi_ia3_matches_float64(backend, feedforward, M, K, N):
    S = 8
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    scales = (1 + 0.3 * torch.randn(S, K if feedforward else N, device="cuda")).to(torch.bfloat16)
    idx = torch.randint(-1, S, (M,), device="cuda")
    with torch.no_grad(), fusedpeft.use_backend(backend or "auto"):
        y = multi_ia3_linear(x, W, None, scales, idx, feedforward)
    ref = multi_ia3_linear_reference(x.double(), W.double(), None, scales.double(), idx, feedforward)  # float64 on the GPU
    assert rel_err(y, ref) <= GPU_TOL[torch.bfloat16]


def test_multi_lora_decode_step_captures_in_a_cuda_graph():
    """No host sync in the op on CUDA: a step captures, and replays with new indices and inputs."""
    S, R, K, N, M = 8, 16, 1024, 1024, 64
    A, B = _bank(S, R, K, N, torch.bfloat16, [R] * S)
    scalings = torch.ones(S, device="cuda")
    ranks = torch.full((S,), R, dtype=torch.int32, device="cuda")
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    W, A = stack_bank(W, A)  # the serving layers' layout: ``stacked`` runs its own GEMM, the others read views
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    idx = torch.randint(-1, S, (M,), device="cuda")
    with torch.no_grad():
        for backend in [b for b in MULTI_LORA_BACKENDS if b in fusedpeft.backends.registered("multi_lora_linear")]:
            with fusedpeft.use_backend(backend):
                multi_lora_linear(x, W, None, A, B, scalings, ranks, idx)  # warm: compile, plan
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = multi_lora_linear(x, W, None, A, B, scalings, ranks, idx)
                x.copy_(torch.randn_like(x))
                idx.copy_(torch.randint(-1, S, (M,), device="cuda"))
                graph.replay()
                expect = multi_lora_linear(x, W, None, A, B, scalings, ranks, idx)
                assert rel_err(y, expect) < 1e-2, backend


def test_graphed_calls_are_tuned_on_graph_replays(monkeypatch, use_settings):
    """With graphed=True the tuner times each candidate replayed from a CUDA graph, under a shape key
    of its own (the eager key's choice is not reused), and the pick runs correctly eagerly and
    captured."""
    from fusedpeft import tuning

    S, R, K, N, M = 8, 16, 1024, 768, 64
    A, B = _bank(S, R, K, N, torch.bfloat16, [16, 8, 4, 16, 12, 16, 2, 16])
    scalings = torch.rand(S, device="cuda") + 0.5
    ranks = torch.tensor([16, 8, 4, 16, 12, 16, 2, 16], dtype=torch.int32, device="cuda")
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    idx = torch.randint(-1, S, (M,), device="cuda")
    replays = []
    real_graphed = tuning.graphed
    monkeypatch.setattr(tuning, "graphed", lambda fn: replays.append(1) or real_graphed(fn))
    use_settings(cache_dir="")  # measured here, whatever a tuning file holds
    tuning.clear()
    try:
        with torch.no_grad():
            multi_lora_linear(x, W, None, A, B, scalings, ranks, idx)
            assert not replays  # eager key: eager timings
            y = multi_lora_linear(x, W, None, A, B, scalings, ranks, idx, graphed=True)
    finally:
        tuning.clear()  # later tests read the file again
    graphed_keys = [entry["key"] for entry in tuning.LOG if "graphed" in entry["key"]]
    assert graphed_keys and replays, "the graphed call measured nothing as graph replays"
    assert len(replays) >= 2  # every candidate, not one
    expect = multi_lora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), scalings.double(),
                                         ranks, idx)
    assert rel_err(y, expect) < 1e-2
    with pytest.raises(TypeError, match="graphed"):
        multi_lora_linear(x, W, None, A, B, scalings, ranks, idx, graphed="yes")


@pytest.mark.parametrize("backend", ["cublas_batched", "sgmv_cublas"])
def test_grouped_capture_follows_the_bank_at_replay(backend):
    """A prefill (one slot per sequence) through a grouped backend captured in a CUDA graph, then the
    bank rewritten in place (a slot's rank and scaling, as loading an adapter does) and the graph
    replayed: the replay reads the bank as it is then, as eager does."""
    S, R, K, N, G, L = 4, 16, 512, 384, 6, 32
    ranks_list = [16, 8, 4, 16]
    A, B = _bank(S, R, K, N, torch.bfloat16, ranks_list)
    A[1, 8:] = 0.5  # non-zero past slot 1's rank: it counts only once the rank grows
    scalings = torch.rand(S, device="cuda") + 0.5
    ranks = torch.tensor(ranks_list, dtype=torch.int32, device="cuda")
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    x = torch.randn(G, L, K, device="cuda").to(torch.bfloat16)
    seq = torch.tensor([1, 3, -1, 0, 1, 2], device="cuda")
    with torch.no_grad(), fusedpeft.use_backend(backend):
        multi_lora_linear(x, W, None, A, B, scalings, ranks, seq)  # warm: kept tables, cuBLAS plans, compiles
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = multi_lora_linear(x, W, None, A, B, scalings, ranks, seq)
        ranks[1].fill_(16)
        scalings[3].fill_(-2.0)
        graph.replay()
        expect = multi_lora_linear(x, W, None, A, B, scalings, ranks, seq)
        torch.cuda.synchronize()
    assert rel_err(y, expect) < 1e-2
