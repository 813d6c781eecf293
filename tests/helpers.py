"""Shared test helpers: the relative-error measure and tolerances by dtype."""
import torch

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
    "lora_linear": ["torch", "triton"],
    "ia3_linear": ["torch", "triton"],
    "ssf_linear": ["torch", "triton"],
}
