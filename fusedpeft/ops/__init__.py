"""Functional ops, one file per method: the float reference, the autograd Function and the backend
dispatch."""
from .ia3 import ia3_linear, ia3_linear_reference
from ._rescale import output_grad_mode
from .lora import lora_linear, lora_linear_reference
from .ssf import ssf_linear, ssf_linear_reference

__all__ = [
    "ia3_linear", "ia3_linear_reference", "lora_linear", "lora_linear_reference", "output_grad_mode",
    "ssf_linear", "ssf_linear_reference",
]
