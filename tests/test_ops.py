"""Every op against its float64 reference: output and every gradient, over ragged shapes, 3-D input,
M=0 and M=1, fp32 and bf16, each backend the op has."""
import re

import pytest
import torch

import fusedpeft
from fusedpeft import tuning
from fusedpeft.ops import (
    ia3_linear, ia3_linear_reference, lora_linear, lora_linear_reference, ssf_linear, ssf_linear_reference,
)

from helpers import BACKENDS, TOL, assert_close, backend_mask, leaf, lora_upstream_grad, pin_dropout_seed

# (leading shape of x, K, N): sizes off any block multiple, 3-D input, M=1 and M=0.
SHAPES = [((37,), 40, 24), ((1,), 33, 47), ((0,), 40, 24), ((2, 5), 24, 40), ((19,), 72, 8)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(lead, K, N, dtype, bias):
    x = leaf(torch.randn(*lead, K), dtype)
    W = leaf(torch.randn(N, K) / K**0.5, dtype)
    b = leaf(torch.randn(N), dtype) if bias else None
    return x, W, b


def _check_grads(names, tensors, refs, dtype, what):
    for name, t, r in zip(names, tensors, refs):
        if t is not None:
            assert t.grad is not None, f"{what}: no gradient for {name}"
            assert_close(t.grad, r.grad, dtype, f"{what} grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS["lora_linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_matches_reference(backend, dtype, lead, K, N, r, bias, dropout, monkeypatch):
    _check_lora(backend, dtype, lead, K, N, r, bias, dropout, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS["lora_linear"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_with_a_frozen_input_matches_reference(backend, dropout, monkeypatch):
    """x without a gradient (the first adapted layer over frozen embeddings): the adapter's
    gradients come without grad_x's GEMM, and match the reference."""
    _check_lora(backend, torch.float32, (37,), 40, 24, 8, True, dropout, monkeypatch, x_grad=False)


@pytest.mark.parametrize("backend", BACKENDS["lora_linear"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_float32_adapters_beside_a_bf16_base(backend, dropout, monkeypatch):
    """peft's default: float32 A and B beside a bf16 layer. Their gradients come back in float32
    (written so by the reductions that can, cast by the Function otherwise) and match."""
    _check_lora(backend, torch.bfloat16, (2, 19), 40, 24, 8, True, dropout, monkeypatch, adapter_dtype=torch.float32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS["lora_linear"] if b != "torch"])
def test_lora_reductions_write_adapter_grads_in_the_dtype_asked(backend):
    """The Triton reductions store grad_A (and grad_B where they compute it) in the dtype the
    Function would cast them to: the same values as in the compute dtype, no cast launched."""
    from fusedpeft import backends

    x, W, _ = _inputs((33,), 40, 24, torch.bfloat16, False)
    with fusedpeft.use_backend(backend):
        name, impl = backends.select("lora_linear", x, W, record=False)
    assert name == backend
    A, B = torch.randn(8, 40).bfloat16(), torch.randn(24, 8).bfloat16()
    seed = torch.tensor([1234])
    _, saved = impl.forward(x, W, None, A, B, 1.5, 0.3, seed)
    g = torch.randn(33, 24).bfloat16()
    needs = (True, False, False, True, True)
    plain = impl.backward(g, x, W, A, B, 1.5, 0.3, seed, needs, saved)
    wide = impl.backward(g, x, W, A, B, 1.5, 0.3, seed, needs, saved, (torch.float32, torch.float32))
    assert wide[3].dtype == torch.float32  # grad_A: a Triton reduction in every backend with dropout
    assert wide[4].dtype == torch.float32  # grad_B: Triton's reduction, or cuBLAS's product_in
    assert_close(wide[3], plain[3].double(), torch.bfloat16, f"{backend} grad_A")
    assert_close(wide[4], plain[4].double(), torch.bfloat16, f"{backend} grad_B")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, None), (torch.float32, torch.float32),
                                             (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("alpha", [1.0, -0.75])
def test_product_in_writes_the_dtype_asked(device, dtype, out_dtype, alpha):
    """alpha * (a @ b) in the dtype asked: from cuBLAS directly for 16-bit operands into float32 on
    CUDA, a product and a cast elsewhere; against float64, with an empty inner dimension too."""
    from fusedpeft.ops._common import product_in

    for inner in (37, 0):
        a = torch.randn(9, inner, device=device).to(dtype)
        b = torch.randn(inner, 13, device=device).to(dtype)
        like = torch.full((9, 13), float("nan"), device=device, dtype=dtype)  # beta = 0: never read
        got = product_in(out_dtype, a, b, alpha, shape_like=like)
        assert got.dtype == (out_dtype or dtype) and got.shape == (9, 13)
        coarse = dtype if TOL[dtype] >= TOL[out_dtype or dtype] else out_dtype
        assert_close(got, alpha * (a.double() @ b.double()), coarse, f"product_in {dtype}->{out_dtype}")
    with pytest.raises(ValueError, match="shape_like"):
        product_in(out_dtype, a, b, 2.0)


def _check_lora(backend, dtype, lead, K, N, r, bias, dropout, monkeypatch, x_grad=True, adapter_dtype=None):
    x, W, b = _inputs(lead, K, N, dtype, bias)
    x.requires_grad_(x_grad)
    A = leaf(torch.randn(r, K) / K**0.5, adapter_dtype or dtype)
    B = leaf(torch.randn(N, r) / r**0.5, adapter_dtype or dtype)  # never B = 0: that would hide the low-rank path
    scaling = 1.7
    seed = pin_dropout_seed(monkeypatch)
    with fusedpeft.use_backend(backend):
        y = lora_linear(x, W, b, A, B, scaling, dropout_p=dropout, training=True)
    assert fusedpeft.last_backend("lora_linear") == backend
    g = lora_upstream_grad(y, B)
    y.backward(g)

    mask = backend_mask("lora_linear", backend, seed, x, dropout)
    refs = [leaf(t, torch.float64) if t is not None else None for t in (x, W, b, A, B)]
    y_ref = lora_linear_reference(*refs, scaling, dropout_mask=mask, dropout_p=dropout)
    y_ref.backward(g.double())
    what = f"lora[{backend}]"
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert_close(y, y_ref, dtype, what)
    _check_grads("xWbAB", (x if x_grad else None, W, b, A, B), refs, dtype, what)
    assert x_grad or x.grad is None
    assert A.grad.dtype == A.dtype and B.grad.dtype == B.dtype, (A.grad.dtype, B.grad.dtype)


# The distinct dropout masks: cublas and cublas_after draw the triton backend's (test_tuning.py,
# test_tunable_backends_with_dropout_draw_the_triton_mask), so their statistics are these.
MASK_BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("shape, p", [((64, 160), 0.25), ((37, 51), 0.05), ((37, 51), 0.9)])
@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_dropout_mask_keeps_one_minus_p(backend, shape, p):
    """Each element is kept with probability 1 - p, independently of its neighbours (which share
    one random word in some backends), and the mask is a function of the seed."""
    from fusedpeft import backends

    impl = backends._REGISTRY["lora_linear"][backend].impl()
    mask = impl.dropout_mask(1234, shape, p, torch.device("cpu"))
    n = mask.numel()
    assert mask.shape == shape and set(mask.unique().tolist()) <= {0.0, 1.0}
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(mask.mean().item() - (1 - p)) < 5 * sigma + 2**-8  # within noise of p's rounding
    # Neighbours agree with probability p^2 + (1-p)^2 when independent (1 if one were copied).
    flat = mask.flatten()
    agree = (flat[1:] == flat[:-1]).double().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * (0.25 / (n - 1)) ** 0.5 + 2**-7
    assert torch.equal(mask, impl.dropout_mask(1234, shape, p, torch.device("cpu"))), "mask not a function of the seed"
    assert not torch.equal(mask, impl.dropout_mask(1235, shape, p, torch.device("cpu")))


def test_lora_dropout_off_at_eval_and_fresh_mask_per_call():
    x, W, b = _inputs((50,), 32, 16, torch.float64, True)
    A, B = leaf(torch.randn(4, 32), torch.float64), leaf(torch.randn(16, 4), torch.float64)
    y_eval = lora_linear(x, W, b, A, B, 2.0, dropout_p=0.5, training=False)
    assert_close(y_eval, lora_linear_reference(x, W, b, A, B, 2.0), torch.float64, "eval ignores dropout")
    y1 = lora_linear(x, W, b, A, B, 2.0, dropout_p=0.5, training=True)
    y2 = lora_linear(x, W, b, A, B, 2.0, dropout_p=0.5, training=True)
    assert not torch.equal(y1, y2), "two training calls drew the same dropout mask"


@pytest.mark.parametrize("backend", BACKENDS["ia3_linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
# The save / recompute choice exists for output scaling only; input scaling has one backward.
@pytest.mark.parametrize("feedforward,grad_mode", [(False, "save"), (False, "recompute"), (True, "save")])
@pytest.mark.parametrize("bias", [True, False])
def test_ia3_linear_matches_reference(backend, dtype, lead, K, N, feedforward, bias, grad_mode, monkeypatch, use_settings):
    use_settings(output_scale_grad=grad_mode)
    x, W, b = _inputs(lead, K, N, dtype, bias)
    scale = leaf(torch.randn(K if feedforward else N), dtype)  # never all ones
    with fusedpeft.use_backend(backend):
        y = ia3_linear(x, W, b, scale, feedforward)
    assert fusedpeft.last_backend("ia3_linear") == backend
    g = torch.randn_like(y)
    y.backward(g)
    refs = [leaf(t, torch.float64) if t is not None else None for t in (x, W, b, scale)]
    y_ref = ia3_linear_reference(*refs, feedforward)
    y_ref.backward(g.double())
    what = f"ia3[{backend}, ff={feedforward}, {grad_mode}]"
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert_close(y, y_ref, dtype, what)
    _check_grads(("x", "W", "b", "l"), (x, W, b, scale), refs, dtype, what)


@pytest.mark.parametrize("backend", BACKENDS["ssf_linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_ssf_linear_matches_reference(backend, dtype, lead, K, N, bias, grad_mode, monkeypatch, use_settings):
    use_settings(output_scale_grad=grad_mode)
    x, W, b = _inputs(lead, K, N, dtype, bias)
    scale = leaf(1.0 + 0.5 * torch.randn(N), dtype)  # never the identity init
    shift = leaf(torch.randn(N), dtype)
    with fusedpeft.use_backend(backend):
        y = ssf_linear(x, W, b, scale, shift)
    assert fusedpeft.last_backend("ssf_linear") == backend
    g = torch.randn_like(y)
    y.backward(g)
    refs = [leaf(t, torch.float64) if t is not None else None for t in (x, W, b, scale, shift)]
    y_ref = ssf_linear_reference(*refs)
    y_ref.backward(g.double())
    what = f"ssf[{backend}, {grad_mode}]"
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert_close(y, y_ref, dtype, what)
    _check_grads(("x", "W", "b", "scale", "shift"), (x, W, b, scale, shift), refs, dtype, what)


@pytest.mark.parametrize("backend", BACKENDS["ssf_linear"])
@pytest.mark.parametrize("kind", ["ia3-out", "ia3-ff", "ssf"])
def test_rescale_grads_in_the_float32_of_the_scale(backend, kind, use_settings):
    """A float32 scale (and shift) beside a bf16 layer: its gradient is a float32 column sum, rounded
    once to float32 by the backend (not to bf16 and back), and matches float64."""
    use_settings(output_scale_grad="recompute")
    x, W, b = _inputs((2, 19), 40, 24, torch.bfloat16, True)
    W.requires_grad_(False)
    ff = kind == "ia3-ff"
    scale = leaf(1.0 + 0.5 * torch.randn(40 if ff else 24))
    shift = leaf(torch.randn(24)) if kind == "ssf" else None
    call = (lambda *t: ssf_linear(*t)) if kind == "ssf" else (lambda *t: ia3_linear(*t, ff))
    args = (x, W, b, scale) + ((shift,) if shift is not None else ())
    with fusedpeft.use_backend(backend):
        y = call(*args)
    g = torch.randn_like(y)
    y.backward(g)
    refs = [leaf(t, torch.float64) for t in args]
    call(*refs).backward(g.double())
    for name, t, ref in zip(("x", "W", "b", "scale", "shift"), args, refs):
        if t.requires_grad:
            assert t.grad.dtype == t.dtype, (name, t.grad.dtype)
            assert_close(t.grad, ref.grad, torch.bfloat16, f"{kind}[{backend}] grad_{name}")
    # The backend itself writes them in float32 when asked (no cast after it).
    from fusedpeft import backends

    with fusedpeft.use_backend(backend):
        _, impl = backends.select("ssf_linear" if kind == "ssf" else "ia3_linear", x, W, record=False)
    x2 = x.detach().reshape(-1, 40)
    grads = impl.backward(g.reshape(-1, 24), x2, W, b.detach(), scale.detach().bfloat16(),
                          None if shift is None else shift.detach().bfloat16(), ff, None,
                          (False, False, False, True, shift is not None), (torch.float32, torch.float32))
    assert grads[3].dtype == torch.float32 and (shift is None or grads[4].dtype == torch.float32)


def _saved(y):
    node = y.grad_fn
    while not hasattr(node, "saved_tensors"):  # past the reshape back to x's leading shape
        node = node.next_functions[0][0]
    return node.saved_tensors


@pytest.mark.parametrize("op", ["ia3", "ssf"])
def test_rescale_saves_z_only_when_asked(op, monkeypatch, use_settings):
    """'save' keeps the unscaled output (M x N) for the backward; 'recompute' keeps nothing of
    that size; a frozen scale keeps nothing either."""
    from fusedpeft.ops import _rescale

    x, W, b = _inputs((6,), 8, 5, torch.float32, True)
    scale, shift = leaf(torch.randn(5)), leaf(torch.randn(5))
    call = (lambda: ia3_linear(x, W, b, scale, False)) if op == "ia3" else (lambda: ssf_linear(x, W, b, scale, shift))
    for mode, expect in (("save", True), ("recompute", False)):
        use_settings(output_scale_grad=mode)
        saved = [t for t in _saved(call()) if t is not None]
        assert any(t.shape == (6, 5) for t in saved) == expect, mode
    with pytest.raises(ValueError, match="FUSEDPEFT_OUTPUT_SCALE_GRAD"):
        use_settings(output_scale_grad="sometimes")
    use_settings(output_scale_grad="save")
    scale.requires_grad_(False)
    shift.requires_grad_(False)
    assert not any(t is not None and t.shape == (6, 5) for t in _saved(call()))
    assert _rescale.output_grad_mode() == "save"


def test_float32_adapter_beside_bf16_base_gets_float32_grads():
    x, W, b = _inputs((9,), 24, 16, torch.bfloat16, True)
    W.requires_grad_(False)
    A, B = leaf(torch.randn(4, 24)), leaf(torch.randn(16, 4))
    y = lora_linear(x, W, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert W.grad is None
    ref = lora_linear_reference(*(t.detach().double() for t in (x, W, b, A, B)), 0.5)
    assert_close(y, ref, torch.bfloat16, "mixed dtypes")


def test_autocast_runs_in_autocast_dtype():
    x, W, b = _inputs((7,), 16, 12, torch.float32, True)
    A, B = leaf(torch.randn(2, 16)), leaf(torch.randn(12, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 1.0)
        z = ia3_linear(x, W, b, leaf(torch.randn(12)), False)
        scale, shift = leaf(torch.randn(12)), leaf(torch.randn(12))
        v = ssf_linear(x, W, b, scale, shift)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.bfloat16 and v.dtype == torch.bfloat16
    v.float().sum().backward()
    assert scale.grad.dtype == torch.float32 and shift.grad.dtype == torch.float32
    ref = ssf_linear_reference(*(t.detach().double() for t in (x, W, b, scale, shift)))
    assert_close(v, ref, torch.bfloat16, "ssf under autocast")
    assert_close(y, lora_linear_reference(*(t.detach().double() for t in (x, W, b, A, B)), 1.0), torch.bfloat16, "autocast")


def test_nan_and_inf_pass_through_like_the_reference():
    x, W, b = _inputs((4,), 8, 6, torch.float32, True)
    x = x.detach().clone()
    x[1, 2] = float("nan")
    x[2, 3] = float("inf")
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    y = lora_linear(x, W.detach(), b.detach(), A, B, 1.0)
    ref = lora_linear_reference(x, W.detach(), b.detach(), A, B, 1.0)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: lora_linear(torch.randn(3, 5), torch.randn(4, 6), None, torch.randn(2, 6), torch.randn(4, 2), 1.0), "last dimension 5"),
        (lambda: lora_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(2, 5), torch.randn(4, 2), 1.0), "lora_A must have shape"),
        (lambda: lora_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(2, 6), torch.randn(4, 3), 1.0), "lora_B must have shape"),
        (lambda: lora_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(0, 6), torch.randn(4, 0), 1.0), "rank must be >= 1"),
        (lambda: lora_linear(torch.randn(3, 6, dtype=torch.bfloat16), torch.randn(4, 6), None, torch.randn(2, 6), torch.randn(4, 2), 1.0), "x is torch.bfloat16 but the base weight is torch.float32"),
        (lambda: lora_linear(torch.randn(3, 6), torch.randn(4, 6), torch.randn(5), torch.randn(2, 6), torch.randn(4, 2), 1.0), "bias must have shape"),
        (lambda: lora_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(2, 6), torch.randn(4, 2), 1.0, dropout_p=1.0), "dropout_p"),
        (lambda: lora_linear(torch.ones(3, 6, dtype=torch.int32), torch.ones(4, 6, dtype=torch.int32), None, torch.randn(2, 6), torch.randn(4, 2), 1.0), "floating-point"),
        (lambda: ia3_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(6), False), "4 entries"),
        (lambda: ia3_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(4), True), "6 entries"),
        (lambda: ssf_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(6), torch.randn(4)), "ssf_scale must have shape"),
        (lambda: ssf_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(4), torch.randn(4, 1)), "ssf_shift must have shape"),
        (lambda: ssf_linear(torch.randn(3, 5), torch.randn(4, 6), None, torch.randn(4), torch.randn(4)), "last dimension 5"),
    ],
)
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_a_layer_checked_once_is_checked_again_where_a_call_changes():
    """The entry checks a call signature once and then runs its plan (ops/_autograd.py ``call``):
    a later call of the same layer that changes any tensor's shape, dtype or device, or a
    parameter, is a new signature and is checked again."""
    x, W, b = torch.randn(3, 6, requires_grad=True), torch.randn(4, 6), torch.randn(4)
    A, B = torch.randn(2, 6, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    scale, shift = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    for _ in range(2):  # planned: the second call runs the first one's plan
        lora_linear(x, W, b, A, B, 1.0).sum().backward()
        ia3_linear(x, W, b, scale, False).sum().backward()
        ssf_linear(x, W, b, scale, shift).sum().backward()
    bad = [
        (lambda: lora_linear(x, W, b, torch.randn(2, 5), B, 1.0), "lora_A must have shape"),
        (lambda: lora_linear(x, W, b, A, torch.ones(4, 2, dtype=torch.int64), 1.0), "lora_B must be a floating-point"),
        (lambda: lora_linear(x, W, b, A, B.to("meta"), 1.0), "lora_B is on meta but weight is on cpu"),
        (lambda: lora_linear(x.detach().bfloat16(), W, b, A, B, 1.0), "x is torch.bfloat16 but the base weight"),
        (lambda: lora_linear(x, W, b, A, B, 1.0, dropout_p=1.5), "dropout_p must be in"),
        (lambda: lora_linear(x, W, torch.randn(5), A, B, 1.0), "bias must have shape"),
        (lambda: ia3_linear(x, W, b, scale.detach().to("meta"), False), "ia3_scale is on meta but weight is on cpu"),
        (lambda: ia3_linear(x, W, b, scale.detach().long(), False), "ia3_scale must be a floating-point"),
        (lambda: ssf_linear(x, W, b, scale, shift.detach().long()), "ssf_shift must be a floating-point"),
        (lambda: ssf_linear(x[:, :5], W, b, scale, shift), "last dimension 5"),
    ]
    for call, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            call()


def test_forced_backend_that_cannot_run_raises():
    x, W = torch.randn(2, 4), torch.randn(3, 4)
    with fusedpeft.use_backend("nonexistent"), pytest.raises(RuntimeError, match="has only"):
        lora_linear(x, W, None, torch.randn(1, 4), torch.randn(3, 1), 1.0)


def test_env_var_selects_backend():
    """FUSEDPEFT_BACKEND is read into settings.backend when fusedpeft is imported."""
    from fusedpeft.settings import Settings, from_environment

    assert from_environment({"FUSEDPEFT_BACKEND": " Torch "}).backend == "torch"
    assert from_environment({}).backend == "auto"
    with fusedpeft.settings.override(backend="torch"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)
        assert fusedpeft.last_backend("lora_linear") == "torch"
    with fusedpeft.settings.override(backend="nonexistent"), pytest.raises(RuntimeError, match="nonexistent"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)
    assert isinstance(fusedpeft.settings, Settings)


@pytest.mark.parametrize("schedule", ["fused", "split"])
# ((150,), 20, 8): N <= 16 with M > 64 splits the grad_B reduction over M (several partials).
@pytest.mark.parametrize("lead,K,N,r", [((45,), 40, 24, 8), ((2, 9), 33, 47, 1), ((150,), 20, 8, 4)])
def test_triton_lora_both_schedules(schedule, lead, K, N, r, monkeypatch, use_settings):
    """The Triton backend's two schedules (one launch with u in the K loop; u as its own skinny
    GEMM first) compute the same function; the default picks by M, so force each here."""
    use_settings(lora_schedule=schedule)
    test_lora_linear_matches_reference("triton", torch.bfloat16, lead, K, N, r, True, 0.25, monkeypatch)


@pytest.mark.parametrize("r,schedule", [(16, "fused"), (40, "split"), (130, "auto")])
def test_triton_lora_wider_ranks(r, schedule, monkeypatch, use_settings):
    """r = 16, a rank padded to BLOCK_R = 64, and one over 128 (auto picks the split schedule
    above r = 64 even at M <= 64), through the interpreter."""
    use_settings(lora_schedule=schedule)
    test_lora_linear_matches_reference("triton", torch.float32, (2, 9), 33, 47, r, True, 0.25, monkeypatch)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_lora_update_apart_from_the_gemm(dropout, monkeypatch, use_settings):
    """The fallback for ranks whose epilogue no tile config can hold (r = 256 at large M on the
    H100): the GEMM core alone, then the rank-r update (and its dropout mask) as a separate
    product. Forced here on small shapes, forward and backward."""
    use_settings(lora_schedule="split", separate_lowrank=True)
    test_lora_linear_matches_reference("triton", torch.float32, (2, 9), 33, 47, 8, True, dropout, monkeypatch)
    test_lora_linear_matches_reference("triton", torch.bfloat16, (37,), 40, 24, 1, False, dropout, monkeypatch)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("tma", [False, True])
def test_triton_lora_term_by_pointer_and_by_descriptor(tma, dropout, monkeypatch, use_settings):
    """A precomputed LoRA term (the split schedule) with its lr / q tiles loaded by pointer or by
    tensor descriptor computes the same layer, forward and backward, with and without dropout.
    The r = 1 case has no q a descriptor can take (pointer loads either way), the first case an A
    whose rows are not 16-byte multiples (grad_x's q by pointer), the third descriptor-sized rows
    for lr, B (the forward) and A (grad_x, stored [r, K]); float32 operands take pointer loads
    whatever their rows (layout.descriptor_ok), the last case."""
    from fusedpeft._kernels import triton_kernels

    lora = triton_kernels.lora
    use_settings(lora_schedule="split", lowrank_tma=tma)
    seen = []

    class Spy:  # records each launch's lr / q load path
        def __init__(self, kernel, rmajor):
            self.kernel, self.rmajor, self.__name__ = kernel, rmajor, kernel.__name__

        def __getitem__(self, grid):
            def run(*args, **flags):
                seen.append((flags["LR_DESC"], flags[self.rmajor]))
                return self.kernel[grid](*args, **flags)
            return run

    monkeypatch.setattr(lora._FORWARD, "kernel", Spy(lora._FORWARD.kernel, "B_RMAJOR"))
    monkeypatch.setattr(lora._GRAD_X, "kernel", Spy(lora._GRAD_X.kernel, "A_RMAJOR"))
    test_lora_linear_matches_reference("triton", torch.bfloat16, (2, 9), 33, 47, 8, True, dropout, monkeypatch)
    test_lora_linear_matches_reference("triton", torch.bfloat16, (37,), 40, 24, 1, False, dropout, monkeypatch)
    test_lora_linear_matches_reference("triton", torch.bfloat16, (3, 5), 40, 52, 8, True, dropout, monkeypatch)
    assert set(seen) == ({(False, True), (False, False), (True, True), (True, False)} if tma
                         else {(False, True), (False, False)})
    seen.clear()
    test_lora_linear_matches_reference("triton", torch.float32, (3, 5), 40, 52, 8, True, dropout, monkeypatch)
    assert seen and not any(lr_desc for lr_desc, _ in seen)


def test_settings_read_once_override_nests_and_checks():
    """The environment is read once into settings; override() nests, restores on error, bumps
    the generation, and refuses unknown names and bad values by name."""
    from fusedpeft.settings import environment_variables, from_environment

    env = {var: "0" for name, var in environment_variables().items()
           if name in ("autotune", "fast_launch", "tensor_descriptors")}
    env.update({"FUSEDPEFT_OUTPUT_SCALE_GRAD": "recompute", "FUSEDPEFT_WEIGHT_GRAD_TILE": "128x32",
                "FUSEDPEFT_CACHE_DIR": ""})
    values = from_environment(env)
    assert (values.autotune, values.fast_launch, values.tensor_descriptors) == (False, False, False)
    assert values.output_scale_grad == "recompute" and values.weight_grad_tile == (128, 32)
    assert values.cache_dir == ""
    with pytest.raises(ValueError, match="FUSEDPEFT_LORA_SCHEDULE"):
        from_environment({"FUSEDPEFT_LORA_SCHEDULE": "sometimes"})
    with pytest.raises(ValueError, match="FUSEDPEFT_TILE_CONFIG"):
        from_environment({"FUSEDPEFT_TILE_CONFIG": "first"})

    settings = fusedpeft.settings
    before, generation = settings.values(), settings.generation
    with settings.override(output_scale_grad="recompute"):
        assert settings.output_scale_grad == "recompute" and settings.generation != generation
        with pytest.raises(KeyError):
            with settings.override(output_scale_grad="save", lora_schedule="split"):
                assert (settings.output_scale_grad, settings.lora_schedule) == ("save", "split")
                raise KeyError("inside")
        assert (settings.output_scale_grad, settings.lora_schedule) == ("recompute", before.lora_schedule)
    assert settings.values() == before
    with pytest.raises(TypeError, match="unknown setting 'autotun'"):
        settings.override(autotun=False).__enter__()
    with pytest.raises(ValueError, match="True or False"):
        settings.override(autotune="no").__enter__()
    with pytest.raises(ValueError, match="two powers of two"):
        settings.override(weight_grad_tile=(100, 64)).__enter__()
    with pytest.raises(AttributeError, match="override"):
        settings.autotune = False
    assert settings.values() == before

    # Entering the same override again (resolved once, then looked up) gives the same values and
    # generation, and a value equal to an accepted one but of the wrong type is still refused.
    seen = []
    for _ in range(2):
        with settings.override(autotune=not before.autotune, backend="torch"):
            seen.append((settings.values(), settings.generation, settings.autotune))
    assert seen[0] == seen[1] and seen[0][2] is (not before.autotune)
    with settings.override(backend="torch"):
        assert settings.generation == generation  # the backend changes no launch plan
    with pytest.raises(ValueError, match="True or False"):
        settings.override(autotune=int(not before.autotune), backend="torch").__enter__()
    with pytest.raises(ValueError, match="two powers of two"):
        settings.override(weight_grad_tile=[128, 32]).__enter__()  # unhashable: checked, refused
    assert settings.values() == before and settings.generation == generation


@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_triton_rescale_split_reductions(grad_mode, monkeypatch, use_settings):
    """M > 64 with N <= 16 splits the saved-z column reduction over M (several partials), and
    M over several row blocks gives the recompute epilogue several partial rows."""
    test_ssf_linear_matches_reference("triton", torch.float32, (150,), 20, 8, True, grad_mode, monkeypatch, use_settings)
    test_ia3_linear_matches_reference("triton", torch.bfloat16, (3, 50), 20, 8, False, True, grad_mode, monkeypatch, use_settings)


@pytest.mark.parametrize("subtile", [False, True])
def test_triton_epilogue_whole_tile_and_halves(subtile, monkeypatch, use_settings):
    """The GEMM core's epilogue runs on the whole output tile or on two halves (EPI_SUBTILE, the
    interpreter's default); both compute the same LoRA, IA3 and SSF layers, and so does the
    pointer-load path."""
    from fusedpeft._kernels import triton_kernels

    configs = triton_kernels.configs
    cfg = {**configs.INTERPRETER_CONFIG, "EPI_SUBTILE": subtile, "BLOCK_N": 32 if subtile else 16}
    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", cfg)
    use_settings(lora_schedule="split", tensor_descriptors=not subtile)
    test_lora_linear_matches_reference("triton", torch.float32, (45,), 40, 47, 8, True, 0.0, monkeypatch)
    test_ssf_linear_matches_reference("triton", torch.bfloat16, (37,), 40, 24, True, "save", monkeypatch, use_settings)
    test_ia3_linear_matches_reference("triton", torch.float32, (2, 5), 24, 40, False, True, "recompute", monkeypatch, use_settings)


# ----------------------------------------------------------------------------- the composed path
@pytest.fixture
def composed_on_cpu(monkeypatch):
    """The composable ops' autograd composition reached on CPU (it runs on CUDA by default); their
    Functions made to fail if entered, so a test passing through one cannot pass."""
    from fusedpeft.ops import _autograd, _rescale, lora as lora_ops

    monkeypatch.setattr(_autograd, "COMPOSED_DEVICES", {"cuda", "cpu"})

    def entered(ctx, *args):
        raise AssertionError("the autograd Function ran: the composed path was expected")

    for op in (_rescale._OP, lora_ops._OP):
        monkeypatch.setattr(op.function, "forward", staticmethod(entered))


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_lora_composed_path_matches_reference(dtype, adapter_dtype, lead, K, N, bias, x_grad, composed_on_cpu):
    """cublas_autograd without dropout: cuBLAS calls as torch ops that autograd differentiates (the
    Function, made to raise, never runs). Output and every gradient against float64, the
    adapters' gradients in their own dtype (float32 masters), one backend count per call."""
    x, W, b = _inputs(lead, K, N, dtype, bias)
    x.requires_grad_(x_grad)
    A = leaf(torch.randn(8, K) / K**0.5, adapter_dtype)
    B = leaf(torch.randn(N, 8) / 8**0.5, adapter_dtype)
    before = fusedpeft.backend_counts().get(("lora_linear", "cublas_autograd"), 0)
    with fusedpeft.use_backend("cublas_autograd"):
        y = lora_linear(x, W, b, A, B, 1.7, dropout_p=0.3, training=False)  # eval: no dropout
    assert fusedpeft.backend_counts()[("lora_linear", "cublas_autograd")] == before + 1
    assert y.shape == (*lead, N) and y.dtype == dtype
    g = lora_upstream_grad(y, B)
    y.backward(g)
    refs = [leaf(t, torch.float64) if t is not None else None for t in (x, W, b, A, B)]
    y_ref = lora_linear_reference(*refs, 1.7)
    y_ref.backward(g.double())
    assert_close(y, y_ref, dtype, "lora composed")
    _check_grads("xWbAB", (x if x_grad else None, W, b, A, B), refs, dtype, "lora composed")
    assert x_grad or x.grad is None
    assert A.grad.dtype == adapter_dtype and B.grad.dtype == adapter_dtype


def test_a_repeated_call_runs_its_plan_without_choosing_again(composed_on_cpu, monkeypatch):
    """The first call of a signature checks and chooses; every later call of it (a layer's next
    step) runs the plan: no backend selection, no shape-key look-up, for LoRA, IA3 and DoRA on the
    composed path and for a forward without gradients. A new signature chooses again."""
    from fusedpeft import backends
    from fusedpeft.ops import dora_linear

    x = torch.randn(2, 5, 16, requires_grad=True)
    W, b = torch.randn(12, 16), torch.randn(12)
    A, B = leaf(torch.randn(4, 16)), leaf(torch.randn(12, 4))
    scale, m = leaf(torch.randn(12)), leaf(torch.rand(12) + 0.5)
    norm = torch.rand(12) + 0.5
    def composed(backend, op):  # each op's composed backend, its own settings block
        def call():
            with fusedpeft.use_backend(backend):
                return op()
        return call

    calls = [composed("cublas_autograd", lambda: lora_linear(x, W, b, A, B, 2.0)),
             composed("torch", lambda: ia3_linear(x, W, b, scale, False)),
             composed("cublas_autograd", lambda: dora_linear(x, W, b, A, B, 2.0, m, weight_norm=norm))]
    selected = []
    select_index = backends.select_index

    def counted(op, *tensors, index=-1, **kwargs):  # a choice made (index >= 0: one made before, recorded)
        if index < 0:
            selected.append(op)
        return select_index(op, *tensors, index=index, **kwargs)

    monkeypatch.setattr(backends, "select_index", counted)
    with fusedpeft.settings.override(output_scale_grad="save"):
        for call in calls:
            call().sum().backward()
            with torch.no_grad():
                call()
        first = len(selected)
        assert first >= 6  # each op chose for training and for the forward alone
        for _ in range(3):
            for call in calls:
                call().sum().backward()
                with torch.no_grad():
                    call()
        assert len(selected) == first, f"repeated calls chose again: {selected[first:]}"
        composed("cublas_autograd", lambda: lora_linear(x[:, :3], W, b, A, B, 2.0))().sum().backward()
        assert len(selected) > first  # a new shape: a new signature, chosen


def test_lora_composed_backend_declines_dropout_and_is_no_candidate_there(monkeypatch):
    """With dropout the composition (which would keep the mask) declines: a forced cublas_autograd
    runs the Function with cublas_after's kernels. Its tuner bench is None there, and for the
    bare keys of the custom ops, where it would only repeat cublas_after."""
    from fusedpeft import backends
    from fusedpeft.ops import _autograd, lora as lora_ops

    monkeypatch.setattr(_autograd, "COMPOSED_DEVICES", {"cuda", "cpu"})
    x, W, b = _inputs((9,), 16, 12, torch.float32, True)
    A, B = leaf(torch.randn(4, 16)), leaf(torch.randn(12, 4))
    entered = []
    forward = lora_ops._OP.function.forward
    monkeypatch.setattr(lora_ops._OP.function, "forward",
                        staticmethod(lambda ctx, *a: entered.append(a[-1]) or forward(ctx, *a)))
    with fusedpeft.use_backend("cublas_autograd"):
        name, impl = backends.select("lora_linear", x, W, record=False)
        lora_linear(x, W, b, A, B, 2.0, dropout_p=0.3, training=True).sum().backward()
    assert entered == [backends.index_of("lora_linear", impl)] and A.grad is not None
    seed = torch.tensor([7])
    args = (x.detach(), W, b, A, B, 2.0, 0.3, seed)
    needs = (False, False, True, True, True)
    monkeypatch.setattr(tuning, "time_ms", lambda step: pytest.fail("a step was timed"))
    _, entry_bench = lora_ops._tune(*args, needs, lambda: lora_ops._OP.entry_step("lora_linear", args, needs))
    _, bare_bench = lora_ops._tune(*args[:5], 2.0, 0.0, None, needs)
    assert entry_bench(impl) is None and bare_bench(impl) is None


def test_composable_entry_remembers_its_choice_per_call_signature(monkeypatch, composed_on_cpu):
    """A repeated call of a composable op skips select; a new shape, a use_backend block, a new
    registration or tuning.clear() chooses again, and a choice made inside a CUDA-graph capture
    is not kept."""
    from fusedpeft import backends

    chosen = []
    select_index = backends.select_index

    def counting(op, *tensors, **kw):
        chosen.append(op)
        return select_index(op, *tensors, **kw)

    monkeypatch.setattr(backends, "select_index", counting)
    x, W, b = _inputs((6,), 16, 12, torch.float32, True)
    scale = leaf(1.0 + torch.randn(12))

    def call(rows=6):
        ia3_linear(x[:rows], W, b, scale, False).sum().backward()

    call(), call()
    assert chosen == ["ia3_linear"]
    call(rows=4)
    assert len(chosen) == 2  # another shape: chosen again
    with fusedpeft.use_backend("torch"):
        call()
    assert len(chosen) == 3  # other settings in force
    tuning.clear()
    call()
    assert len(chosen) == 4
    backends.register("ia3_linear", "torch", load=backends._REGISTRY["ia3_linear"]["torch"].load,
                      supports=backends._REGISTRY["ia3_linear"]["torch"].supports, priority=0, tunable=True)
    call()
    assert len(chosen) == 5
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    tuning.clear()
    call(), call()
    assert len(chosen) == 7  # nothing kept while capturing


@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_recompute_keeps_z_whole_candidates_as_a_last_resort(grad_mode, monkeypatch, use_settings):
    """In "recompute" mode (z to stay out of memory) the torch composition, whose backward forms z
    whole, is no contender: its bench answers tuning.LAST_RESORT unmeasured, so it runs only where
    every other candidate fails; in "save" mode it is timed like the others."""
    from fusedpeft import backends
    from fusedpeft.ops import _rescale

    use_settings(output_scale_grad=grad_mode)
    monkeypatch.setattr(tuning, "time_ms", lambda step: 0.5)
    x, W, b = _inputs((13,), 24, 20, torch.float32, True)
    scale = leaf(1.0 + torch.randn(20))
    needs = (True, False, True, True, False)
    _, bench = _rescale._tune(x.detach(), W, b, scale, None, False, grad_mode == "save", needs)
    torch_impl = backends._REGISTRY["ia3_linear"]["torch"].impl()
    expected = tuning.LAST_RESORT if grad_mode == "recompute" else 0.5
    assert bench(torch_impl) == expected
    # input scaling keeps no z: timed in either mode
    _, bench_ff = _rescale._tune(x.detach(), W, b, leaf(torch.randn(24)), None, True, False, needs)
    assert bench_ff(torch_impl) == 0.5
    monkeypatch.setattr(tuning, "enabled", lambda: True)
    monkeypatch.setattr(tuning, "record", lambda *a: None)
    key = ("last-resort", float(torch.rand(())))
    assert tuning.choose("an_op", key, ["triton", "torch"], {"triton": 0.9, "torch": tuning.LAST_RESORT}.get) == "triton"

    def failing(name):
        if name == "triton":
            raise RuntimeError("cannot run here")
        return tuning.LAST_RESORT

    assert tuning.choose("an_op", key + ("again",), ["triton", "torch"], failing) == "torch"


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3-out", "ia3-ff", "ssf"])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_ops_under_autocast_compute_in_its_dtype(kind, lead):
    """float32 inputs under CPU autocast (bf16): the op computes in bf16 (x, the weight and the
    bias cast to it, autocast off inside) and returns bf16 in x's leading shape; every gradient
    comes back in its leaf's float32, within bf16's tolerance of the float64 reference."""
    from fusedpeft.ops import dora_linear, dora_linear_reference

    K, N, r = 24, 20, 4
    x, W, b = _inputs(lead, K, N, torch.float32, True)
    A, B = leaf(torch.randn(r, K) / K**0.5), leaf(torch.randn(N, r) / r**0.5)
    m = leaf(torch.rand(N) + 0.5)
    scale, shift = leaf(1.0 + 0.5 * torch.randn(K if kind == "ia3-ff" else N)), leaf(torch.randn(N))
    calls = {
        "lora": (lambda x, W, b, A, B, m, l, t: lora_linear(x, W, b, A, B, 1.5),
                 lambda x, W, b, A, B, m, l, t: lora_linear_reference(x, W, b, A, B, 1.5), (A, B)),
        "dora": (lambda x, W, b, A, B, m, l, t: dora_linear(x, W, b, A, B, 1.5, m),
                 lambda x, W, b, A, B, m, l, t: dora_linear_reference(x, W, b, A, B, 1.5, m), (A, B, m)),
        "ia3-out": (lambda x, W, b, A, B, m, l, t: ia3_linear(x, W, b, l, False),
                    lambda x, W, b, A, B, m, l, t: ia3_linear_reference(x, W, b, l, False), (scale,)),
        "ia3-ff": (lambda x, W, b, A, B, m, l, t: ia3_linear(x, W, b, l, True),
                   lambda x, W, b, A, B, m, l, t: ia3_linear_reference(x, W, b, l, True), (scale,)),
        "ssf": (lambda x, W, b, A, B, m, l, t: ssf_linear(x, W, b, l, t),
                lambda x, W, b, A, B, m, l, t: ssf_linear_reference(x, W, b, l, t), (scale, shift)),
    }
    call, reference, adapters = calls[kind]
    tensors = (x, W, b, A, B, m, scale, shift)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(*tensors)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, N)
    g = torch.randn_like(y)
    y.backward(g)
    refs = [leaf(t, torch.float64) for t in tensors]
    y_ref = reference(*refs)
    y_ref.backward(g.double())
    assert_close(y, y_ref, torch.bfloat16, f"{kind} under autocast")
    for name, t in zip(("x", "W", "b"), (x, W, b)):
        assert t.grad is not None and t.grad.dtype == torch.float32, name
    for i, t in enumerate(tensors):
        if t.grad is not None:
            assert t.grad.dtype == torch.float32
            assert_close(t.grad, refs[i].grad, torch.bfloat16, f"{kind} under autocast: grad of input {i}")
    assert all(t.grad is not None for t in adapters)


