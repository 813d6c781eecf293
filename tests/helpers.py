"""Shared test helpers: the relative-error measure and tolerances by dtype, and small models."""
import torch
from torch import nn

# Relative Frobenius error allowed against a float64 reference.
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.detach().double().cpu(), reference.detach().double().cpu()
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    assert torch.isfinite(actual).all(), "non-finite values in result"
    denom = reference.norm().item()
    diff = (actual - reference).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual, reference, dtype, what=""):
    err = rel_err(actual, reference)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.1e} ({dtype})"


def leaf(t: torch.Tensor, dtype=None, requires_grad=True) -> torch.Tensor:
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(requires_grad)


# Backends each op must pass the reference tests with. Listed explicitly (not discovered), so a
# backend that fails to load fails the tests instead of silently dropping out of them.
BACKENDS = {
    "lora_linear": ["torch", "triton", "cublas", "cublas_after"],
    "dora_linear": ["torch", "triton", "cublas"],
    "ia3_linear": ["torch", "triton"],
    "ssf_linear": ["torch", "triton"],
}


class RescaledMLP(nn.Module):
    """Three frozen linear layers through the rescaling ops: IA3 output scaling, IA3 input
    scaling, SSF. Scales are 1 + spread * N(0, 1), the SSF shift shift_spread * N(0, 1): never
    the identity init, which would hide a dead path."""

    def __init__(self, sizes=(32, 24, 16, 8), spread=0.5, shift_spread=1.0, act=torch.relu):
        super().__init__()
        d_in, d1, d2, d_out = sizes
        self.l1, self.l2, self.l3 = nn.Linear(d_in, d1), nn.Linear(d1, d2), nn.Linear(d2, d_out)
        for p in self.parameters():
            p.requires_grad_(False)
        self.ia3_out = nn.Parameter(1 + spread * torch.randn(d1))
        self.ia3_in = nn.Parameter(1 + spread * torch.randn(d1))
        self.ssf_scale = nn.Parameter(1 + spread * torch.randn(d_out))
        self.ssf_shift = nn.Parameter(shift_spread * torch.randn(d_out))
        self.act = act

    def forward(self, x):
        from fusedpeft.ops import ia3_linear, ssf_linear

        h = self.act(ia3_linear(x, self.l1.weight, self.l1.bias, self.ia3_out, False))
        h = self.act(ia3_linear(h, self.l2.weight, self.l2.bias, self.ia3_in, True))
        return ssf_linear(h, self.l3.weight, self.l3.bias, self.ssf_scale, self.ssf_shift)


def lora_upstream_grad(y: torch.Tensor, lora_B: torch.Tensor, max_cond: float = 20.0) -> torch.Tensor:
    """A random grad_y for a LoRA output, redrawn while grad_y @ B cancels. The gradients of A
    are scaled by those rank-r dot products (one scalar when M = r = 1), and the rounding error of
    a dot product is about eps * sqrt(sum of its squared terms) in any precision: when the terms
    cancel, a relative-error check of grad_A tests the draw, not the kernel. The ratio
    ||sqrt(g^2 @ B^2)|| / ||g @ B|| (about 1 / |N(0, 1)| for one random dot product, whatever its
    length) stays under max_cond, which rejects about 1 draw in 25."""
    B = lora_B.detach().double()
    for _ in range(100):
        g = torch.randn_like(y)
        flat = g.detach().double().reshape(-1, B.shape[0])
        if flat.numel() == 0 or ((flat**2) @ (B**2)).sqrt().norm() <= max_cond * (flat @ B).norm():
            return g
    raise AssertionError("no well-conditioned upstream gradient in 100 draws")


# Tolerances of the GPU checks: fp32 runs through tf32 tensor cores in the fused kernels; M=1, r=1
# cases are a single rank-1 dot product whose cancellation amplifies tf32 rounding, hence 5e-3.
GPU_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def pin_dropout_seed(monkeypatch) -> int:
    """A random seed, made the one the LoRA and DoRA ops draw their dropout masks from (their seed
    source pinned for the test), so that a test can draw the same mask again."""
    from fusedpeft.ops import lora as lora_ops

    seed = int(torch.randint(0, 2**31 - 1, ()))
    monkeypatch.setattr(lora_ops, "_new_seed", lambda device: torch.tensor([seed], device=device))
    return seed


def backend_mask(op, backend, seed, x, p):
    """The keep-mask (float64, x's shape) that ``backend`` of ``op`` draws over x for seed and p;
    None at p = 0."""
    if not p:
        return None
    import fusedpeft

    impl = fusedpeft.backends._REGISTRY[op][backend].impl()
    return impl.dropout_mask(seed, (x.shape[:-1].numel(), x.shape[-1]), p, x.device).reshape(x.shape).double()


