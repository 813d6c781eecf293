"""SSF linear (scale-shift fine-tuning, Lian et al. 2022): a learned per-output-channel affine map
after a frozen linear layer,

    y = (x W^T + b) * scale + shift,     scale, shift: (N,)

trained alone while W and b stay frozen. The autograd, the backends and the backward's math are
shared with IA3's output scaling (``_rescale.py``): SSF is IA3 plus a shift.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _rescale

OP = "ssf_linear"
_rescale.register_reference(OP)


def ssf_linear_reference(x, weight, bias, ssf_scale, ssf_shift):
    """The formula, written plainly; tests run it in float64."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y * ssf_scale + ssf_shift


def ssf_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ssf_scale: torch.Tensor,
    ssf_shift: torch.Tensor,
) -> torch.Tensor:
    """SSF over any leading shape of x: ``(x W^T + b) * ssf_scale + ssf_shift``, both (out_features,)."""
    for name, t in (("ssf_scale", ssf_scale), ("ssf_shift", ssf_shift)):
        if t is None:  # (their shapes, dtypes and devices are the op's checks)
            raise ValueError(f"{OP}: {name} is required")
    return _rescale.rescaled_linear(OP, x, weight, bias, ssf_scale, ssf_shift, False)
