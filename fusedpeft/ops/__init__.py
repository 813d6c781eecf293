"""Functional ops, one file per method: the float reference (the ``torch`` backend, registered
there), the backend dispatch and the op. Each op's autograd Function and torch custom ops come
from one factory (``_autograd.autograd_op``); the other backends register from fusedpeft/backends/."""
from .dora import dora_linear, dora_linear_reference
from .ia3 import ia3_linear, ia3_linear_reference
from ._rescale import output_grad_mode
from .lora import lora_linear, lora_linear_reference
from .multi_lora import multi_ia3_linear, multi_ia3_linear_reference, multi_lora_linear, multi_lora_linear_reference
from .ssf import ssf_linear, ssf_linear_reference

__all__ = [
    "dora_linear", "dora_linear_reference", "ia3_linear", "ia3_linear_reference", "lora_linear", "lora_linear_reference",
    "multi_ia3_linear", "multi_ia3_linear_reference", "multi_lora_linear", "multi_lora_linear_reference", "output_grad_mode",
    "ssf_linear", "ssf_linear_reference",
]
