"""Host (Python) cost of fusedpeft's Triton path with the GPU taken out, runnable on a CPU-only
machine: the compiled-kernel cache answers every launch with a no-op, so what is timed is the
launchers, the cache key, the autograd Function and the small torch ops around them.

    python -m benchmarks.host_overhead            # M=16, K=N=256, bf16

Beside fusedpeft's triton path it times, on the same tensors, the plain torch LoRA composition
(F.linear(x, W) + s * F.linear(F.linear(x, A), B): forward under no_grad, and forward + backward)
and, where "cublas" backends are registered for lora_linear, each under use_backend.

The absolute figures are this machine's, not the GPU host's; use it to compare two versions of
the host code (benchmarks/RESULTS.md quotes it), and tools.profile_lora / tools.diag_rescale on
the GPU for the real thing."""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton backend take CPU tensors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import harness  # noqa: E402


@contextlib.contextmanager
def _stubbed_gpu(triton_kernels):
    """The launchers' GPU queries stood in for (an H100's 132 SMs) and every compiled-kernel cache
    look-up answered with a no-op kernel, so launches cost their host work alone; restored after.
    Autotuning is off: the first candidate config stands in for the tuner's pick (one no-op launch
    per key, then the tuned-config look-up)."""
    from fusedpeft.settings import settings

    class _NoOpKernel:
        def __call__(self, grid3, device, args):
            return None

    class _AlwaysHit(dict):
        def get(self, key, default=None):
            return _NoOpKernel()

    layout, buffers, configs, fast_launch = (triton_kernels.layout, triton_kernels.buffers, triton_kernels.configs,
                                             triton_kernels.fast_launch)
    tuned = dict(configs.TUNED)
    stand_ins = [(layout, "interpreting", lambda: False), (layout, "num_sms", lambda index: 132),
                 (buffers, "ensure_allocator", lambda: None), (fast_launch, "COMPILED", _AlwaysHit()),
                 (torch.cuda, "current_device", lambda: 0)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in stand_ins]
    try:
        for obj, name, value in stand_ins:
            setattr(obj, name, value)
        with settings.override(autotune=False):
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        fast_launch.clear_plans()  # the plans hold no-op kernels, the tuned configs were never timed
        configs.TUNED.clear()
        configs.TUNED.update(tuned)


def _us_per_call(fn, n):
    return harness.host_ms(fn, n, warmup=max(n // 10, 20), device="cpu") * 1e3


def main(M=16, K=256, N=256, r=16, dt=torch.bfloat16):
    import fusedpeft
    from fusedpeft._kernels import triton_kernels
    from fusedpeft.ops import dora_linear, ia3_linear, lora_linear, ssf_linear
    from fusedpeft.ops.dora import weight_row_sq_norm

    x = torch.randn(M, K, dtype=dt, requires_grad=True)
    W = torch.randn(N, K, dtype=dt)
    y = torch.empty(M, N, dtype=dt)
    ones = torch.ones(N, dtype=dt)
    A, B = torch.randn(r, K, dtype=dt, requires_grad=True), torch.randn(N, r, dtype=dt, requires_grad=True)
    l_in, l_out, shift = (torch.randn(n, dtype=dt, requires_grad=True) for n in (K, N, N))
    magnitude, sq_norm = torch.rand(N, requires_grad=True) + 1, weight_row_sq_norm(W)
    g = torch.randn(M, N, dtype=dt)
    # One launch of the plain GEMM (x W^T, with a ones output scale) through the launch layer: the
    # launcher's plan look-up and the compiled kernel's call.
    rescaled = triton_kernels.rescale._rescaled
    one_launch = lambda: rescaled(x.detach(), W, y, None, ones, input_scale=False)  # noqa: E731
    # (label, backend forced or None, the call); the fusedpeft lines run the triton path with the
    # GPU stubbed out, so what they time is host work only.
    calls = [
        ("lora", "triton", lambda: lora_linear(x, W, None, A, B, 2.0)),
        ("ia3 output", "triton", lambda: ia3_linear(x, W, None, l_out, False)),
        ("ia3 input", "triton", lambda: ia3_linear(x, W, None, l_in, True)),
        ("ssf", "triton", lambda: ssf_linear(x, W, None, l_out, shift)),
        ("dora", "triton", lambda: dora_linear(x, W, None, A, B, 2.0, magnitude, weight_sq_norm=sq_norm)),
    ]
    # The cuBLAS compositions ("cublas", "cublas_after", "cublas_autograd" where they exist), where
    # registered; with dropout (masks from the stubbed Triton kernels) each but the autograd one.
    cublas = [n for n in fusedpeft.backends.registered("lora_linear") if n.startswith("cublas")]
    for i, name in enumerate(cublas):
        calls.insert(1 + i, (f"lora [{name}]", name, lambda: lora_linear(x, W, None, A, B, 2.0)))
    for name in ["triton"] + [n for n in cublas if n != "cublas_autograd"]:
        calls.insert(1 + len(cublas), (f"lora p=0.1 [{name}]", name,
                                       lambda: lora_linear(x, W, None, A, B, 2.0, dropout_p=0.1, training=True)))
    # The plain torch LoRA a user would write, on the same tensors.
    calls.append(("torch composition", None, lambda: F.linear(x, W) + 2.0 * F.linear(F.linear(x, A), B)))
    # DoRA as a user writes it from the paper (benchmarks.layers' composition at p = 0).
    calls.append(("torch composition, dora", None, lambda: (
        magnitude / torch.linalg.vector_norm(W + 2.0 * (B @ A), dim=1).detach()).to(dt)
        * (F.linear(x, W) + 2.0 * F.linear(F.linear(x, A), B))))
    from fusedpeft.ops import _autograd

    composed_devices = set(_autograd.COMPOSED_DEVICES)
    _autograd.COMPOSED_DEVICES.add("cpu")  # the composable ops' compositions run here as on CUDA
    with _stubbed_gpu(triton_kernels):
        print(f"one launch (rescale_kernel) {_us_per_call(one_launch, 3000):7.1f} us")
        for name, backend, call in calls:
            def fwd():
                with torch.no_grad():
                    call()

            def train():
                call().backward(g)

            with _backend(backend):  # entered once: a use_backend block costs ~15 us a call here
                print(f"{name:24s} forward {_us_per_call(fwd, 1000):7.1f} us   "
                      f"forward + backward {_us_per_call(train, 300):7.1f} us")
    _autograd.COMPOSED_DEVICES.clear()
    _autograd.COMPOSED_DEVICES.update(composed_devices)
    print("(lora [cublas*] and torch composition run their small products on this CPU for real: their figures are an\n"
          " upper bound on host cost, the stubbed triton lines host work alone)")


def _backend(name):
    import fusedpeft

    return fusedpeft.use_backend(name) if name else contextlib.nullcontext()


if __name__ == "__main__":
    main()
