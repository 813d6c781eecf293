"""Triton kernels and their launchers (pure functions of tensors and shapes). Installed as
fusedpeft.triton_kernels; see fusedpeft/_kernels.py."""
from . import lora, lora_cublas, lowrank, rescale
