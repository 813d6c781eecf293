"""LoraLinear / IA3Linear / SSFLinear against the float64 formula: forward, gradients, several named adapters,
enable/disable, merge/unmerge, around nn.Linear and transformers' Conv1D (weight stored (in, out))."""
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fusedpeft import IA3Linear, LoraLinear, SSFLinear, backends
from fusedpeft.modules import LoraVariant
from fusedpeft.modules.dora import DoraVariant
from fusedpeft.ops import ssf_linear_reference

from helpers import assert_close, leaf, pin_dropout_seed, rel_err

DTYPES = [torch.float32, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("one_thread")
# Conv1D always has a bias (its forward is addmm(bias, ...)).
KINDS = [("linear", True), ("linear", False), ("conv1d", True)]
K, N = 24, 20  # in_features, out_features (K != N so a transposed weight cannot pass)
# A merge followed by an unmerge must give the weight back within this relative norm error: fp32
# 1e-6; bf16 one rounding (unit roundoff 2^-8) per merge and per unmerge of each adapter.
UNMERGE_TOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8}


def _unmerge_tol(dtype, n_adapters=1):
    return UNMERGE_TOL[dtype] * (2 * n_adapters if dtype == torch.bfloat16 else 1)


def _base(kind, bias, dtype, in_f=K, out_f=N):
    if kind == "conv1d":
        layer = Conv1D(out_f, in_f)  # weight (in, out)
    else:
        layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) / in_f**0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn_like(layer.bias))
    return layer.to(dtype)


def _w_out_in(base):
    """The base weight as (out, in), whatever the layer stores."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _lora(base, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D: "setting fan_in_fan_out=True"
        return LoraLinear(base, fan_in_fan_out=isinstance(base, Conv1D), **kw)


def _ia3(base, **kw):
    kw.setdefault("init_ia3_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return IA3Linear(base, fan_in_fan_out=isinstance(base, Conv1D), **kw)


def _ssf(base, **kw):
    kw.setdefault("init_ssf_weights", False)  # random scale and shift: the identity init hides a dead path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SSFLinear(base, fan_in_fan_out=isinstance(base, Conv1D), **kw)


MAKERS = {"lora": _lora, "ia3": _ia3, "ssf": _ssf}


def _d(t):
    return None if t is None else t.detach().double()


def _base_ref(base, x):
    """float64: x W^T + b of the base layer."""
    y = _d(x) @ _d(_w_out_in(base)).T
    return y if base.bias is None else y + _d(base.bias)


def _lora_ref(layer, x, names):
    """float64: x W^T + b + sum_i s_i (x A_i^T) B_i^T."""
    y = _base_ref(layer.base_layer, x)
    for n in names:
        y = y + layer.scaling[n] * ((_d(x) @ _d(layer.lora_A[n].weight).T) @ _d(layer.lora_B[n].weight).T)
    return y


def _ia3_ref(layer, x, names):
    """float64: output scaling (x W^T + b) * prod l_i, or input scaling (x * prod l_i) W^T + b."""
    scale = torch.ones(K if layer.is_feedforward else N, dtype=torch.float64)
    for n in names:
        scale = scale * _d(layer.ia3_l[n]).flatten()
    y = _base_ref(layer.base_layer, _d(x) * scale if layer.is_feedforward else x)
    return y if layer.is_feedforward else y * scale


def _ssf_ref(layer, x, names):
    """float64: the active adapters' affine maps applied in order, ((z s_1 + t_1) s_2 + t_2) ..."""
    y = _base_ref(layer.base_layer, x)
    for n in names:
        y = y * _d(layer.ssf_scale[n]) + _d(layer.ssf_shift[n])
    return y


def _x(dtype, requires_grad=False):
    return leaf(torch.randn(3, 5, K), dtype, requires_grad)


def _trainable(layer):
    return sorted(n for n, p in layer.named_parameters() if p.requires_grad)


def _randomise_ia3(layer):
    with torch.no_grad():
        for p in layer.ia3_l.values():
            p.copy_(1.0 + 0.5 * torch.randn_like(p))  # away from zero and one


