"""The ops are torch custom ops with fake implementations: torch.compile(fullgraph=True) must take
a model with fusedpeft layers without graph breaks, forward and backward, and opcheck must pass."""
import pytest
import torch
from torch import nn

import fusedpeft
from fusedpeft.ops import lora as lora_ops

from helpers import RescaledMLP, assert_close


def _model(dropout):
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    return fusedpeft.inject(model, fusedpeft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=dropout))


def _compiled_grads(model, x):
    """The gradients of a fullgraph-compiled step (aot_eager): grad_x and every trainable one."""
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    return grads


def _assert_eager_grads(model, x, grads):
    """The same step in eager mode gives the compiled step's gradients."""
    for p in model.parameters():
        p.grad = None
    x2 = x.detach().clone().requires_grad_()
    model(x2).square().sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "compiled grad_x")
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(grads[n], p.grad, torch.float32, f"compiled grad {n}")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_fullgraph_forward_and_backward(dropout):
    model = _model(dropout).train()
    x = torch.randn(3, 5, 32, requires_grad=True)
    grads = _compiled_grads(model, x)
    if dropout == 0.0:  # deterministic: compare with eager
        _assert_eager_grads(model, x, grads)


def test_compile_inductor_matches_eager():
    model = _model(0.0).eval()
    x = torch.randn(6, 32)
    assert_close(torch.compile(model, fullgraph=True)(x), model(x), torch.float32, "inductor")


def test_opcheck():
    x, W = torch.randn(7, 32), torch.randn(24, 32)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    torch.library.opcheck(lora_ops._lora_fwd, (x, W, torch.randn(24), A, B, 0.5, 0.0, torch.zeros(1, dtype=torch.int64), -1))


@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_compile_fullgraph_rescaling_ops(grad_mode, monkeypatch, use_settings):
    use_settings(output_scale_grad=grad_mode)
    model = RescaledMLP()
    x = torch.randn(3, 5, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    x2 = x.detach().clone().requires_grad_()
    model(x2).square().sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "compiled grad_x")
    assert len(grads) == 4
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0
            assert_close(grads[n], p.grad, torch.float32, f"compiled grad {n}")


@pytest.mark.parametrize("input_scale,save", [(False, True), (False, False), (True, False)])
def test_opcheck_rescaled(input_scale, save):
    from fusedpeft.ops import _rescale

    x, W, b = torch.randn(7, 32), torch.randn(24, 32), torch.randn(24)
    scale = torch.randn(32 if input_scale else 24, requires_grad=True)
    shift = None if input_scale else torch.randn(24, requires_grad=True)
    op = "ssf_linear" if shift is not None else "ia3_linear"
    torch.library.opcheck(_rescale._rescaled_fwd, (x, W, b, scale, shift, input_scale, save, op, -1))


def test_forced_backend_choice_is_a_constant_while_tracing(monkeypatch):
    """Under use_backend, the registry's checks (which import and inspect modules, as
    importlib.util.find_spec does, and which dynamo refuses to trace on torch 2.11) run eagerly
    at trace time: a graph break inside them must not reach a fullgraph compile."""
    from fusedpeft import backends

    choose = backends._choose

    def untraceable_choose(*args):
        torch._dynamo.graph_break()
        return choose(*args)

    monkeypatch.setattr(backends, "_choose", untraceable_choose)
    model = RescaledMLP()
    x = torch.randn(3, 5, 32)
    with fusedpeft.use_backend("torch"):
        expected = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert_close(got, expected, torch.float32, "compiled under use_backend")


@pytest.mark.parametrize("grad_mode", ["save", "recompute"])
def test_compile_fullgraph_dora(grad_mode, use_settings):
    """DoRA layers compile without graph breaks (its norm computed inside the graph) and give
    eager's gradients, the magnitude's included."""
    use_settings(output_scale_grad=grad_mode)
    model = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 8))
    fusedpeft.inject(model, fusedpeft.LoraConfig(r=4, target_modules=["0", "2"], use_dora=True, init_lora_weights=False))
    x = torch.randn(3, 5, 32, requires_grad=True)
    grads = _compiled_grads(model, x)
    assert any("lora_magnitude_vector" in n for n in grads)
    _assert_eager_grads(model, x, grads)


def test_opcheck_dora():
    from fusedpeft.ops import dora as dora_ops

    x, W = torch.randn(7, 32), torch.randn(24, 32)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    m = (torch.rand(24) + 0.5).requires_grad_()
    norm = dora_ops.dora_weight_norm(W, A, B, 0.5)
    for z_source in (dora_ops.Z_SAVED, dora_ops.Z_RECOMPUTED):  # (the custom ops are never given Z_FROM_OUTPUT)
        torch.library.opcheck(dora_ops._OP.forward_op,
                              (x, W, torch.randn(24), A, B, m, 0.5, norm, 0.0, None, z_source, -1))


@pytest.mark.parametrize("lead", [(7,), (3, 5), (0,)])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_serving_ops(lead, bias):
    """The serving ops' custom ops (what torch.compile sees of multi_lora_linear and
    multi_ia3_linear): schema, fake tensors and dispatch agree, 2-D and per-sequence 3-D x."""
    from fusedpeft.ops import multi_lora as ml

    x, W = torch.randn(*lead, 16), torch.randn(12, 16)
    b = torch.randn(12) if bias else None
    A, B = torch.randn(3, 4, 16), torch.randn(3, 12, 4)
    scalings, ranks = torch.rand(3) + 0.5, torch.tensor([4, 2, 0], dtype=torch.int32)
    index = torch.randint(-1, 3, (lead[0],))
    with torch.no_grad():
        torch.library.opcheck(ml._multi_lora_op, (x, W, b, A, B, scalings, ranks, index))
        for feedforward in (False, True):
            scales = torch.rand(3, 16 if feedforward else 12) + 0.5
            torch.library.opcheck(ml._multi_ia3_op, (x, W, b, scales, index, feedforward))