def test_tuner_skips_a_candidate_whose_bench_is_none(monkeypatch, tmp_path):
    """tuning.choose: a bench of None leaves that name out of the race (not an error, not a time)."""
    monkeypatch.setattr(tuning, "enabled", lambda: True)
    monkeypatch.setattr(tuning, "capturing", lambda: False)
    monkeypatch.setattr(tuning, "record", lambda *a: None)
    key = ("test-key", float(torch.rand(())))  # a fresh key: nothing remembered
    times = {"fast": None, "slow": 2.0, "mid": 1.0}
    assert tuning.choose("an_op", key, list(times), times.get) == "mid"
    assert tuning.LOG[-1]["ms"] == {"slow": 2.0, "mid": 1.0} and not tuning.LOG[-1]["errors"]


def _rescale_call(kind, x, W, b, dtype, scale_dtype):
    """(call, tensors) of one rescaling kind: random scale (and shift) in ``scale_dtype``."""
    ff = kind == "ia3-ff"
    K, N = W.shape[1], W.shape[0]
    scale = leaf(1.0 + 0.5 * torch.randn(K if ff else N), scale_dtype)
    if kind == "ssf":
        return (lambda *t: ssf_linear(*t)), (x, W, b, scale, leaf(torch.randn(N), scale_dtype))
    return (lambda *t: ia3_linear(*t, ff)), (x, W, b, scale)


