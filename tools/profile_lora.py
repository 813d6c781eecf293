"""Host-side profile of one LoRA layer call (where the time goes when the GPU work is short),
triton and torch backends, forward and training step (GPU):

    python -m tools.profile_lora [M K N r]     # default 16 4096 4096 16
"""
import argparse

import torch

import fusedpeft
from fusedpeft.ops import lora_linear

from benchmarks import harness


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[16, 4096, 4096, 16], help="M K N r")
    sizes = parser.parse_args(argv).sizes
    if len(sizes) != 4:
        parser.error(f"expected M K N r, got {sizes}")
    M, K, N, r = sizes
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    A = (torch.randn(r, K, device="cuda") / K**0.5).bfloat16().requires_grad_()
    B = torch.randn(N, r, device="cuda").bfloat16().requires_grad_()
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    for backend in ("triton", "torch"):
        with fusedpeft.use_backend(backend):
            for _ in range(20):
                lora_linear(x, W, None, A, B, 2.0).backward(g)
            for label, fn in (("fwd", lambda: lora_linear(x, W, None, A, B, 2.0)),
                              ("train", lambda: lora_linear(x, W, None, A, B, 2.0).backward(g))):
                harness.host_profile(f"{backend:6s} {label:5s}", fn, calls=200, profiled_calls=200,
                                     top=30 if (backend, label) == ("triton", "train") else 0)


if __name__ == "__main__":
    main()
