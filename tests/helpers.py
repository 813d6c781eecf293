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
