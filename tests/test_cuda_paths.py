"""GPU checks of every path the measured dispatch may pick (marked cuda; skipped without a GPU):
a seeded sweep of LoRA shapes through the triton and cublas backends against float64, the
measured choice itself, dropout under CUDA graphs, and torch.compile's cudagraph mode."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fusedpeft
from fusedpeft import tuning
from fusedpeft.ops import lora as lora_ops
from fusedpeft.ops import lora_linear

from helpers import RescaledMLP, check_lora_against_float64, rel_err

pytestmark = pytest.mark.cuda

PATHS = ["triton", "cublas", "cublas_after", "cublas_autograd"]  # the tunable backends of lora_linear on CUDA


def _sweep_shapes(count=56, seed=1234, max_work=2**36):
    """A fixed draw of (M, K, N, r, dtype, dropout): M 1..16384, K and N 8..16384 log-uniform
    (a third of them off multiples of 8), r from 1 to 256; M*K*N capped so the float64 reference
    stays quick. The inputs of each case are fresh random draws every run."""
    gen = torch.Generator().manual_seed(seed)

    def log_uniform(lo, hi):
        return int(round(float(torch.exp(torch.empty(1).uniform_(0, 1, generator=gen) * (torch.log(torch.tensor(hi / lo)))) * lo)))

    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    ranks = [1, 8, 16, 32, 64, 128, 256]
    shapes = []
    while len(shapes) < count:
        M, K, N = log_uniform(1, 16384), log_uniform(8, 16384), log_uniform(8, 16384)
        if torch.rand(1, generator=gen).item() < 0.67:  # most real layers: multiples of 8
            K, N = max(8, K // 8 * 8), max(8, N // 8 * 8)
        if M * K * N > max_work:
            continue
        r = ranks[int(torch.randint(len(ranks), (1,), generator=gen))]
        dtype = dtypes[len(shapes) % 3]
        dropout = 0.1 if len(shapes) % 2 else 0.0
        shapes.append((M, K, N, r, dtype, dropout))
    # The shapes of the four model families' layers at 2048 tokens, bf16, r = 16, with dropout.
    for K, N in [(4096, 1024), (14336, 4096), (2048, 512), (896, 128), (896, 4864), (3072, 9216), (8192, 3072)]:
        shapes.append((2048, K, N, 16, torch.bfloat16, 0.05))
    return shapes


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("M,K,N,r,dtype,dropout", _sweep_shapes(),
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, float) else f"p{v}")
def test_lora_sweep_every_path_matches_float64(M, K, N, r, dtype, dropout, backend, monkeypatch):
    check_lora_against_float64((M,), K, N, r, dtype, dropout, True, monkeypatch, backend)


def test_lora_fp32_large_backward_runs_in_a_fresh_process():
    """fp32, M = 8192, K = N = 5120, r = 16, every tile config tuned: once an illegal memory
    access (a sticky CUDA error), so it runs in its own process."""
    code = (
        "import torch, fusedpeft\n"
        "from fusedpeft.ops import lora_linear, lora_linear_reference\n"
        "d = 'cuda'\n"
        "x = torch.randn(8192, 5120, device=d, requires_grad=True)\n"
        "W = torch.randn(5120, 5120, device=d) / 5120**0.5\n"
        "A = (torch.randn(16, 5120, device=d) / 5120**0.5).requires_grad_()\n"
        "B = (torch.randn(5120, 16, device=d) / 4).requires_grad_()\n"
        "for backend in ('triton', 'cublas'):\n"
        "    with fusedpeft.use_backend(backend):\n"
        "        y = lora_linear(x, W, None, A, B, 0.5, dropout_p=0.1, training=True)\n"
        "    y.backward(torch.randn_like(y))\n"
        "    torch.cuda.synchronize()\n"
        "    assert torch.isfinite(x.grad).all() and torch.isfinite(A.grad).all()\n"
        "    x.grad = A.grad = B.grad = None\n"
        "print('ok')\n"
    )
    env = {**os.environ, "FUSEDPEFT_AUTOTUNE": "1", "FUSEDPEFT_CACHE_DIR": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_measured_dispatch_runs_the_winner_forward_and_backward(tmp_path, use_settings):
    use_settings(cache_dir=str(tmp_path), autotune=True)
    tuning.clear()
    x = torch.randn(1024, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # K not a multiple of 8
    W = torch.randn(520, 1000, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 1000, device="cuda", requires_grad=True)
    B = torch.randn(520, 16, device="cuda", requires_grad=True)
    before = len(tuning.LOG)
    y = lora_linear(x, W, None, A, B, 2.0, dropout_p=0.05, training=True)
    winner = fusedpeft.last_backend("lora_linear")
    entry = tuning.LOG[before]
    assert set(entry["ms"]) == set(PATHS) and entry["winner"] == winner
    assert entry["ms"][winner] == min(entry["ms"].values())
    counts = fusedpeft.backend_counts()
    y.float().square().mean().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()
    # A second call takes the stored winner without measuring; so does a fresh process's memory.
    lora_linear(x, W, None, A, B, 2.0, dropout_p=0.05, training=True)
    assert len(tuning.LOG) == before + 1 and fusedpeft.last_backend("lora_linear") == winner
    assert fusedpeft.backend_counts()[("lora_linear", winner)] == counts[("lora_linear", winner)] + 1
    tuning.clear()
    lora_linear(x, W, None, A, B, 2.0, dropout_p=0.05, training=True)
    assert len(tuning.LOG) == before + 1, "the winner was not read back from disk"
    tuning.clear()


@pytest.mark.parametrize("backend", PATHS)
def test_cuda_graph_replays_draw_new_masks_and_match_eager(backend, monkeypatch):
    """A captured training step, replayed, draws a new dropout seed (and so a new mask) at every
    replay, and its gradients equal an eager step's given the same seed."""
    torch.manual_seed(0)
    layer = fusedpeft.LoraLinear(nn.Linear(256, 384).cuda().bfloat16(), r=8, lora_alpha=16, lora_dropout=0.3,
                                 init_lora_weights=False).cuda().train()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(96, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(96, 384, device="cuda", dtype=torch.bfloat16)
    seeds = []
    real_seed = lora_ops._new_seed

    def recording_seed(device):
        seeds.append(real_seed(device))
        return seeds[-1]

    monkeypatch.setattr(lora_ops, "_new_seed", recording_seed)

    def step():
        for t in [x, *params]:
            t.grad = None
        with fusedpeft.use_backend(backend):
            layer(x).backward(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compilation and tuning
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in [x, *params]:
        t.grad = None
    with torch.cuda.graph(graph):
        with fusedpeft.use_backend(backend):
            layer(x).backward(g)
    captured_seed = seeds[-1]
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((int(captured_seed.item()), [t.grad.clone() for t in [x, *params]]))
    assert replays[0][0] != replays[1][0], "a replay reused the captured seed"
    assert rel_err(replays[0][1][1], replays[1][1][1]) > 1e-3, "new seeds but the same mask"
    for seed, grads in replays:
        monkeypatch.setattr(lora_ops, "_new_seed", lambda device, s=seed: torch.tensor([s], device=device))
        step()
        for got, want in zip(grads, [t.grad for t in [x, *params]]):
            assert rel_err(got, want) < 1e-3


def _curve(model_fn, steps, compiled, lr, dropout_model=True):
    torch.manual_seed(11)
    model = model_fn()
    run = torch.compile(model, mode="reduce-overhead") if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator(device="cuda").manual_seed(5)
    target = torch.randn(256, 64, device="cuda", generator=gen)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 256, device="cuda", generator=gen)
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        loss = (run(x.bfloat16()).float() - torch.tanh(x @ target)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def _lora_mlp():
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64))
    model = model.to("cuda", torch.bfloat16)
    return fusedpeft.inject(model, fusedpeft.LoraConfig(r=16, lora_alpha=32, target_modules=["0", "2", "4"],
                                                        lora_dropout=0.1, init_lora_weights=False)).train()


