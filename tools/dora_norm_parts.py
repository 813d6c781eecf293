"""The pieces of DoRA's weight norm (``fusedpeft.ops.dora.dora_weight_norm``) timed alone and
whole, at the Llama-3-8B shapes, r = 16, bf16 (GPU; CUDA events through triton's do_bench, us).

    python -m tools.dora_norm_parts
"""
import torch

from fusedpeft.ops import _common
from fusedpeft.ops.dora import dora_weight_norm


def _us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def main():
    dev, bf16 = "cuda", torch.bfloat16
    for N, K in ((4096, 4096), (1024, 4096), (14336, 4096)):
        W = torch.randn(N, K, device=dev, dtype=bf16)
        A, B, P = torch.randn(16, K, device=dev), torch.randn(N, 16, device=dev), torch.randn(N, 16, device=dev)
        sq = W.float().pow(2).sum(1)
        parts = {
            "W A^T in bf16, then cast": lambda: (W @ A.to(bf16).T).float(),
            "W A^T via product_in": lambda: _common.product_in(torch.float32, W, A.to(bf16).T),
            "row dots (baddbmm)": lambda: torch.baddbmm(sq.reshape(-1, 1, 1), B.unsqueeze(1), P.unsqueeze(2)),
            "row dots (product, sum)": lambda: (B * P).sum(1).add_(sq),
            "dora_weight_norm whole": lambda: dora_weight_norm(W, A, B, 2.0, sq),
        }
        print(f"N={N} K={K}: " + "; ".join(f"{name} {_us(fn):.1f}" for name, fn in parts.items()))


if __name__ == "__main__":
    main()
