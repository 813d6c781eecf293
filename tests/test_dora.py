"""DoRA (use_dora=True): the op against its float64 reference (output and every gradient, ragged
shapes, dropout with each backend's own mask, both ways of getting grad_m), the norm without
W + s B A, and the layer against peft: outputs and gradients, files both ways, merge, from_peft."""
import copy

import pytest
import torch
from torch import nn

import fusedpeft
from fusedpeft.ops import dora_linear, dora_linear_reference
from fusedpeft.ops import dora as dora_mod

from helpers import (BACKENDS, assert_close, assert_step_matches_peft, backend_mask, leaf, lora_upstream_grad, peft_twins,
                     pin_dropout_seed)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPES = [((37,), 40, 24), ((1,), 33, 47), ((0,), 40, 24), ((2, 5), 24, 40), ((3, 23), 20, 36)]  # the last: M > K


def _dora_rank_weights(W, A, B, scaling, m):
    """What grad_y meets on its way to A's gradient in DoRA: B with row n scaled by m_n / ||W + s B A||_n
    (grad_A's rank-r dot products are (grad_y * m / norm) @ B), for lora_upstream_grad's check that
    they do not cancel. DoRA's bf16 path rounds grad_y * m / norm before those products, about two
    roundings each, so the draws are held to a condition of 4 (bf16's 2e-2 over ~4e-3 per unit):
    at 20, LoRA's bound, a draw of condition 8.5 gave grad_A an error of 2.8e-2 at M = 1."""
    W, A, B, m = (t.detach().double() for t in (W, A, B, m))
    return B * (m / (W + scaling * B @ A).norm(dim=1))[:, None]


# grad_m's z from the output ("output") where the op reads it so (no dropout, no bias), saved or
# recomputed everywhere
GRAD_MODES = [(p, bias, mode) for p in (0.0, 0.3) for bias in (True, False) for mode in ("output", "save", "recompute")
              if mode != "output" or (p == 0.0 and not bias)]


