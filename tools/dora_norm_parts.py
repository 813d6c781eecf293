"""The pieces of DoRA's weight norm (``fusedpeft.ops.dora.dora_weight_norm``) timed alone and
whole, the composition (the torch backend's) and the one-launch Triton kernel, at the Llama-3-8B
shapes, r = 16 and 64, bf16 W with float32 adapters (GPU; CUDA events through triton's do_bench, us).

    python -m tools.dora_norm_parts
"""
import torch

import fusedpeft
from fusedpeft.ops import _common
from fusedpeft.ops.dora import dora_weight_norm


def _us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def _composed(W, A, B, sq):
    with fusedpeft.use_backend("torch"):
        return dora_weight_norm(W, A, B, 2.0, sq)


def main():
    dev, bf16 = "cuda", torch.bfloat16
    for (N, K), r in ((shape, r) for r in (16, 64) for shape in ((4096, 4096), (1024, 4096), (14336, 4096))):
        W = torch.randn(N, K, device=dev, dtype=bf16)
        A, B, P = torch.randn(r, K, device=dev), torch.randn(N, r, device=dev), torch.randn(N, r, device=dev)
        sq = W.float().pow(2).sum(1)
        parts = {
            "W A^T in bf16, then cast": lambda: (W @ A.to(bf16).T).float(),
            "W A^T via product_in": lambda: _common.product_in(torch.float32, W, A.to(bf16).T),
            "row dots (baddbmm)": lambda: torch.baddbmm(sq.reshape(-1, 1, 1), B.unsqueeze(1), P.unsqueeze(2)),
            "row dots (product, sum)": lambda: (B * P).sum(1).add_(sq),
            "dora_weight_norm whole, composition": lambda: _composed(W, A, B, sq),
            "dora_weight_norm whole, kernel": lambda: dora_weight_norm(W, A, B, 2.0, sq),
        }
        print(f"N={N} K={K} r={r}: " + "; ".join(f"{name} {_us(fn):.1f}" for name, fn in parts.items()))


if __name__ == "__main__":
    main()
