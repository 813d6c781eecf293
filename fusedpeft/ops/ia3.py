"""IA3 linear: learned per-channel rescaling of a frozen linear layer, exactly as peft scales.

- output scaling (ordinary targets):      y = (x W^T + b) * l,   l: (N,)
- input scaling (feedforward targets):    y = (x * l) W^T + b,   l: (K,)

The autograd, the backends and the backward's math are shared with SSF (``_rescale.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common, _rescale

OP = "ia3_linear"
_rescale.register_reference(OP)


def ia3_linear_reference(x, weight, bias, ia3_scale, feedforward: bool):
    """The formula, written plainly; tests run it in float64."""
    if feedforward:
        y = (x * ia3_scale) @ weight.T
        return y if bias is None else y + bias
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y * ia3_scale


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_scale: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """IA3 over any leading shape of x. ``ia3_scale`` has in_features entries when ``feedforward``
    (input scaling) and out_features otherwise (output scaling, bias included); peft's (N, 1) and
    (1, K) parameter shapes are accepted as they are."""
    if weight.dim() != 2:
        _common.check_linear_inputs(OP, x, weight, bias)  # names the problem
    size = weight.shape[1] if feedforward else weight.shape[0]
    shape = ia3_scale.shape
    # size entries as (size,), (1, size) or (size, 1); its dtype and device are the op's checks.
    if not (ia3_scale.numel() == size and len(shape) <= 2 and max(shape, default=1) == size):
        kind = "in_features (feedforward: input scaling)" if feedforward else "out_features (output scaling)"
        raise ValueError(f"{OP}: ia3_scale must have {size} entries, one per {kind}; got shape {tuple(shape)}")
    scale = ia3_scale if len(shape) == 1 else ia3_scale.reshape(size)
    return _rescale.rescaled_linear(OP, x, weight, bias, scale, None, bool(feedforward))