# ----------------------------------------------------------------------------- forward + grads
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_lora_forward_and_grads(kind, bias, dtype):
    base = _base(kind, bias, dtype)
    weight_obj, bias_obj, ptr = base.weight, base.bias, base.weight.data_ptr()
    layer = _lora(base)
    # The base layer is wrapped, not copied.
    assert layer.base_layer is base and base.weight is weight_obj and base.bias is bias_obj
    assert base.weight.data_ptr() == ptr
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert _trainable(layer) == ["lora_A.default.weight", "lora_B.default.weight"]
    assert layer.lora_B["default"].weight.abs().sum() > 0

    x = _x(dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, N) and y.dtype == dtype
    xd = leaf(x, torch.float64)
    A, B = leaf(layer.lora_A["default"].weight, torch.float64), leaf(layer.lora_B["default"].weight, torch.float64)
    W = _d(_w_out_in(base))
    y_ref = xd @ W.T + layer.scaling["default"] * ((xd @ A.T) @ B.T)
    if bias:
        y_ref = y_ref + _d(base.bias)
    assert_close(y, y_ref, dtype, f"lora {kind} forward")

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)
    assert_close(layer.lora_A["default"].weight.grad, A.grad, dtype, "grad A")
    assert_close(layer.lora_B["default"].weight.grad, B.grad, dtype, "grad B")
    assert_close(x.grad, xd.grad, dtype, "grad x")
    assert [n for n, p in layer.named_parameters() if p.grad is not None] == _trainable(layer)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2.0 * w