def _ia3_mlp():
    model = RescaledMLP(sizes=(256, 512, 256, 64), spread=0.1, shift_spread=0.1, act=torch.nn.functional.gelu).to("cuda")
    for layer in (model.l1, model.l2, model.l3):
        layer.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("model_fn,lr", [(_lora_mlp, 1e-3), (_ia3_mlp, 1e-2)], ids=["lora-dropout", "ia3-ssf"])
def test_reduce_overhead_compile_trains_like_eager(model_fn, lr):
    eager = _curve(model_fn, 12, compiled=False, lr=lr)
    compiled = _curve(model_fn, 12, compiled=True, lr=lr)
    assert eager[-1] < eager[0], "loss did not fall"
    # Dropout masks differ between the two runs (the compiled graph draws its seeds itself).
    assert rel_err(compiled, eager) < 2e-2, (compiled, eager)


@pytest.mark.parametrize("backend", [None, *PATHS], ids=lambda b: b or "auto")
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_training_step_never_waits_for_the_gpu(backend, dropout, tmp_path, monkeypatch, use_settings):
    """After warm-up, a LoRA module's training step (the measured choice included) launches work
    and returns without any host-device synchronisation: a sync would drain the GPU's queue at
    every layer."""
    use_settings(cache_dir=str(tmp_path), autotune=True)  # the automatic choice measures in the warm-up
    layer = fusedpeft.LoraLinear(nn.Linear(1024, 512).cuda().bfloat16(), r=16, lora_alpha=32, lora_dropout=dropout,
                                 init_lora_weights=False).cuda().train()
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)

    def step():
        if backend is None:
            layer(x).backward(g)
        else:
            with fusedpeft.use_backend(backend):
                layer(x).backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