@pytest.mark.parametrize("kind", ["ia3-out", "ia3-ff", "ssf"])
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_rescale_composed_path_matches_reference(kind, dtype, scale_dtype, lead, K, N, bias, composed_on_cpu,
                                                 use_settings):
    """The torch backend as plain differentiable ops (autograd runs its backward): output and every
    gradient against float64, the scale's and shift's gradients in their own dtype, one backend
    count per call."""
    use_settings(output_scale_grad="save")
    x, W, b = _inputs(lead, K, N, dtype, bias)
    call, tensors = _rescale_call(kind, x, W, b, dtype, scale_dtype)
    op = "ssf_linear" if kind == "ssf" else "ia3_linear"
    before = fusedpeft.backend_counts().get((op, "torch"), 0)
    y = call(*tensors)
    assert fusedpeft.backend_counts()[(op, "torch")] == before + 1 and fusedpeft.last_backend(op) == "torch"
    assert y.shape == (*lead, N) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    refs = [leaf(t, torch.float64) if t is not None else None for t in tensors]
    call(*refs).backward(g.double())
    assert_close(y, call(*refs), dtype, f"{kind} composed")
    for name, t, ref in zip(("x", "W", "b", "scale", "shift"), tensors, refs):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, (name, t.grad)
            assert_close(t.grad, ref.grad, dtype, f"{kind} composed grad_{name}")