@pytest.mark.parametrize("bias", [False, True])
def test_lora_reads_a_parametrized_base_weight_and_bias(bias):
    """The layer reads its operands from the modules' parameter dicts where they are registered there;
    a parametrised weight (or bias) lives elsewhere and must still be the one the layer computes with."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=bias)
    parametrize.register_parametrization(base, "weight", _Doubled())
    if bias:
        parametrize.register_parametrization(base, "bias", _Doubled())
    layer = _lora(base)
    x = _x(torch.float32, requires_grad=True)
    y = layer(x)
    xd = leaf(x, torch.float64)
    A, B = leaf(layer.lora_A["default"].weight, torch.float64), leaf(layer.lora_B["default"].weight, torch.float64)
    y_ref = xd @ _d(base.weight).T + layer.scaling["default"] * ((xd @ A.T) @ B.T)
    if bias:
        y_ref = y_ref + _d(base.bias)
    assert_close(y, y_ref, torch.float32, "lora over a parametrised base")
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    assert_close(layer.lora_A["default"].weight.grad, A.grad, torch.float32, "grad A")
    assert_close(x.grad, xd.grad, torch.float32, "grad x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_forward_and_grads(kind, bias, dtype, feedforward):
    base = _base(kind, bias, dtype)
    weight_obj, ptr = base.weight, base.weight.data_ptr()
    layer = _ia3(base, is_feedforward=feedforward)
    assert layer.base_layer is base and base.weight is weight_obj and base.weight.data_ptr() == ptr
    assert tuple(layer.ia3_l["default"].shape) == ((1, K) if feedforward else (N, 1))  # peft's shapes
    assert _trainable(layer) == ["ia3_l.default"]
    _randomise_ia3(layer)

    x = _x(dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, N) and y.dtype == dtype
    xd = leaf(x, torch.float64)
    l = leaf(layer.ia3_l["default"], torch.float64)
    W, b = _d(_w_out_in(base)), _d(base.bias)
    if feedforward:
        y_ref = (xd * l.flatten()) @ W.T + (0 if b is None else b)
    else:
        y_ref = (xd @ W.T + (0 if b is None else b)) * l.flatten()
    assert_close(y, y_ref, dtype, f"ia3 {kind} ff={feedforward}")

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)
    assert layer.ia3_l["default"].grad.shape == layer.ia3_l["default"].shape
    assert_close(layer.ia3_l["default"].grad, l.grad, dtype, "grad l")
    assert_close(x.grad, xd.grad, dtype, "grad x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_ssf_forward_and_grads(kind, bias, dtype):
    base = _base(kind, bias, dtype)
    weight_obj, ptr = base.weight, base.weight.data_ptr()
    layer = _ssf(base)
    assert layer.base_layer is base and base.weight is weight_obj and base.weight.data_ptr() == ptr
    assert layer.fan_in_fan_out == (kind == "conv1d")
    scale, shift = layer.ssf_scale["default"], layer.ssf_shift["default"]
    assert tuple(scale.shape) == tuple(shift.shape) == (N,)
    assert _trainable(layer) == ["ssf_scale.default", "ssf_shift.default"]
    assert (scale - 1).abs().min() > 0 and shift.abs().min() > 0  # random, far from the identity

    x = _x(dtype, requires_grad=True)  # 3-D input
    y = layer(x)
    assert y.shape == (3, 5, N) and y.dtype == dtype
    xd, s, t = leaf(x, torch.float64), leaf(scale, torch.float64), leaf(shift, torch.float64)
    y_ref = ssf_linear_reference(xd, _d(_w_out_in(base)), _d(base.bias), s, t)
    assert_close(y, y_ref, dtype, f"ssf {kind} forward")

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)
    assert scale.grad.shape == shift.grad.shape == (N,)
    assert_close(scale.grad, s.grad, dtype, "grad scale")
    assert_close(shift.grad, t.grad, dtype, "grad shift")
    assert_close(x.grad, xd.grad, dtype, "grad x")
    assert [n for n, p in layer.named_parameters() if p.grad is not None] == _trainable(layer)


def test_adapter_weights_are_float32_beside_bf16_base_unless_asked():
    base = _base("linear", True, torch.bfloat16)
    assert _lora(base).lora_A["default"].weight.dtype == torch.float32
    assert _lora(_base("linear", True, torch.bfloat16), autocast_adapter_dtype=False).lora_A["default"].weight.dtype == torch.bfloat16
    assert _ia3(_base("linear", True, torch.bfloat16)).ia3_l["default"].dtype == torch.float32
    ssf = _ssf(_base("linear", True, torch.bfloat16))
    assert ssf.ssf_scale["default"].dtype == ssf.ssf_shift["default"].dtype == torch.float32
    ssf.update_layer("b", autocast_adapter_dtype=False)
    assert ssf.ssf_scale["b"].dtype == ssf.ssf_shift["b"].dtype == torch.bfloat16


def test_conv1d_without_fan_in_fan_out_warns_and_fixes_it():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        layer = LoraLinear(_base("conv1d", True, torch.float32), r=2, init_lora_weights=False)
    assert layer.fan_in_fan_out
    x = _x(torch.float32)
    assert_close(layer(x), _lora_ref(layer, x, ["default"]), torch.float32, "conv1d auto fan_in_fan_out")


def test_default_init_is_a_no_op():
    base = _base("linear", True, torch.float32)
    x = _x(torch.float32)
    assert torch.equal(LoraLinear(base, r=4)(x), base(x))  # B = 0
    base2 = _base("linear", True, torch.float32)
    assert_close(IA3Linear(base2)(x), base2(x).double(), torch.float32, "ia3 scales of one")
    base3 = _base("linear", True, torch.float32)
    ssf = SSFLinear(base3)
    assert torch.equal(ssf.ssf_scale["default"], torch.ones(N)) and torch.equal(ssf.ssf_shift["default"], torch.zeros(N))
    assert_close(ssf(x), base3(x).double(), torch.float32, "ssf scale one, shift zero")


def test_ssf_paper_init_and_bad_init():
    layer = SSFLinear(nn.Linear(4, 4000), init_ssf_weights="ssf")  # scale ~ N(1, 0.02), shift ~ N(0, 0.02)
    scale, shift = layer.ssf_scale["default"], layer.ssf_shift["default"]
    assert abs(scale.mean().item() - 1) < 0.005 and 0.015 < scale.std().item() < 0.025
    assert abs(shift.mean().item()) < 0.005 and 0.015 < shift.std().item() < 0.025
    for bad in ("gaussian", 1, None):
        with pytest.raises(ValueError, match="init_ssf_weights must be True, False or 'ssf'"):
            SSFLinear(nn.Linear(4, 3), init_ssf_weights=bad)


# ----------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_lora_several_adapters(kind, bias, dtype):
    layer = _lora(_base(kind, bias, dtype), adapter_name="a", r=2, lora_alpha=3)
    layer.update_layer("b", 5, 7.0, init_lora_weights=False)
    layer.update_layer("c", 3, 2.0, init_lora_weights=False, use_rslora=True)
    assert layer.scaling["c"] == pytest.approx(2.0 / 3**0.5)
    # New adapters arrive inactive and frozen; the first one stays active.
    assert layer.active_adapters == ["a"] and layer.adapter_names == ["a", "b", "c"]
    assert _trainable(layer) == ["lora_A.a.weight", "lora_B.a.weight"]
    layer.eval()
    x = _x(dtype)
    assert_close(layer(x), _lora_ref(layer, x, ["a"]), dtype, "a")

    layer.set_adapter("b")
    assert layer.active_adapter == "b"
    assert _trainable(layer) == ["lora_A.b.weight", "lora_B.b.weight"]
    assert_close(layer(x), _lora_ref(layer, x, ["b"]), dtype, "b")

    layer.set_adapter(["a", "c"])  # two at once: the updates add up
    assert layer.active_adapters == ["a", "c"]
    assert _trainable(layer) == ["lora_A.a.weight", "lora_A.c.weight", "lora_B.a.weight", "lora_B.c.weight"]
    y = layer(x)
    assert_close(y, _lora_ref(layer, x, ["a", "c"]), dtype, "a+c")
    assert rel_err(y, _lora_ref(layer, x, ["a"])) > 10 * rel_err(y, _lora_ref(layer, x, ["a", "c"]))

    # Gradients of two active adapters reach both and only them.
    x_grad = _x(dtype, requires_grad=True)
    layer(x_grad).square().sum().backward()
    grads = sorted(n for n, p in layer.named_parameters() if p.grad is not None)
    assert grads == ["lora_A.a.weight", "lora_A.c.weight", "lora_B.a.weight", "lora_B.c.weight"]

    with pytest.raises(KeyError, match="nope"):
        layer.set_adapter(["a", "nope"])
    assert layer.active_adapters == ["a", "c"]
    with pytest.raises(ValueError, match="already exists"):
        layer.update_layer("b", 2, 2.0)

    layer.delete_adapter("a")
    assert layer.adapter_names == ["b", "c"] and layer.active_adapters == ["c"]
    assert not any(".a." in k or k.endswith(".a") for k in layer.state_dict())
    assert all("a" not in getattr(layer, n) for n in layer.adapter_layer_names + layer.other_param_names)
    assert "use_rslora" in layer.other_param_names and "a" not in layer.use_rslora
    assert_close(layer(x), _lora_ref(layer, x, ["c"]), dtype, "after delete")
    with pytest.raises(KeyError, match="not found"):
        layer.delete_adapter("a")


def test_lora_two_active_adapters_with_dropout_use_independent_masks(monkeypatch):
    """Training with dropout on two active adapters: adapter 1 fused (mask from the op's seed), adapter
    2 added with its own nn.Dropout mask; check both against the formula with the masks replayed."""
    dtype, p = torch.float32, 0.4
    layer = _lora(_base("linear", True, dtype), adapter_name="a", r=3, lora_dropout=p)
    layer.update_layer("b", 2, 5.0, lora_dropout=p, init_lora_weights=False)
    layer.set_adapter(["a", "b"])
    layer.train()
    seed = pin_dropout_seed(monkeypatch)
    x = _x(dtype)
    torch_seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(torch_seed)
    with backends.use_backend("torch"):  # the mask replayed below is the torch backend's
        y = layer(x)
    impl = backends._REGISTRY["lora_linear"]["torch"].impl()
    mask_a = impl.dropout_mask(seed, (15, K), p, x.device).reshape(x.shape).double()
    torch.manual_seed(torch_seed)
    mask_b = nn.functional.dropout(torch.ones_like(x), p, training=True).double() * (1 - p)
    assert not torch.equal(mask_a, mask_b)
    xd = _d(x)
    ref = xd @ _d(layer.base_layer.weight).T + _d(layer.base_layer.bias)
    for n, mask in (("a", mask_a), ("b", mask_b)):
        xm = xd * mask / (1 - p)
        ref = ref + layer.scaling[n] * ((xm @ _d(layer.lora_A[n].weight).T) @ _d(layer.lora_B[n].weight).T)
    assert_close(y, ref, dtype, "two adapters with dropout")
    layer.eval()
    assert_close(layer(x), _lora_ref(layer, x, ["a", "b"]), dtype, "eval ignores dropout")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_several_adapters(dtype, feedforward):
    layer = _ia3(_base("linear", True, dtype), adapter_name="a", is_feedforward=feedforward)
    layer.update_layer("b", init_ia3_weights=False)
    layer.update_layer("c", init_ia3_weights=False)
    _randomise_ia3(layer)
    assert layer.active_adapters == ["a"] and _trainable(layer) == ["ia3_l.a"]
    x = _x(dtype)
    assert_close(layer(x), _ia3_ref(layer, x, ["a"]), dtype, "a")
    layer.set_adapter("c")
    assert _trainable(layer) == ["ia3_l.c"]
    assert_close(layer(x), _ia3_ref(layer, x, ["c"]), dtype, "c")
    layer.set_adapter(["a", "b"])  # two at once: the scales multiply
    assert _trainable(layer) == ["ia3_l.a", "ia3_l.b"]
    assert_close(layer(x), _ia3_ref(layer, x, ["a", "b"]), dtype, "a*b")
    x_grad = _x(dtype, requires_grad=True)
    layer(x_grad).square().sum().backward()
    assert sorted(n for n, p in layer.named_parameters() if p.grad is not None) == ["ia3_l.a", "ia3_l.b"]
    layer.delete_adapter("b")
    assert layer.adapter_names == ["a", "c"] and layer.active_adapters == ["a"]
    assert_close(layer(x), _ia3_ref(layer, x, ["a"]), dtype, "after delete")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_ssf_several_adapters(kind, bias, dtype):
    layer = _ssf(_base(kind, bias, dtype), adapter_name="a")
    layer.update_layer("b", init_ssf_weights=False)
    layer.update_layer("c", init_ssf_weights=False)
    assert layer.active_adapters == ["a"] and layer.adapter_names == ["a", "b", "c"]
    assert _trainable(layer) == ["ssf_scale.a", "ssf_shift.a"]
    x = _x(dtype)
    assert_close(layer(x), _ssf_ref(layer, x, ["a"]), dtype, "a")
    layer.set_adapter("c")
    assert _trainable(layer) == ["ssf_scale.c", "ssf_shift.c"]
    assert_close(layer(x), _ssf_ref(layer, x, ["c"]), dtype, "c")

    layer.set_adapter(["a", "b"])  # two at once: b's map applied to a's output
    assert _trainable(layer) == ["ssf_scale.a", "ssf_scale.b", "ssf_shift.a", "ssf_shift.b"]
    y_ab = layer(x)
    assert_close(y_ab, _ssf_ref(layer, x, ["a", "b"]), dtype, "a then b")
    layer.set_adapter(["b", "a"])  # the order matters
    y_ba = layer(x)
    assert_close(y_ba, _ssf_ref(layer, x, ["b", "a"]), dtype, "b then a")
    assert rel_err(y_ba, _ssf_ref(layer, x, ["a", "b"])) > 10 * rel_err(y_ba, _ssf_ref(layer, x, ["b", "a"]))

    # Gradients of two active adapters reach both (scale and shift) and only them, against float64.
    layer.set_adapter(["a", "b"])
    x_grad = _x(dtype, requires_grad=True)
    y = layer(x_grad)
    leaves = {f"{c}.{n}": leaf(getattr(layer, c)[n], torch.float64) for c in ("ssf_scale", "ssf_shift") for n in "ab"}
    xd = leaf(x_grad, torch.float64)
    y_ref = ssf_linear_reference(xd, _d(_w_out_in(layer.base_layer)), _d(layer.base_layer.bias), leaves["ssf_scale.a"], leaves["ssf_shift.a"])
    y_ref = y_ref * leaves["ssf_scale.b"] + leaves["ssf_shift.b"]
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    params = dict(layer.named_parameters())
    assert sorted(n for n, p in params.items() if p.grad is not None) == sorted(leaves)
    for name, ref in leaves.items():
        assert_close(params[name].grad, ref.grad, dtype, f"grad {name}")
    assert_close(x_grad.grad, xd.grad, dtype, "grad x")

    layer.delete_adapter("b")
    assert layer.adapter_names == ["a", "c"] and layer.active_adapters == ["a"]
    assert not any(k.endswith(".b") for k in layer.state_dict())
    assert_close(layer(x), _ssf_ref(layer, x, ["a"]), dtype, "after delete")


# ----------------------------------------------------------------------------- enable / disable
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", list(MAKERS))
@pytest.mark.parametrize("kind,bias", KINDS)
def test_disabled_output_is_the_base_output_bit_for_bit(method, kind, bias, dtype):
    base = _base(kind, bias, dtype)
    layer = MAKERS[method](base)
    x = _x(dtype)
    y_base = base(x)
    y_adapted = layer(x)
    assert not torch.equal(y_adapted, y_base)
    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert torch.equal(layer(x), y_base)
    layer.enable_adapters(True)
    assert torch.equal(layer(x), y_adapted)
    # No active adapter at all: the base runs too.
    layer.set_adapter([])
    assert torch.equal(layer(x), y_base)


@pytest.mark.parametrize("method,bias", [("lora", True), ("ssf", False)])
def test_disabling_a_merged_layer_unmerges_it(method, bias):
    base = _base("linear", bias, torch.float32)
    layer = MAKERS[method](base)
    w0 = base.weight.detach().clone()
    layer.merge()
    layer.enable_adapters(False)
    x = _x(torch.float32)
    y = layer(x)
    assert not layer.merged
    assert rel_err(base.weight, w0) < UNMERGE_TOL[torch.float32]
    assert base.bias is None or bias  # SSF's merged shift on a bias-free layer is gone again
    assert torch.equal(y, base(x))


# ----------------------------------------------------------------------------- merge / unmerge
def _before_merge(layer, ref_fn, dtype):
    """Make adapters "a" and "b" active; return the base weight and bias as they are, an input,
    its float64 reference output and the unmerged output."""
    layer.set_adapter(["a", "b"])
    base = layer.base_layer
    w0, b0 = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
    x = _x(dtype)
    return w0, b0, x, ref_fn(layer, x, ["a", "b"]), layer(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_lora_merge_unmerge(kind, bias, dtype):
    base = _base(kind, bias, dtype)
    layer = _lora(base, adapter_name="a", r=3, lora_alpha=5)
    layer.update_layer("b", 2, 4.0, init_lora_weights=False)
    layer.eval()
    weight_obj = base.weight
    w0, b0, x, ref, y_unmerged = _before_merge(layer, _lora_ref, dtype)

    layer.merge()
    assert layer.merged and layer.merged_adapters == ["a", "b"]
    assert base.weight is weight_obj  # merged in place
    assert not torch.equal(base.weight, w0)
    # The merged weight is W + sum s_i B_i A_i, stored as the layer stores it.
    delta = sum(layer.scaling[n] * _d(layer.lora_B[n].weight) @ _d(layer.lora_A[n].weight) for n in "ab")
    expected = _d(w0.T if kind == "conv1d" else w0) + delta
    assert_close(_w_out_in(base), expected, dtype, "merged weight")
    y_merged = layer(x)
    assert_close(y_merged, ref, dtype, "merged forward")
    assert_close(y_merged, y_unmerged.double(), dtype, "merged vs unmerged")
    if b0 is not None:
        assert torch.equal(base.bias, b0)  # LoRA never touches the bias

    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert layer.merged_adapters == ["a", "b"]

    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    assert rel_err(base.weight, w0) <= _unmerge_tol(dtype, 2)
    assert_close(layer(x), ref, dtype, "after unmerge")


def test_lora_merge_of_one_named_adapter_then_forward_runs_base():
    layer = _lora(_base("linear", True, torch.float32), adapter_name="a")
    layer.update_layer("b", 2, 2.0, init_lora_weights=False)
    x = _x(torch.float32)
    ref_b = _lora_ref(layer, x, ["b"])
    layer.merge(adapter_names=["b"])  # not active, merged anyway
    assert layer.merged_adapters == ["b"]
    # Once anything is merged the layer runs its base weight only (peft's rule), so "a" is off.
    assert_close(layer(x), ref_b, torch.float32, "merged b")
    weight = layer.base_layer.weight.clone()
    with pytest.raises(KeyError, match="zzz"):  # refused before "a" is merged: nothing changes
        layer.merge(adapter_names=["a", "zzz"])
    assert layer.merged_adapters == ["b"] and torch.equal(layer.base_layer.weight, weight)
    with pytest.raises(RuntimeError, match="unmerge it"):
        layer.delete_adapter("b")


@pytest.mark.parametrize(
    "method,bias", [("lora", True), ("ia3", True), ("ssf", True), ("ssf", False)], ids=["lora", "ia3", "ssf", "ssf-no-bias"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_safe_merge_with_nan_adapter_raises_and_changes_nothing(method, bias, dtype):
    base = _base("linear", bias, dtype)
    layer = MAKERS[method](base)
    with torch.no_grad():
        if method == "lora":
            layer.lora_B["default"].weight[1, 0] = float("nan")
        elif method == "ia3":
            layer.ia3_l["default"][2, 0] = float("nan")
        else:
            layer.ssf_shift["default"][2] = float("nan")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert base.state_dict().keys() == state.keys()  # no bias was added to a bias-free layer
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    assert not layer.merged and layer.merged_adapters == []


@pytest.mark.parametrize("method,bias", [("ia3", True), ("ssf", True), ("ssf", False)])
def test_merge_of_zero_scale_raises(method, bias):
    base = _base("linear", bias, torch.float32)
    layer = MAKERS[method](base)
    with torch.no_grad():
        (layer.ia3_l if method == "ia3" else layer.ssf_scale)["default"].view(-1)[0] = 0.0
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=f"{method.upper()} adapter 'default' has zero scales"):
        layer.merge()
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items()) and not layer.merged


def _merged_forward_then_unmerge(layer, x, ref, y_unmerged, w0, dtype):
    """After merge() of adapters "a" and "b": the merged forward, a second merge skipped with a
    warning, and unmerge giving the weight back within two adapters' roundings."""
    y_merged = layer(x)
    assert_close(y_merged, ref, dtype, "merged forward")
    assert_close(y_merged, y_unmerged.double(), dtype, "merged vs unmerged")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(adapter_names=["a"])
    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    assert rel_err(layer.base_layer.weight, w0) <= _unmerge_tol(dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_merge_unmerge(kind, bias, dtype, feedforward):
    base = _base(kind, bias, dtype)
    layer = _ia3(base, adapter_name="a", is_feedforward=feedforward)
    layer.update_layer("b", init_ia3_weights=False)
    _randomise_ia3(layer)
    w0, b0, x, ref, y_unmerged = _before_merge(layer, _ia3_ref, dtype)
    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    scale = _d(layer.ia3_l["a"]).flatten() * _d(layer.ia3_l["b"]).flatten()
    w_out_in = _d(w0.T if kind == "conv1d" else w0)
    if feedforward:  # input scaling: columns of W scaled, bias untouched
        assert_close(_w_out_in(base), w_out_in * scale[None, :], dtype, "merged W (ff)")
        if b0 is not None:
            assert torch.equal(base.bias, b0)
    else:  # output scaling: rows of W and the bias scaled
        assert_close(_w_out_in(base), w_out_in * scale[:, None], dtype, "merged W")
        if b0 is not None:
            assert_close(base.bias, _d(b0) * scale, dtype, "merged bias")
    _merged_forward_then_unmerge(layer, x, ref, y_unmerged, w0, dtype)
    if b0 is not None:
        assert rel_err(base.bias, b0) <= _unmerge_tol(dtype, 2)
    assert_close(layer(x), ref, dtype, "after unmerge")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_ssf_merge_unmerge(kind, bias, dtype):
    base = _base(kind, bias, dtype)
    layer = _ssf(base, adapter_name="a")
    layer.update_layer("b", init_ssf_weights=False)
    with torch.no_grad():  # scales away from zero (unmerge divides by them), either sign
        for p in layer.ssf_scale.values():
            p.copy_((0.5 + torch.rand_like(p)) * torch.randn_like(p).sign())
    weight_obj = base.weight
    w0, b0, x, ref, y_unmerged = _before_merge(layer, _ssf_ref, dtype)

    layer.merge()
    assert layer.merged_adapters == ["a", "b"] and base.weight is weight_obj
    s = {n: _d(layer.ssf_scale[n]) for n in "ab"}
    t = {n: _d(layer.ssf_shift[n]) for n in "ab"}
    w_out_in = _d(w0.T if kind == "conv1d" else w0)
    assert_close(_w_out_in(base), w_out_in * (s["a"] * s["b"])[:, None], dtype, "merged W")
    b_start = torch.zeros(N, dtype=torch.float64) if b0 is None else _d(b0)
    b_merged = (b_start * s["a"] + t["a"]) * s["b"] + t["b"]
    assert_close(base.bias, b_merged, dtype, "merged bias")
    if b0 is None:  # the bias-free layer gained a frozen bias of its own dtype and device
        assert isinstance(base.bias, nn.Parameter) and not base.bias.requires_grad
        assert base.bias.dtype == dtype and base.bias.device == base.weight.device
    _merged_forward_then_unmerge(layer, x, ref, y_unmerged, w0, dtype)
    if b0 is None:
        assert base.bias is None and list(base.state_dict()) == ["weight"]
    else:
        # Unmerging the bias subtracts the shift and divides by the scale: the merged bias's
        # rounding grows by |merged bias| / |scale| against |bias|.
        growth = max(1.0, (b_merged.norm() / b_start.norm()).item() / min(v.abs().min().item() for v in s.values()))
        assert rel_err(base.bias, b0) <= _unmerge_tol(dtype, 2) * growth
    assert_close(layer(x), ref, dtype, "after unmerge")


def test_ssf_merge_of_a_zero_shift_adds_no_bias():
    base = _base("linear", False, torch.float32)
    layer = _ssf(base, adapter_name="a")
    layer.update_layer("b", init_ssf_weights=False)
    with torch.no_grad():
        layer.ssf_shift["a"].zero_()
    x = _x(torch.float32)
    ref = _ssf_ref(layer, x, ["a", "b"])
    layer.merge(adapter_names=["a"])  # only a scale: nothing to put in a bias
    assert base.bias is None
    layer.merge(adapter_names=["b"])  # b's shift: the bias appears, and goes with b's unmerge
    assert base.bias is not None
    assert_close(layer(x), ref, torch.float32, "merged a, b")
    layer.unmerge()
    assert base.bias is None and list(base.state_dict()) == ["weight"]


def test_r_larger_than_layer_only_warns():
    with pytest.warns(UserWarning, match="exceeds"):
        layer = LoraLinear(_base("linear", True, torch.float32, in_f=6, out_f=4), r=5, init_lora_weights=False)
    x = torch.randn(7, 6)
    ref = _d(x) @ _d(layer.base_layer.weight).T + _d(layer.base_layer.bias) + layer.scaling["default"] * (
        _d(x) @ _d(layer.lora_A["default"].weight).T @ _d(layer.lora_B["default"].weight).T
    )
    assert_close(layer(x), ref, torch.float32, "r > min(in, out)")


def test_bad_rank_raises():
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        LoraLinear(_base("linear", True, torch.float32), r=0)


def test_non_linear_base_raises():
    with pytest.raises(TypeError, match="Embedding is not a linear layer"):
        LoraLinear(nn.Embedding(10, 4))


class _TripledVariant(LoraVariant):
    """A LoRA variant for the test: the update counts three times, in the forward and in merges.
    It records each hook call."""

    calls: list = []

    @staticmethod
    def init(module, adapter_name):
        _TripledVariant.calls.append(("init", adapter_name))

    @staticmethod
    def forward(module, adapter_name, x):
        _TripledVariant.calls.append(("forward", adapter_name))
        return _TripledVariant.update(module, adapter_name, x, module.base_layer(x))

    @staticmethod
    def update(module, adapter_name, x, y):
        _TripledVariant.calls.append(("update", adapter_name))
        A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        return y + 3 * module.scaling[adapter_name] * ((x @ A.T) @ B.T)

    @staticmethod
    def merge(module, adapter_name, weight):
        _TripledVariant.calls.append(("merge", adapter_name))
        return weight + 3 * module.delta_weight(adapter_name, weight.dtype)

    @staticmethod
    def unmerge(module, adapter_name, weight):
        _TripledVariant.calls.append(("unmerge", adapter_name))
        return weight - 3 * module.delta_weight(adapter_name, weight.dtype)


def test_lora_variant_runs_the_forward_and_the_merges_of_its_adapter():
    """A variant given to one adapter is what that adapter's forward, per-row forward, merge and
    unmerge run; the layer's other adapters stay plain LoRA, through the fused op."""
    dtype = torch.float32
    _TripledVariant.calls = []
    layer = _lora(_base("linear", True, dtype), adapter_name="v", r=3, variant=_TripledVariant)
    layer.update_layer("plain", 2, 4.0, init_lora_weights=False)
    assert _TripledVariant.calls == [("init", "v")]
    assert layer.lora_variant == {"v": _TripledVariant}
    x = _x(dtype)

    def expected(names):
        y = _base_ref(layer.base_layer, x)
        for n in names:
            lora = (_d(x) @ _d(layer.lora_A[n].weight).T) @ _d(layer.lora_B[n].weight).T
            y = y + (3 if n == "v" else 1) * layer.scaling[n] * lora
        return y

    assert_close(layer(x), expected(["v"]), dtype, "variant alone")
    assert _TripledVariant.calls[-1] == ("update", "v") and ("forward", "v") in _TripledVariant.calls
    layer.set_adapter(["plain", "v"])
    _TripledVariant.calls = []
    assert_close(layer(x), expected(["plain", "v"]), dtype, "plain, then the variant on top")
    assert _TripledVariant.calls == [("update", "v")]
    layer.set_adapter("plain")
    backends.reset_counts()
    assert_close(layer(x), expected(["plain"]), dtype, "plain adapter")
    assert backends.backend_counts() == {("lora_linear", "torch"): 1}, "a plain adapter runs the fused op"
    _TripledVariant.calls = []
    rows = ["v", "__base__", "plain"]
    got = layer(x, adapter_names=rows)
    for i, n in enumerate(rows):
        assert_close(got[i], expected([] if n == "__base__" else [n])[i], dtype, f"per-row {n}")
    assert _TripledVariant.calls == [("update", "v")]

    layer.set_adapter("v")
    before, want = layer.base_layer.weight.detach().clone(), expected(["v"])
    delta = layer.delta_weight("v", torch.float32)
    layer.merge()
    assert _TripledVariant.calls[-1] == ("merge", "v")
    assert_close(layer.base_layer.weight, before + 3 * delta, dtype, "merged weight")
    assert_close(layer(x), want, dtype, "merged forward")
    layer.unmerge()
    assert _TripledVariant.calls[-1] == ("unmerge", "v")
    assert rel_err(layer.base_layer.weight, before) <= _unmerge_tol(dtype)
    layer.delete_adapter("v")
    assert layer.lora_variant == {}


@pytest.mark.parametrize("bad", [dict(init_lora_weights="bogus"), dict(init_lora_weights="pissa", r=40),
                                 dict(init_lora_weights="olora", r=40), dict(lora_bias=True, variant=DoraVariant)],
                         ids=["unknown-init", "pissa-r-too-large", "olora-r-too-large", "dora-lora_bias"])
def test_lora_refused_adapter_leaves_the_layer_as_it_was(bad):
    """A refused update_layer adds nothing (the name can be used again) and changes no weight."""
    layer = _lora(_base("linear", True, torch.float32), adapter_name="a")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    kw = dict(r=4, lora_alpha=8.0)
    kw.update(bad)
    r, alpha = kw.pop("r"), kw.pop("lora_alpha")
    with pytest.raises(ValueError, match="init_lora_weights|needs r <=|lora_bias"):
        layer.update_layer("b", r, alpha, **kw)
    assert layer.adapter_names == ["a"] and layer.active_adapters == ["a"]
    assert set(layer.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    assert all("b" not in getattr(layer, n) for n in layer.adapter_layer_names + layer.other_param_names)
    layer.update_layer("b", 2, 4.0)  # the name is free again
    assert layer.adapter_names == ["a", "b"]