@pytest.mark.parametrize("backend", BACKENDS["dora_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("dropout,bias,grad_mode", GRAD_MODES)
def test_dora_linear_matches_reference(backend, dtype, lead, K, N, bias, dropout, grad_mode, monkeypatch, use_settings):
    use_settings(output_scale_grad=grad_mode)
    r = 4
    x = leaf(torch.randn(*lead, K), dtype)
    W = leaf(torch.randn(N, K) / K**0.5, dtype)
    b = leaf(torch.randn(N), dtype) if bias else None
    A = leaf(torch.randn(r, K) / K**0.5, dtype)
    B = leaf(torch.randn(N, r) / r**0.5, dtype)  # never zero: that would hide the low-rank path
    m = leaf(torch.rand(N) + 0.5, dtype)
    seed = pin_dropout_seed(monkeypatch)
    with fusedpeft.use_backend(backend):
        y = dora_linear(x, W, b, A, B, 1.3, m, dropout_p=dropout, training=True)
    assert fusedpeft.last_backend("dora_linear") == backend
    g = lora_upstream_grad(y, _dora_rank_weights(W, A, B, 1.3, m), max_cond=4.0)
    y.backward(g)
    mask = backend_mask("dora_linear", backend, seed, x, dropout)
    refs = [leaf(t, torch.float64) if t is not None else None for t in (x, W, b, A, B, m)]
    y_ref = dora_linear_reference(*refs[:5], 1.3, refs[5], dropout_mask=mask, dropout_p=dropout)
    y_ref.backward(g.double())
    what = f"dora[{backend}] p={dropout} {grad_mode}"
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert_close(y, y_ref, dtype, what)
    for name, t, ref in zip(["x", "W", "b", "A", "B", "m"], (x, W, b, A, B, m), refs):
        if t is not None:
            assert t.grad is not None, f"{what}: no gradient for {name}"
            assert_close(t.grad, ref.grad, dtype, f"{what} grad_{name}")


def _dora_call(backend, M=11, K=24, N=40, bias=False):
    """A random bf16 DoRA call on ``backend``: (x, W, b, A, B, m, y) with the leaves requiring grad."""
    x = leaf(torch.randn(M, K), torch.bfloat16)
    W = leaf(torch.randn(N, K) / K**0.5, torch.bfloat16, requires_grad=False)
    b = leaf(torch.randn(N), torch.bfloat16) if bias else None
    A, B = leaf(torch.randn(4, K) / K**0.5), leaf(torch.randn(N, 4) / 2)
    m = leaf(torch.rand(N) + 0.5)
    with fusedpeft.use_backend(backend):
        y = dora_linear(x, W, b, A, B, 1.3, m)
    return x, W, b, A, B, m, y


def _reference_grads(x, W, b, A, B, m, g, edit=None):
    refs = [None if t is None else leaf(t, torch.float64, requires_grad=t.requires_grad) for t in (x, W, b, A, B, m)]
    y_ref = dora_linear_reference(*refs[:5], 1.3, refs[5])
    (y_ref if edit is None else edit(y_ref)).backward(g.double())
    return refs


@pytest.mark.parametrize("backend", BACKENDS["dora_linear"])
@pytest.mark.parametrize("grad_mode", ["output", "save"])
def test_dora_output_mode_keeps_no_activation_of_the_output_size(backend, grad_mode, use_settings):
    """"output" (the default): the backward reads z from y itself, so nothing of y's size is saved
    beside it, where "save" saves z; the gradients match float64 either way."""
    use_settings(output_scale_grad=grad_mode)
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        x, W, b, A, B, m, y = _dora_call(backend)
    assert ((11, 40) in saved_shapes) == (grad_mode == "save"), saved_shapes
    g = lora_upstream_grad(y, _dora_rank_weights(W, A, B, 1.3, m), max_cond=4.0)
    y.backward(g)
    refs = _reference_grads(x, W, b, A, B, m, g)
    for name, t, ref in zip(["x", "A", "B", "m"], (x, A, B, m), (refs[0], refs[3], refs[4], refs[5])):
        assert_close(t.grad, ref.grad, torch.bfloat16, f"dora[{backend}] {grad_mode} grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS["dora_linear"])
def test_dora_output_edited_in_place_still_gives_the_gradients(backend, use_settings):
    """A caller that edits the output in place before the backward (y *= 2 here) changes what the
    kept y holds: the backward sees its version move and forms z again, where autograd would raise
    for a saved tensor. A second backward over a retained graph takes the same way."""
    use_settings(output_scale_grad="output")
    x, W, b, A, B, m, y = _dora_call(backend)
    y.mul_(2.0)
    g = lora_upstream_grad(y, _dora_rank_weights(W, A, B, 1.3, m), max_cond=4.0)
    y.backward(g, retain_graph=True)
    refs = _reference_grads(x, W, b, A, B, m, g, edit=lambda y_ref: y_ref * 2.0)
    first = [t.grad.clone() for t in (x, A, B, m)]
    for name, t, ref in zip(["x", "A", "B", "m"], first, (refs[0], refs[3], refs[4], refs[5])):
        assert_close(t, ref.grad, torch.bfloat16, f"dora[{backend}] edited output grad_{name}")
    y.backward(g)  # the kept output was released by the first backward
    for name, t, before in zip(["x", "A", "B", "m"], (x, A, B, m), first):
        assert_close(t.grad, 2 * before.double(), torch.bfloat16, f"dora[{backend}] second backward grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS["dora_linear"])
def test_dora_backends_read_grad_m_from_an_output_with_bias(backend):
    """The backends' Z_FROM_OUTPUT with a bias: grad_m = (sum_rows(g y) - b sum_rows(g)) / m. (The
    op gives it no bias in bf16, where y - b cancels; in float32 it is exact to rounding.)"""
    from fusedpeft import backends

    impl = backends._REGISTRY["dora_linear"][backend].impl()
    x, W, b = leaf(torch.randn(13, 24)), leaf(torch.randn(40, 24) / 5, requires_grad=False), leaf(torch.randn(40))
    A, B, m = leaf(torch.randn(4, 24) / 5), leaf(torch.randn(40, 4) / 2), leaf(torch.rand(40) + 0.5)
    norm = dora_mod.dora_weight_norm(W, A, B, 1.3)
    x, W, b, A, B, m = (t.detach() for t in (x, W, b, A, B, m))  # the backend on plain tensors, as the op calls it
    y, saved = impl.forward(x, W, b, A, B, m, 1.3, norm, 0.0, None, dora_mod.Z_FROM_OUTPUT)
    assert saved[0] is y
    g = torch.randn_like(y)
    grads = impl.backward(g, x, W, b, A, B, m, saved, 1.3, norm, 0.0, None, dora_mod.Z_FROM_OUTPUT,
                          (True, False, True, True, True, True))
    refs = _reference_grads(*(t.requires_grad_(t is not W) for t in (x, W, b, A, B, m)), g)
    for name, got, ref in zip(["x", "b", "A", "B", "m"], [grads[i] for i in (0, 2, 3, 4, 5)],
                              [refs[i] for i in (0, 2, 3, 4, 5)]):
        assert_close(got, ref.grad, torch.float32, f"dora[{backend}] output with bias grad_{name}")


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m_grad", [True, False])
def test_dora_composed_path_matches_reference(dtype, adapter_dtype, lead, K, N, bias, m_grad, monkeypatch, use_settings):
    """cublas_autograd without dropout: DoRA's composition as torch ops that autograd differentiates
    (the Function, made to raise, never runs). Output and every gradient against float64, the
    adapters' and magnitude's gradients in their own dtype, one backend count per call; with dropout,
    or where grad_m would be recomputed, the Function runs instead."""
    from fusedpeft.ops import _autograd

    use_settings(output_scale_grad="save")
    monkeypatch.setattr(_autograd, "COMPOSED_DEVICES", {"cuda", "cpu"})
    forward = dora_mod._OP.function.forward
    entered = []
    monkeypatch.setattr(dora_mod._OP.function, "forward",
                        staticmethod(lambda ctx, *a: entered.append(1) or forward(ctx, *a)))
    x = leaf(torch.randn(*lead, K), dtype)
    W = leaf(torch.randn(N, K) / K**0.5, dtype)
    b = leaf(torch.randn(N), dtype) if bias else None
    A = leaf(torch.randn(4, K) / K**0.5, adapter_dtype)
    B = leaf(torch.randn(N, 4) / 2, adapter_dtype)
    m = leaf(torch.rand(N) + 0.5, adapter_dtype, requires_grad=m_grad)
    before = fusedpeft.backend_counts().get(("dora_linear", "cublas_autograd"), 0)
    with fusedpeft.use_backend("cublas_autograd"):
        y = dora_linear(x, W, b, A, B, 1.3, m)
    assert entered == [] and fusedpeft.backend_counts()[("dora_linear", "cublas_autograd")] == before + 1
    assert y.shape == (*lead, N) and y.dtype == dtype
    g = lora_upstream_grad(y, _dora_rank_weights(W, A, B, 1.3, m), max_cond=4.0)
    y.backward(g)
    refs = [leaf(t, torch.float64, requires_grad=t.requires_grad) if t is not None else None for t in (x, W, b, A, B, m)]
    y_ref = dora_linear_reference(*refs[:5], 1.3, refs[5])
    y_ref.backward(g.double())
    assert_close(y, y_ref, dtype, "dora composed")
    for name, t, ref in zip(["x", "W", "b", "A", "B", "m"], (x, W, b, A, B, m), refs):
        if t is not None and t.requires_grad:
            assert t.grad is not None and t.grad.dtype == t.dtype, (name, t.grad)
            assert_close(t.grad, ref.grad, dtype, f"dora composed grad_{name}")
    # with dropout, or grad_m by recomputation, the Function runs
    pin_dropout_seed(monkeypatch)
    with fusedpeft.use_backend("cublas_autograd"):
        dora_linear(x, W, b, A, B, 1.3, m, dropout_p=0.3, training=True)
        assert entered == [1]
        use_settings(output_scale_grad="recompute")
        dora_linear(x, W, b, A, B, 1.3, m)
    assert entered == ([1, 1] if m_grad else [1])


def _projection(delta, delta_ref):
    """<delta, delta_ref> / <delta_ref, delta_ref>: how much of float64's change of the output a
    bf16 run shows (1: all of it; 0: none)."""
    delta, delta_ref = delta.double().flatten(), delta_ref.double().flatten()
    return float(delta @ delta_ref / (delta_ref @ delta_ref))


@pytest.mark.parametrize("path,dropout", [(b, p) for b in BACKENDS["dora_linear"] for p in (0.0, 0.3)]
                         + [("cublas_autograd composed", 0.0)])  # composed: without dropout (else the Function runs)
def test_dora_steps_below_bf16_spacing_move_the_output(path, dropout, monkeypatch, use_settings):
    """A bf16 layer with float32 adapters and magnitude, as trained: B a few 1e-4 (two AdamW
    steps) and m within 3e-4 of the norm. Each change is under half a bf16 step of x W^T, so only a
    delta formed on its own and rounded onto the base once survives. How much of float64's change
    each path keeps, of the whole (from x W^T) and of m's step alone (a magnitude or c = m / n cast
    to bf16 rounds to the norm and keeps none of it), must be at least what peft's arithmetic keeps
    (its float32 delta added to the bf16 base, computed here), less 0.1."""
    from fusedpeft.ops import _autograd

    backend = path.split()[0]
    if path.endswith("composed"):
        monkeypatch.setattr(_autograd, "COMPOSED_DEVICES", {"cuda", "cpu"})
        use_settings(output_scale_grad="save")
    M, K, N, r, s = 256, 128, 96, 8, 2.0
    x = torch.randn(M, K).to(torch.bfloat16)
    W = (torch.randn(N, K) / K**0.5).to(torch.bfloat16)
    A = torch.randn(r, K) / K**0.5
    B = 4e-4 * torch.randint(0, 2, (N, r)).float().mul(2).sub(1)
    norm = (W.double() + s * B.double() @ A.double()).norm(dim=1).float()
    m_steps = [norm, norm * (1 + 3e-4 * torch.randint(0, 2, (N,)).float().mul(2).sub(1))]
    seed = pin_dropout_seed(monkeypatch)
    base = x.double() @ W.double().T  # what an unchanged layer gives: bf16 inputs, exact
    outs, refs = [], []
    for m in m_steps:
        adapters = [leaf(t, torch.float32) for t in (A, B, m)]
        with fusedpeft.use_backend(backend):
            outs.append(dora_linear(leaf(x), W, None, adapters[0], adapters[1], s, adapters[2],
                                    dropout_p=dropout, training=True).detach())
        assert fusedpeft.last_backend("dora_linear") == backend
        mask = None if dropout == 0.0 else backend_mask("dora_linear", backend, seed, x, dropout)
        refs.append(dora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), s, m.double(),
                                          dropout_mask=mask, dropout_p=dropout))
    # peft's arithmetic as the yardstick: its float32 delta (c - 1) t + c s (drop(x) A^T) B^T added to
    # the bf16 x W^T once
    bf16_base = x @ W.T
    x_d = x.float() if dropout == 0.0 else x.float() * mask.float() / (1 - dropout)
    peft_like = [(bf16_base.float() + ((m / norm - 1) * (x_d @ W.float().T) + (m / norm) * (s * (x_d @ A.T) @ B.T))
                  ).to(torch.bfloat16) for m in m_steps]

    def kept(ys):  # (of the whole change, of the magnitude's step)
        return (_projection(ys[1].double() - bf16_base.double(), refs[1] - base),
                _projection(ys[1].double() - ys[0].double(), refs[1] - refs[0]))

    (whole, from_m), (peft_whole, peft_from_m) = kept(outs), kept(peft_like)
    assert whole >= peft_whole - 0.1, f"{path}: {whole:.2f} of the adapter's change survives, peft's way {peft_whole:.2f}"
    assert from_m >= peft_from_m - 0.1, f"{path}: {from_m:.2f} of the magnitude's step survives, peft's way {peft_from_m:.2f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N,r", [(37, 40, 24, 4), (1, 33, 47, 8), (0, 40, 24, 4), (19, 72, 8, 3)])
@pytest.mark.parametrize("want_sum", [True, False])
@pytest.mark.parametrize("fits", [True, False])
def test_dora_magnitude_sums_without_z(dtype, M, K, N, r, want_sum, fits, monkeypatch):
    """The recompute mode's kernel (Triton interpreter): sum_rows(g * z) and sum_rows(g) with
    z = x W^T + u_s B^T never stored, against float64; and its cuBLAS fallback where no tile config
    holds the epilogue (fits=False)."""
    from fusedpeft._kernels import triton_kernels

    dora_k = triton_kernels.dora
    if not fits:
        def no_config(*args, **kwargs):
            raise triton_kernels.configs.NoConfigFits("forced by the test")

        monkeypatch.setattr(dora_k._MAGNITUDE_GRAD, "launch", no_config)
    x, W = torch.randn(M, K).to(dtype), (torch.randn(N, K) / K**0.5).to(dtype)
    u_s, B = torch.randn(M, r).to(dtype), (torch.randn(N, r) / r**0.5).to(dtype)
    g = torch.randn(M, N).to(dtype)
    dot, col = dora_k.magnitude_grad_sums(x, W, B, u_s, g, want_sum)
    z = x.double() @ W.double().T + u_s.double() @ B.double().T
    assert dot.dtype == torch.float32 and dot.shape == (N,)
    assert_close(dot, (g.double() * z).sum(0), dtype, "sum_rows(g * z)")
    if want_sum:
        assert_close(col, g.double().sum(0), dtype, "sum_rows(g)")
    else:
        assert col is None


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("z_source", [dora_mod.Z_RECOMPUTED, dora_mod.Z_SAVED, dora_mod.Z_FROM_OUTPUT])
def test_dora_recompute_keeps_the_composition_as_a_last_resort(dropout, z_source, monkeypatch):
    """Where "recompute" asks for z to stay out of memory and the Triton kernel can keep it out (p = 0),
    the compositions, whose backward forms z whole, answer tuning.LAST_RESORT unmeasured; with dropout
    (every backend forms z then) or in save mode they are timed like the others."""
    from fusedpeft import backends, tuning

    monkeypatch.setattr(tuning, "time_ms", lambda step: 0.5)
    x, W = torch.randn(9, 16), torch.randn(12, 16)
    A, B, m = torch.randn(4, 16), torch.randn(12, 4), torch.rand(12) + 0.5
    norm = dora_mod.dora_weight_norm(W, A, B, 1.3)
    needs = (True, False, False, True, True, True)
    _, bench = dora_mod._tune(x, W, None, A, B, m, 1.3, norm, dropout, torch.tensor([3]), z_source, needs)
    last = z_source == dora_mod.Z_RECOMPUTED and dropout == 0.0
    assert bench(backends._REGISTRY["dora_linear"]["torch"].impl()) == (tuning.LAST_RESORT if last else 0.5)


@pytest.mark.parametrize("backend", BACKENDS["dora_linear"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("lead", [(2, 5), (3, 23)], ids=["M<K", "M>K"])
def test_dora_float32_adapters_beside_a_bf16_base(backend, dropout, lead, monkeypatch):
    """peft's default: float32 A, B and magnitude beside a bf16 layer. Their gradients come back in
    float32 (the backends write them so where they can) and match float64."""
    x = leaf(torch.randn(*lead, 20), torch.bfloat16)
    W = leaf(torch.randn(36, 20) / 20**0.5, torch.bfloat16, requires_grad=False)
    A, B = leaf(torch.randn(4, 20) / 20**0.5), leaf(torch.randn(36, 4) / 2)
    m = leaf(torch.rand(36) + 0.5)
    seed = pin_dropout_seed(monkeypatch)
    with fusedpeft.use_backend(backend):
        y = dora_linear(x, W, None, A, B, 1.3, m, dropout_p=dropout, training=True)
    assert y.dtype == torch.bfloat16
    g = lora_upstream_grad(y, _dora_rank_weights(W, A, B, 1.3, m), max_cond=4.0)
    y.backward(g)
    mask = backend_mask("dora_linear", backend, seed, x, dropout)
    refs = [leaf(t, torch.float64, requires_grad=t.requires_grad) for t in (x, W, A, B, m)]
    y_ref = dora_linear_reference(refs[0], refs[1], None, refs[2], refs[3], 1.3, refs[4], dropout_mask=mask,
                                  dropout_p=dropout)
    y_ref.backward(g.double())
    assert_close(y, y_ref, torch.bfloat16, f"dora[{backend}] y")
    for name, t, ref in zip(["x", "A", "B", "m"], (x, A, B, m), (refs[0], *refs[2:])):
        assert t.grad.dtype == t.dtype, (name, t.grad.dtype)
        assert_close(t.grad, ref.grad, torch.bfloat16, f"dora[{backend}] p={dropout} grad_{name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("N,K,r", [(30, 50, 6), (17, 33, 1), (40, 24, 20), (1, 70, 16), (0, 8, 4)])
def test_dora_norm_without_forming_the_merged_weight(backend, dtype, adapter_dtype, N, K, r):
    """||W + s B A||_row against the merged weight's in float64: the composition (torch) and the
    one-launch kernel (triton, under the interpreter here), float32 masters beside a bf16 W too."""
    W = torch.randn(N, K, dtype=dtype)
    A, B = torch.randn(r, K, dtype=adapter_dtype), torch.randn(N, r, dtype=adapter_dtype)
    ref = torch.linalg.vector_norm(W.double() + 0.8 * (B.double() @ A.double()), dim=1)
    with fusedpeft.use_backend(backend):
        by_kernel = fusedpeft.backends.helper_impl("dora_linear", "triton", W, A) is not None
        norm = dora_mod.dora_weight_norm(W, A, B, 0.8)
        cached = dora_mod.weight_row_sq_norm(W)
        from_cached = dora_mod.dora_weight_norm(W, A, B, 0.8, cached)
    assert by_kernel == (backend == "triton" and dtype != torch.float64)
    assert norm.shape == (N,) and norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(norm, ref, dtype, "norm")
    assert_close(from_cached, ref, dtype, "norm from the cached ||W||^2")


def test_dora_norm_under_compile_is_the_traceable_composition(monkeypatch):
    """While torch.compile traces, the norm is the composition of torch ops (the one-launch kernel
    is an eager call), with the same value."""
    N, K, r = 24, 40, 4
    W, A, B = torch.randn(N, K), torch.randn(r, K), torch.randn(N, r)
    with fusedpeft.use_backend("triton"):
        eager = dora_mod.dora_weight_norm(W, A, B, 0.5)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        asked = []
        monkeypatch.setattr(fusedpeft.backends, "helper_impl", lambda *a: asked.append(a))
        traced = dora_mod.dora_weight_norm(W, A, B, 0.5)
    assert not asked
    assert_close(traced, eager, torch.float32, "norm under compile")


def test_dora_linear_bad_input_is_named():
    x, W = torch.randn(3, 8), torch.randn(5, 8)
    A, B = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="magnitude must have shape \\(5,\\)"):
        dora_linear(x, W, None, A, B, 1.0, torch.ones(4))
    with pytest.raises(ValueError, match="weight_norm must have shape"):
        dora_linear(x, W, None, A, B, 1.0, torch.ones(5), weight_norm=torch.ones(3))


# ----------------------------------------------------------------------------- the layer against peft
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 10, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _perturb_magnitudes(pm):
    for name, p in pm.named_parameters():  # magnitudes away from their start, so that m / n is not 1
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.rand_like(p))


def _twins(make, targets):
    return peft_twins(make(), prepare=_perturb_magnitudes, r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                      init_lora_weights=False)


def _run(model, x):
    return model(x) if x.is_floating_point() else model(input_ids=x).logits


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_dora_layer_outputs_and_every_gradient_match_peft(kind):
    make, targets, x = ((MLP, ["fc1", "fc2"], torch.randn(3, 5, 12)) if kind == "mlp"
                        else (tiny_llama, ["q_proj", "v_proj", "down_proj"], torch.randint(0, 60, (2, 7))))
    _, pm, fm = _twins(make, targets)
    assert isinstance(next(m for m in fm.modules() if isinstance(m, fusedpeft.LoraLinear)).lora_variant["default"](),
                      fusedpeft.modules.dora.DoraVariant)
    assert_step_matches_peft(pm, fm, _run(pm, x), _run(fm, x), "lora_magnitude_vector")


def test_dora_magnitude_starts_at_the_norm_as_peft():
    base = MLP()
    config = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(**config))
    for name in ("fc1", "fc2"):
        ours = getattr(fm, name).lora_magnitude_vector["default"].weight
        theirs = getattr(pm.base_model.model, name).lora_magnitude_vector["default"].weight
        assert_close(ours, theirs, torch.float32, name)
    x = torch.randn(4, 12)
    assert_close(fm(x), base(x), torch.float32, "a fresh DoRA adapter changes nothing")


def test_dora_files_both_ways(tmp_path):
    base, pm, fm = _twins(MLP, ["fc1", "fc2"])
    x = torch.randn(4, 12)
    fusedpeft.save_adapter(fm, tmp_path / "ours")
    from safetensors.torch import load_file

    assert "base_model.model.fc1.lora_magnitude_vector" in load_file(tmp_path / "ours" / "adapter_model.safetensors")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(back(x), fm(x), torch.float32, "peft loads ours")
    pm.save_pretrained(tmp_path / "theirs")
    ours = fusedpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert ours.fusedpeft_config["default"].use_dora
    assert_close(ours(x), pm(x), torch.float32, "we load peft's")


def test_dora_merge_unmerge_eject_match_peft():
    base, pm, fm = _twins(MLP, ["fc1", "fc2"])
    x = torch.randn(4, 12)
    y = fm(x)
    fusedpeft.merge(fm)
    pm.merge_adapter()
    assert_close(fm.fc1.base_layer.weight, pm.base_model.model.fc1.base_layer.weight, torch.float32, "merged weight")
    assert_close(fm(x), y, torch.float32, "merged output")
    fusedpeft.unmerge(fm)
    assert_close(fm.fc1.base_layer.weight, base.fc1.weight, torch.float32, "unmerged weight")
    assert_close(fm(x), y, torch.float32, "unmerged output")
    fusedpeft.eject(fm, merge=True)
    assert type(fm.fc1) is nn.Linear
    assert_close(fm(x), y, torch.float32, "ejected with the merge")


def test_dora_norm_is_kept_in_eval_and_recomputed_when_weights_change(monkeypatch):
    _, _, fm = _twins(MLP, ["fc1"])
    calls = []
    real = dora_mod.dora_weight_norm
    monkeypatch.setattr(dora_mod, "dora_weight_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    from fusedpeft.modules import dora as dora_layer

    monkeypatch.setattr(dora_layer, "dora_weight_norm", dora_mod.dora_weight_norm)
    x = torch.randn(3, 12)
    fm.eval()
    with torch.no_grad():
        y = fm(x)
        fm(x)
        assert len(calls) == 1  # computed once, kept
        fm.fc1.lora_B["default"].weight.add_(0.5)  # A or B change: computed again, and it matters
        assert not torch.allclose(fm(x), y)
        assert len(calls) == 2
    fm.train()
    fm(x)
    fm(x)
    assert len(calls) == 4  # training: every step


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dora_layer_reads_the_weights_square_norm_only_for_the_composition(backend, monkeypatch):
    """A training layer's norm each step: the composition (torch) takes ||W||^2 from the layer's
    cache, made once per weight; the one-launch kernel (triton, the interpreter here) computes it
    itself, and the layer then never forms it. The output is the same either way."""
    from fusedpeft.modules import dora as dora_layer

    _, _, fm = _twins(MLP, ["fc1"])
    made = []
    real = dora_layer.weight_row_sq_norm
    monkeypatch.setattr(dora_layer, "weight_row_sq_norm", lambda w: made.append(1) or real(w))
    x = torch.randn(3, 12)
    fm.train()
    with fusedpeft.use_backend(backend):
        y = [fm(x) for _ in range(2)]
    assert len(made) == (1 if backend == "torch" else 0)
    with fusedpeft.use_backend("torch" if backend == "triton" else "triton"):
        other = fm(x)
    assert_close(other, y[0], torch.float32, "the other norm path")


def test_dora_from_peft_keeps_names_parameters_outputs():
    base, pm, _ = _twins(tiny_llama, ["q_proj", "v_proj"])
    ids = torch.randint(0, 60, (2, 7))
    before = [(n, id(p)) for n, p in pm.named_parameters()]
    y0 = pm(input_ids=ids).logits
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedpeft.from_peft(pm)
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "PeftLoraLinear"
    assert [(n, id(p)) for n, p in pm.named_parameters()] == before
    y1 = pm(input_ids=ids).logits
    assert_close(y1, y0, torch.float32, "after from_peft")
    y1.sum().backward()
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.grad is not None


def test_dora_refused_where_not_implemented():
    with pytest.raises(ValueError, match="use_dora together with lora_bias"):
        fusedpeft.LoraConfig(target_modules=["fc1"], use_dora=True, lora_bias=True)

    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)

    model = WithEmbedding()
    with pytest.raises(ValueError, match="use_dora=True is not implemented on the nn.Embedding emb"):
        fusedpeft.inject(model, fusedpeft.LoraConfig(target_modules=["emb"], use_dora=True))
    assert type(model.emb) is nn.Embedding