@pytest.mark.parametrize("op", ["ia3", "ssf"])
def test_rescale_composed_path_declines_where_it_would_keep_more(op, monkeypatch, use_settings):
    """In 'recompute' mode (the unscaled output is not to be kept) the composition, which would keep
    it for autograd, declines and the Function runs."""
    from fusedpeft.ops import _autograd, _rescale

    monkeypatch.setattr(_autograd, "COMPOSED_DEVICES", {"cuda", "cpu"})
    use_settings(output_scale_grad="recompute")
    x, W, b = _inputs((9,), 16, 12, torch.float32, True)
    call, tensors = _rescale_call("ssf" if op == "ssf" else "ia3-out", x, W, b, torch.float32, torch.float32)
    entered = []
    forward = _rescale._OP.function.forward
    monkeypatch.setattr(_rescale._OP.function, "forward",
                        staticmethod(lambda ctx, *a: entered.append(1) or forward(ctx, *a)))
    y = call(*tensors)
    assert entered == [1]
    y.sum().backward()
    assert all(t.grad is not None for t in tensors if t is not None)


@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_rescale_tuner_times_candidates_through_the_entry(grad_mode, monkeypatch, use_settings):
    """The composable op's tuner measures a candidate as the entry runs it: the composition where
    it runs (save mode), the Function where it declines (recompute, where the tuner itself keeps the
    torch candidate as a last resort), with autograd's backward, on leaves of its own (the caller's
    tensors get no gradient) and without counting the calls."""
    from fusedpeft import backends, tuning
    from fusedpeft.ops import _rescale

    use_settings(output_scale_grad=grad_mode)
    x, W, b = _inputs((13,), 24, 20, torch.float32, True)
    scale = leaf(1.0 + 0.5 * torch.randn(20))
    args = (x.reshape(13, 24), W, b, scale, None, False, grad_mode == "save", "ia3_linear")
    needs = tuple(t is not None and t.requires_grad for t in args[:5])
    entered, steps = [], []
    forward = _rescale._OP.function.forward
    monkeypatch.setattr(_rescale._OP.function, "forward",
                        staticmethod(lambda ctx, *a: entered.append(a[-1]) or forward(ctx, *a)))
    grads = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(real_grad(*a, **k)) or grads[-1])
    monkeypatch.setattr(tuning, "time_ms", lambda step: (step(), steps.append(1), 0.5)[-1])
    upstream = torch.randn(13, 20)
    monkeypatch.setattr(tuning, "random_like_output", lambda shape, dtype, device: upstream.to(dtype))
    built = []

    def through():
        built.append(1)
        return _rescale._OP.entry_step("ia3_linear", args, needs)

    _, bench = _rescale._tune(*args[:7], needs, through)
    _, impl = backends.select("ia3_linear", x, W, record=False)
    counts = backends.backend_counts()
    if grad_mode == "save":
        assert bench(impl) == 0.5 and built == [1] and steps == [1]
    else:  # recompute: the torch composition forms z whole, so the tuner keeps it unmeasured as a
        # last resort; its entry step, timed directly, is the Function's
        assert bench(impl) == tuning.LAST_RESORT and built == [] and steps == []
        assert tuning.time_ms(through()(impl)) == 0.5 and built == [1] and steps == [1]
    torch_index = backends.index_of("ia3_linear", impl)
    assert entered == ([] if grad_mode == "save" else [torch_index])
    assert backends.backend_counts() == counts
    assert all(t.grad is None for t in (x, W, b, scale))
    # the step's gradients are the layer's, for every tensor that wants one
    refs = [leaf(t, torch.float64) for t in (x, W, b, scale)]
    ia3_linear_reference(refs[0], refs[1], refs[2], refs[3], False).backward(upstream.double())
    assert len(grads) == 1 and len(grads[0]) == 4
    for name, got, ref in zip(("x", "W", "b", "scale"), grads[0], refs):
        assert_close(got, ref.grad, torch.float32, f"tuner step grad_{name}")


