"""fusedpeft: fused kernels for parameter-efficient fine-tuning.

LoRA, IA3 and SSF (scale-shift fine-tuning) on linear layers as single fused ops (Triton on CUDA,
a pure-PyTorch backend everywhere), nn.Module replacements, an injector for any torch model, and
adapter files in HF peft's format (SSF, which peft lacks, in the same layout)."""
from .settings import settings  # noqa: E402  (first: every layer reads it)
from . import ops, tuning
# Backend modules, after the ops (each op registers its torch reference first) and in this order:
# the registration indices that compiled graphs carry follow it (see fusedpeft/backends).
from .backends import triton as _triton_backends  # noqa: F401,E402
from .backends import cuda as _cuda_backends  # noqa: F401,E402
from .backends import cublas as _cublas_backends  # noqa: F401,E402
from .backends import backend_counts, last_backend, use_backend
from .config import IA3Config, LoraConfig, SSFConfig
from .inject import (
    disable_adapters,
    eject,
    enable_adapters,
    inject,
    mark_only_adapters_trainable,
    merge,
    print_trainable_parameters,
    set_adapter,
    unmerge,
)
from .io import load_adapter, save_adapter
from . import methods  # noqa: E402
from .modules import IA3Linear, LoraLinear, SSFLinear
from .peft_compat import from_peft
from .adapters import (
    add_weighted_adapter,
    delete_adapter,
    get_adapter_state_dict,
    hotswap_adapter,
    set_adapter_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "IA3Config",
    "IA3Linear",
    "LoraConfig",
    "LoraLinear",
    "SSFConfig",
    "SSFLinear",
    "add_weighted_adapter",
    "backend_counts",
    "delete_adapter",
    "disable_adapters",
    "eject",
    "enable_adapters",
    "from_peft",
    "get_adapter_state_dict",
    "hotswap_adapter",
    "inject",
    "last_backend",
    "load_adapter",
    "mark_only_adapters_trainable",
    "merge",
    "methods",
    "ops",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "set_adapter_state_dict",
    "tuning",
    "unmerge",
    "settings",
    "use_backend",
]
