"""Triton kernels and their launchers (pure functions of tensors and shapes). Installed as
fusedpeft.triton_kernels; see fusedpeft/_kernels.py.

    fused_linear.py  the GEMM core kernel and the column reductions (jit code)
    dropout.py       the dropout mask (jit code)
    lowrank.py       the masked rank-r update a cuBLAS composition adds (kernel and launcher)
    gemm.py          the GEMM core's launcher and its frozen launch records
    lora.py, rescale.py, lora_cublas.py   the methods' forward and backward over those
    configs.py       tile configs and the tuner
    fast_launch.py   compiled-kernel replay and launch plans (host time)
    buffers.py       persistent device buffers (descriptor scratch, ticket counters)
    layout.py        operand layout and grid arithmetic"""
from . import lora, lora_cublas, lowrank, rescale
