"""Triton kernels and their launchers (pure functions of tensors and shapes). Installed as
fusedpeft.triton_kernels; see fusedpeft/_kernels.py.

    core.py          the @triton.jit pieces every GEMM entry kernel is built from (main loops,
                     tile order, rank-r term, epilogue parts)
    dropout.py       the dropout mask (jit code)
    lora.py          LoRA's entry kernels (forward, grad_x) and launchers
    lowrank.py       the rank-r pieces apart from the GEMM: the skinny product, the weight
                     gradients, the rank-r update a cuBLAS composition adds
    rescale.py       IA3 / SSF's entry kernels (input scaling, output scaling, the reducing
                     backward) and launchers
    lora_cublas.py   LoRA as cuBLAS GEMMs around the rank-r kernels
    dora.py          DoRA over the LoRA kernels (the forward's epilogue scale, the backward)
    multi_lora.py    per-row adapters from a bank (serving): the fused SGMV GEMM, BGMV, IA3
    gemm.py          the launcher every persistent entry kernel shares (config, grid, plan)
    configs.py       tile configs and the tuner
    fast_launch.py   compiled-kernel replay and launch plans (host time)
    buffers.py       persistent device buffers (descriptor scratch, ticket counters)
    layout.py        operand layout and grid arithmetic"""
from . import dora, lora, lora_cublas, lowrank, multi_lora, rescale
