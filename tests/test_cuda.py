"""GPU checks of the Triton backend at real sizes (marked cuda; skipped without a GPU). Run on the
device with: python -m pytest -q -m cuda tests/test_cuda.py"""
import pytest
import torch
from torch import nn

import fusedpeft
from fusedpeft.ops import lora_linear, lora_linear_reference

from helpers import GPU_TOL, RescaledMLP, check_lora_against_float64, leaf, rel_err

pytestmark = pytest.mark.cuda

def _run(lead, K, N, r, dtype, dropout, bias, monkeypatch, backend="triton"):
    check_lora_against_float64(lead, K, N, r, dtype, dropout, bias, monkeypatch, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead,K,N", [((512,), 1024, 768), ((3, 111), 1000, 1496), ((77,), 4095, 513), ((1,), 4096, 4096), ((16,), 4096, 4096)])
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_lora_matches_float64(lead, K, N, r, dtype, dropout, monkeypatch):
    _run(lead, K, N, r, dtype, dropout, bias=True, monkeypatch=monkeypatch)


# peft's default adapters: float32 A and B beside a bf16 layer, through every LoRA backend (the Triton
# reductions write their gradients in float32), at M below and above K.
@pytest.mark.parametrize("backend", ["triton", "cublas", "cublas_after", "cublas_autograd"])
@pytest.mark.parametrize("lead,K,N", [((3, 111), 1000, 1496), ((2048,), 1024, 512)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_float32_adapters_beside_bf16(backend, lead, K, N, dropout, monkeypatch):
    check_lora_against_float64(lead, K, N, 16, torch.bfloat16, dropout, True, monkeypatch, backend,
                               adapter_dtype=torch.float32)


# Ranks up to 256 (r = 100: BLOCK_R padding), at decode size (the split schedule above r = 64)
# and at large M, where the rank-r epilogue tiles compete with the main loop for shared memory.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("lead,K,N", [((16,), 2048, 1536), ((3, 111), 1000, 1496)])
@pytest.mark.parametrize("r", [100, 256])
def test_triton_lora_large_ranks(lead, K, N, r, dtype, monkeypatch):
    _run(lead, K, N, r, dtype, 0.1, bias=True, monkeypatch=monkeypatch)


# The LoRA term at large M (the split schedule), its lr / q tiles by pointer and by descriptor,
# r = 16 (descriptor-sized) and r = 40 (BLOCK_R padding), with dropout.
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("r", [16, 40])
def test_triton_lora_term_by_pointer_and_by_descriptor(tma, r, monkeypatch, use_settings):
    use_settings(lowrank_tma=tma)
    _run((3, 111), 1000, 1496, r, torch.bfloat16, 0.1, bias=True, monkeypatch=monkeypatch)
    _run((300,), 520, 640, r, torch.float32, 0.0, bias=False, monkeypatch=monkeypatch)


@pytest.mark.parametrize("use_desc", [True, False])
def test_descriptor_and_pointer_paths(use_desc, monkeypatch, use_settings):
    use_settings(tensor_descriptors=use_desc)
    _run((300,), 512, 640, 8, torch.bfloat16, 0.1, bias=False, monkeypatch=monkeypatch)


def test_triton_is_default_on_cuda():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    lora_linear(x, W, None, torch.randn(4, 64, device="cuda"), torch.randn(32, 4, device="cuda"), 1.0)
    assert fusedpeft.last_backend("lora_linear") == "triton"


def _tiny_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64))
    model = model.to("cuda", torch.bfloat16)
    return fusedpeft.inject(model, fusedpeft.LoraConfig(r=16, lora_alpha=32, target_modules=["0", "2", "4"], init_lora_weights=False))


def test_compile_fullgraph_cuda():
    model = _tiny_model(0).train()
    x = torch.randn(8, 33, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.float().square().mean().backward()
    y_eager = model(x.detach())
    assert rel_err(y, y_eager) < 1e-2
    assert fusedpeft.last_backend("lora_linear") == "triton"


def _loss_curve(model, backend, lr, data_seed, steps=20, device="cuda"):
    """Losses of `steps` AdamW steps fitting tanh(x @ M) on fresh random x (fed to the model in
    bf16), all under one backend."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator(device=device).manual_seed(data_seed)
    target_map = torch.randn(256, 64, device=device, generator=gen)
    losses = []
    with fusedpeft.use_backend(backend):
        for _ in range(steps):
            x = torch.randn(64, 256, device=device, generator=gen)
            loss = (model(x.bfloat16()).float() - torch.tanh(x @ target_map)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return torch.tensor(losses)


def _assert_curves_match(curves):
    assert curves["triton"][-1] < curves["triton"][0], "loss did not fall"
    assert rel_err(curves["triton"], curves["torch"]) < 2e-2, curves


def test_training_loss_curve_matches_torch_backend():
    _assert_curves_match({backend: _loss_curve(_tiny_model(1).train(), backend, lr=1e-3, data_seed=2)
                          for backend in ("torch", "triton")})


def test_cached_launches_follow_the_specialisation(monkeypatch):
    """Repeated calls reuse compiled kernels (FAST_LAUNCH); sizes that change Triton's
    specialisation (M divisible by 16 or not, misaligned views) must get their own kernel."""
    dev, dt = "cuda", torch.bfloat16
    W = torch.randn(640, 512, device=dev, dtype=dt) / 512**0.5
    A = (torch.randn(16, 512, device=dev) / 512**0.5).to(dt)
    B = torch.randn(640, 16, device=dev).to(dt)
    for M in (128, 130, 128, 96, 97, 1, 16, 129, 128):
        for offset in (0, 1):
            x = torch.randn(M * 512 + 1, device=dev, dtype=dt)[offset:offset + M * 512].view(M, 512)
            with fusedpeft.use_backend("triton"):
                y = lora_linear(x, W, None, A, B, 0.5)
            ref = lora_linear_reference(*(t.double() for t in (x, W)), None, A.double(), B.double(), 0.5)
            assert rel_err(y, ref) < GPU_TOL[dt], (M, offset)


# ----------------------------------------------------------------------------- IA3 / SSF
RESCALE_KINDS = ["ia3_out", "ia3_ff", "ssf"]


def _rescale_case(kind, lead, K, N, dtype, dev="cuda"):
    from fusedpeft.ops import ia3_linear, ssf_linear

    x = leaf(torch.randn(*lead, K, device=dev), dtype)
    W = leaf(torch.randn(N, K, device=dev) / K**0.5, dtype, requires_grad=False)
    b = leaf(torch.randn(N, device=dev), dtype)
    size = K if kind == "ia3_ff" else N
    scale = leaf(1 + 0.5 * torch.randn(size, device=dev), dtype)
    shift = leaf(torch.randn(N, device=dev), dtype) if kind == "ssf" else None
    if kind == "ssf":
        return (x, W, b, scale, shift), lambda x, W, b, s, t: ssf_linear(x, W, b, s, t)
    return (x, W, b, scale), lambda x, W, b, s: ia3_linear(x, W, b, s, kind == "ia3_ff")


@pytest.mark.parametrize("kind", RESCALE_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead,K,N", [((512,), 1024, 768), ((3, 111), 1000, 1496), ((77,), 4095, 513), ((1,), 4096, 4096), ((16,), 4096, 4096)])
@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_triton_rescale_matches_float64(kind, dtype, lead, K, N, grad_mode, use_settings):
    use_settings(output_scale_grad=grad_mode)
    _check_rescale(kind, dtype, lead, K, N)


# The scale vector of the register-scaled loop and the aux tiles (z saved / read) by pointer as
# well as by descriptor (the default where the tensors allow, as at these sizes).
@pytest.mark.parametrize("kind", RESCALE_KINDS)
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_triton_rescale_by_pointer_and_by_descriptor(kind, tma, grad_mode, use_settings):
    use_settings(rescale_tma=tma, output_scale_grad=grad_mode)
    _check_rescale(kind, torch.bfloat16, (3, 100), 1024, 1536)
    _check_rescale(kind, torch.float32, (300,), 520, 648)


def _all_candidates():
    from fusedpeft._kernels import triton_kernels

    return [(M, i) for M in (48, 300) for i in range(len(triton_kernels.configs.candidates(M, 1024, 2)))]


# Every tile config the tuner may pick for the register-scaled loops, bf16, at M <= 64 and at large
# M: the loop form (pipelined or serialised) follows the config, and a pipelined loop that reused
# an in-flight wgmma's registers would show here as wrong results. Every launch of the layer (all
# M x 1024 outputs, so one candidate list) takes the config.
@pytest.mark.parametrize("M,index", _all_candidates())
@pytest.mark.parametrize("kind", ["ia3_ff", "ia3_out"])
def test_triton_rescale_every_tile_config(M, index, kind, use_settings):
    use_settings(tile_config=index, output_scale_grad="recompute")
    try:
        _check_rescale(kind, torch.bfloat16, (M,), 1024, 1024)
    except fusedpeft._kernels.triton_kernels.configs.ForcedConfigDoesNotFit as exc:
        # A scale gradient computed as a GEMM reduced against a saved operand stages both operands:
        # a config the tuner skips for that launch is refused by name. The output scale's gradient
        # can read the saved z instead (the rest of the layer then runs under the config); the
        # input scale's always takes that GEMM, so there the config can run the forward only.
        assert "rescale_reduce_kernel" in str(exc) and "shared memory" in str(exc), exc
        if kind == "ia3_out":
            use_settings(tile_config=index, output_scale_grad="save")
        _check_rescale(kind, torch.bfloat16, (M,), 1024, 1024, backward=kind == "ia3_out")


def _check_rescale(kind, dtype, lead, K, N, backward=True):
    tensors, fn = _rescale_case(kind, lead, K, N, dtype)
    op = "ssf_linear" if kind == "ssf" else "ia3_linear"
    with fusedpeft.use_backend("triton"):
        y = fn(*tensors)
    assert fusedpeft.last_backend(op) == "triton"
    g = torch.randn_like(y)
    refs = [leaf(t, torch.float64) for t in tensors]
    y_ref = fn(*refs)  # the torch backend in float64 is the reference formula
    if backward:
        y.backward(g)
        y_ref.backward(g.double())
    errs = {"y": rel_err(y, y_ref)}
    for i, (t, ref) in enumerate(zip(tensors, refs)):
        if backward and t.requires_grad:
            errs[f"grad_{i}"] = rel_err(t.grad, ref.grad)
    bad = {k: v for k, v in errs.items() if not v <= GPU_TOL[dtype]}
    assert not bad, f"{kind} {dtype} errors over {GPU_TOL[dtype]}: {bad}"


def test_triton_is_default_on_cuda_for_rescaling():
    for kind in RESCALE_KINDS:
        tensors, fn = _rescale_case(kind, (4,), 64, 32, torch.bfloat16)
        fn(*tensors)
        assert fusedpeft.last_backend("ssf_linear" if kind == "ssf" else "ia3_linear") == "triton", kind


def _rescaled_mlp(seed=3):
    torch.manual_seed(seed)
    model = RescaledMLP(sizes=(256, 512, 256, 64), spread=0.1, shift_spread=0.1, act=torch.nn.functional.gelu).to("cuda")
    for layer in (model.l1, model.l2, model.l3):
        layer.to(torch.bfloat16)
    return model


def test_rescale_compile_and_training_curve_match_torch_backend():
    curves = {backend: _loss_curve(_rescaled_mlp(), backend, lr=1e-2, data_seed=4) for backend in ("torch", "triton")}
    _assert_curves_match(curves)
    model = _rescaled_mlp()
    x = torch.randn(8, 33, 256, device="cuda", dtype=torch.bfloat16)
    with fusedpeft.use_backend("triton"):
        y = torch.compile(model, fullgraph=True)(x)
        assert rel_err(y, model(x)) < 1e-2