def test_rescale_entry_hands_the_tuner_its_own_step(monkeypatch, composed_on_cpu, use_settings):
    """Wiring: a composable op's call hands select a shape key whose bench times the candidate
    through the entry (here the composition: the Function, made to raise, is never entered), and
    runs the choice; one count per call."""
    from fusedpeft import backends, tuning

    use_settings(output_scale_grad="save")
    monkeypatch.setattr(tuning, "measures", lambda x: True)
    monkeypatch.setattr(tuning, "time_ms", lambda step: (step(), 0.25)[-1])
    benched = []
    select_index = backends.select_index

    def measuring(op, x, weight, tune=None, index=-1, record=True):
        assert tune is not None and index < 0
        index, impl = select_index(op, x, weight, index=index, record=False)
        benched.append(tune[1](impl))
        return (index, impl) if not record else select_index(op, x, weight, index=index, record=True)

    monkeypatch.setattr(backends, "select_index", measuring)
    autograd_steps = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: autograd_steps.append(1) or real_grad(*a, **k))
    x, W, b = _inputs((3, 5), 24, 20, torch.float32, True)
    scale = leaf(1.0 + 0.5 * torch.randn(20))
    before = fusedpeft.backend_counts().get(("ia3_linear", "torch"), 0)
    y = ia3_linear(x, W, b, scale, False)
    assert benched == [0.25] and autograd_steps == [1]  # the entry's step (autograd's backward) was timed
    assert fusedpeft.backend_counts()[("ia3_linear", "torch")] == before + 1
    y.backward(torch.ones_like(y))
    refs = [leaf(t, torch.float64) for t in (x, W, b, scale)]
    ia3_linear_reference(*refs, False).backward(torch.ones(3, 5, 20, dtype=torch.float64))
    _check_grads(("x", "W", "b", "l"), (x, W, b, scale), refs, torch.float32, "ia3 through the tuned entry")


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_linear_takes_peft_shapes_and_names_a_bad_scale(feedforward):
    """The scale as (size,), (1, size) or (size, 1) gives one result; any other shape, a non-float
    dtype or another device is refused with the problem named."""
    x, W, b = _inputs((5,), 12, 8, torch.float32, True)
    size = 12 if feedforward else 8
    scale = torch.randn(size)
    y = ia3_linear(x, W, b, scale, feedforward)
    ref = ia3_linear_reference(*(t.double() for t in (x, W, b, scale)), feedforward)
    assert_close(y, ref, torch.float32, "ia3 (size,)")
    for shaped in (scale.reshape(1, size), scale.reshape(size, 1)):
        assert torch.equal(ia3_linear(x, W, b, shaped, feedforward), y)
    for bad in (torch.randn(size + 1), scale.reshape(2, size // 2), scale.reshape(1, 1, size)):
        with pytest.raises(ValueError, match=f"ia3_scale must have {size} entries.*got shape {re.escape(str(tuple(bad.shape)))}"):
            ia3_linear(x, W, b, bad, feedforward)
    with pytest.raises(TypeError, match="ia3_scale must be a floating-point tensor, got torch.int64"):
        ia3_linear(x, W, b, torch.ones(size, dtype=torch.int64), feedforward)
    with pytest.raises(ValueError, match="ia3_scale is on meta but weight is on cpu"):
        ia3_linear(x, W, b, torch.empty(size, device="meta"), feedforward)