def check_lora_against_float64(lead, K, N, r, dtype, dropout, bias, monkeypatch, backend, device="cuda",
                               adapter_dtype=None):
    """lora_linear through ``backend`` (forced) against the float64 reference with the backend's own
    dropout mask: the output and every gradient, by relative norm error within GPU_TOL. A and B in
    ``adapter_dtype`` when given (float32 masters beside a bf16 layer): their gradients in it too."""
    import fusedpeft
    from fusedpeft.ops import lora_linear, lora_linear_reference

    x = leaf(torch.randn(*lead, K, device=device), dtype)
    W = leaf(torch.randn(N, K, device=device) / K**0.5, dtype, requires_grad=False)
    b = leaf(torch.randn(N, device=device), dtype) if bias else None
    A = leaf(torch.randn(r, K, device=device) / K**0.5, adapter_dtype or dtype)
    B = leaf(torch.randn(N, r, device=device) / r**0.5, adapter_dtype or dtype)
    seed = pin_dropout_seed(monkeypatch)
    with fusedpeft.use_backend(backend):
        y = lora_linear(x, W, b, A, B, 0.75, dropout_p=dropout, training=True)
    assert y.dtype == dtype
    assert fusedpeft.last_backend("lora_linear") == backend
    g = lora_upstream_grad(y, B)
    y.backward(g)
    mask = backend_mask("lora_linear", backend, seed, x, dropout)
    refs = [leaf(t, torch.float64) if t is not None else None for t in (x, W, b, A, B)]
    y_ref = lora_linear_reference(*refs, 0.75, dropout_mask=mask, dropout_p=dropout)
    y_ref.backward(g.double())
    errs = {"y": rel_err(y, y_ref)}
    for name, t, ref in zip("xWbAB", (x, W, b, A, B), refs):
        if t is not None and t.requires_grad:
            errs["grad_" + name] = rel_err(t.grad, ref.grad)
    bad = {k: v for k, v in errs.items() if not v <= GPU_TOL[dtype]}
    assert not bad, f"{backend} {tuple(lead)}x{K}x{N} r={r} {dtype} p={dropout}: errors over {GPU_TOL[dtype]}: {bad}"
    assert A.grad.dtype == A.dtype and B.grad.dtype == B.dtype


def peft_twins(base, prepare=None, **config):
    """(base, peft model, fusedpeft model) under the same LoRA config (peft's field names), the
    fusedpeft model holding peft's adapter tensors, loaded by name (strict: the names are peft's).
    ``prepare(peft_model)`` may change peft's tensors first (under no_grad)."""
    import copy

    import fusedpeft
    import peft

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    fm = fusedpeft.inject(copy.deepcopy(base), fusedpeft.LoraConfig(**config))
    if prepare is not None:
        with torch.no_grad():
            prepare(pm)
    fm.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}, strict=True)
    return base, pm, fm


def assert_step_matches_peft(pm, fm, y_p, y_f, must_train: str):
    """Outputs, then after one backward with a random upstream gradient the same trainable
    parameters (``must_train`` among them) with the same gradients, in float32."""
    assert_close(y_f, y_p, torch.float32, "output")
    g = torch.randn_like(y_p)
    y_p.backward(g)
    y_f.backward(g)
    theirs = {k.removeprefix("base_model.model."): p for k, p in pm.named_parameters() if p.requires_grad}
    ours = {k: p for k, p in fm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and any(must_train in k for k in ours), (sorted(ours), sorted(theirs))
    for name, p in ours.items():
        assert_close(p.grad, theirs[name].grad, torch.float32, f"grad {name}")


class StoppedByTimeLimit(Exception):
    """What cut_after_first_group raises in place of a time limit's kill."""


def cut_after_first_group(monkeypatch, harness):
    """Make benchmarks.harness.run stop (raise StoppedByTimeLimit) as soon as a case of its second
    group is measured, as a time limit would: what the benchmark wrote by then is what a cut run
    leaves behind."""
    run = harness.run

    def cut(cases, **kwargs):
        first, on_result = cases[0].group, kwargs.get("on_result")

        def record(results):
            if results[-1].group != first:
                raise StoppedByTimeLimit
            if on_result is not None:
                on_result(results)

        return run(cases, **{**kwargs, "on_result": record})

    monkeypatch.setattr(harness, "run", cut)
    return run
