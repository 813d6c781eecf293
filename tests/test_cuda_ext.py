"""The CUDA extension of csrc/ (BGMV kernels, the ``cuda`` backend of multi_lora_linear).

On CPU (CI): the kernels compile for sm_90 with the machine's nvcc (ptxas: no spills; the PTX holds
16-byte read-only loads and warp shuffles); the binding's syntax checks with g++ against torch's
headers; the kernels' own source runs on the CPU through csrc/emulate (launchers, heuristics,
every load path) against a float64 reference under AddressSanitizer; and the Python side (loader,
registry, setup.py) behaves without CUDA. The three compilations start together, in the
background, when the first of their tests asks.

On a GPU (marked cuda): the extension builds and loads, and the backend matches the float64
reference over ragged shapes, mixed ranks, -1 rows, both index dtypes, float16 / bfloat16 (and
float32), captures in a CUDA graph and joins the per-shape measurement. Run there with
    python -m pytest -q -m cuda tests/test_cuda_ext.py        (add -k timing -s for the timings)
"""
from __future__ import annotations

import functools
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

import fusedpeft
from fusedpeft import _cuda_ext, backends
from fusedpeft.ops import multi_lora_linear, multi_lora_linear_reference

from helpers import GPU_TOL, rel_err

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
OP = "multi_lora_linear"


def _cuda_home():
    """The CUDA toolkit's folder (the one with include/cuda_runtime_api.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home)
    return None


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = _cuda_home()
    return str(home / "bin" / "nvcc") if home and (home / "bin" / "nvcc").exists() else None


def _cuda_include():
    home = _cuda_home()
    return str(home / "include") if home else None


class _Job:
    """A compiler run started in the background; result() waits for it."""

    def __init__(self, argv, cwd):
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._out = None

    def result(self, timeout=600):
        if self._out is None:
            self._out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, self._out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts the sm_90 nvcc compile, the binding's syntax check and the emulator's build at once."""
    out = tmp_path_factory.mktemp("cuda_ext")
    jobs = {}
    nvcc, cuda_include, gxx = _nvcc(), _cuda_include(), shutil.which("g++")
    if nvcc:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the defines the real build adds

        jobs["nvcc"] = _Job([nvcc, *COMMON_NVCC_FLAGS, "-std=c++20", *_cuda_ext.nvcc_flags(["9.0"]), "-Xptxas", "-v",
                             "-keep", "-keep-dir", str(out), "-I", str(CSRC), "-c", str(CSRC / "bgmv.cu"),
                             "-o", str(out / "bgmv.o")], cwd=out)
    if gxx and cuda_include:
        from torch.utils.cpp_extension import include_paths

        torch_includes = [arg for p in include_paths() for arg in ("-isystem", p)]
        if not any((Path(p) / "pybind11" / "pybind11.h").exists() for p in include_paths()):
            try:  # torch's wheels ship pybind11's headers; else the pybind11 package (fusedpeft[cuda])
                import pybind11

                torch_includes += ["-isystem", pybind11.get_include()]
            except ImportError:
                pass
        jobs["binding"] = _Job([
            gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            # torch's CPU wheels ship c10/cuda's headers without their generated cuda_cmake_macros.h
            # (it only sets the shared-library export macros): skip it, as the HIP build does.
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-DTORCH_EXTENSION_NAME=_C_bgmv", "-DTORCH_API_INCLUDE_EXTENSION_H", "-I", str(CSRC), *torch_includes,
            "-isystem", cuda_include, "-isystem", sysconfig.get_paths()["include"], str(CSRC / "bgmv_binding.cpp"),
        ], cwd=out)
        jobs["emulator"] = _Job([
            gxx, "-std=c++20", "-O1", "-g0", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-pthread", "-DFUSEDPEFT_BGMV_EMULATE", "-I", str(CSRC), "-isystem", cuda_include,
            "-x", "c++", str(CSRC / "bgmv.cu"), "-x", "c++", str(CSRC / "emulate" / "bgmv_emulate_test.cpp"),
            "-o", str(out / "bgmv_emulate"),
        ], cwd=out)
    yield types.SimpleNamespace(dir=out, jobs=jobs)
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()


def _job(builds, name, why_missing):
    if name not in builds.jobs:
        pytest.skip(why_missing)
    return builds.jobs[name]


# ----------------------------------------------------------------------------- compile checks (CPU)
def test_bgmv_cu_compiles_for_sm90(builds):
    """csrc/bgmv.cu alone (no torch headers) with nvcc for sm_90, with the flags the extension's
    build uses: every kernel instantiation compiles without spills, and the 16-byte read-only loads
    and warp shuffles the design relies on are in the PTX (and in the SASS where cuobjdump is)."""
    job = _job(builds, "nvcc", "nvcc not found (looked on PATH and in $CUDA_HOME/bin)")
    rc, out = job.result()
    assert rc == 0, f"nvcc failed:\n{out}"
    assert not re.search(r"\bwarning\b", out, re.IGNORECASE), f"nvcc warned:\n{out}"
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", out)
    # 3 dtypes x (shrink: 16-byte or scalar x RC in {1, 4}; expand: 16-byte or scalar)
    assert len(entries) == 18, out
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    assert len(spills) == 18 and all(s == ("0", "0") for s in spills), f"register spills:\n{out}"
    ptx = (builds.dir / "bgmv.ptx").read_text()
    assert re.search(r"ld\.global\.nc\.v4\.(u32|b32)", ptx), "no 16-byte read-only (ld.global.nc.v4) loads in the PTX"
    assert "shfl.sync.bfly" in ptx, "no butterfly warp shuffles in the PTX"
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None and _cuda_home() and (_cuda_home() / "bin" / "cuobjdump").exists():
        cuobjdump = str(_cuda_home() / "bin" / "cuobjdump")
    if cuobjdump:  # optional: not every toolkit install has it
        sass = subprocess.run([cuobjdump, "-sass", str(builds.dir / "bgmv.o")], capture_output=True, text=True,
                              check=False).stdout
        assert "LDG.E.128" in sass and "SHFL.BFLY" in sass


def test_binding_cpp_syntax_against_torch_headers(builds):
    """csrc/bgmv_binding.cpp against the installed torch's headers (pybind11 comes with them), with
    -Wall -Wextra -Werror: what the extension's build compiles with g++, short of linking
    (libc10_cuda is not in a CPU wheel)."""
    job = _job(builds, "binding", "g++ or the CUDA headers not found")
    rc, out = job.result()
    assert rc == 0, f"g++ -fsyntax-only failed:\n{out}"


def test_kernels_run_in_the_cpu_emulation(builds):
    """The launchers and kernels of csrc/bgmv.cu, compiled with g++ over csrc/emulate's stand-ins for
    the CUDA built-ins (threads, barriers, shuffles), against a float64 reference: every load path
    and heuristic, with NaN in what must not be read, under AddressSanitizer and UBSan."""
    job = _job(builds, "emulator", "g++ or the CUDA headers not found")
    rc, out = job.result()
    assert rc == 0, f"building the emulation failed:\n{out}"
    run = subprocess.run([str(builds.dir / "bgmv_emulate")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}, check=False)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert re.search(r"all \d+ cases passed", run.stdout), run.stdout


# ----------------------------------------------------------------------------- Python side (CPU)
@pytest.fixture
def fresh_loader():
    _cuda_ext.reset()
    yield
    _cuda_ext.reset()


def test_import_neither_loads_nor_builds_the_extension():
    code = ("import sys, fusedpeft; "
            "bad = [m for m in sys.modules if m in ('fusedpeft._C_bgmv', 'fusedpeft_bgmv', 'torch.utils.cpp_extension')]; "
            "assert not bad, bad; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         check=False)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_cuda_backend_is_registered_for_multi_lora_linear():
    assert "cuda" in backends.registered(OP)
    ours = backends._REGISTRY[OP]["cuda"]
    assert ours.tunable and ours.priority == 8
    assert backends._REGISTRY[OP]["torch"].priority < ours.priority
    if "triton" in backends._REGISTRY[OP]:
        assert ours.priority < backends._REGISTRY[OP]["triton"].priority
    for other in ("lora_linear", "multi_ia3_linear"):
        assert "cuda" not in backends.registered(other)


def test_forcing_cuda_on_cpu_raises_naming_why():
    S, R, K, N = 2, 4, 8, 5
    args = (torch.randn(3, K), torch.randn(N, K), None, torch.randn(S, R, K), torch.randn(S, N, R), torch.ones(S),
            torch.tensor([4, 2], dtype=torch.int32), torch.tensor([0, -1, 1]))
    with torch.no_grad(), fusedpeft.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' was requested but cannot run these inputs: .*CUDA"):
            multi_lora_linear(*args)
    # Automatic choice on CPU: the cuda backend neither runs nor loads.
    with torch.no_grad():
        multi_lora_linear(*args)
    assert fusedpeft.last_backend(OP) != "cuda"


def test_cuda_backend_supports_reasons():
    from fusedpeft.backends.cuda import cuda_usable

    assert "needs CUDA tensors" in cuda_usable(torch.zeros(1), torch.zeros(1))
    assert "float64" in cuda_usable(backends._Kind("cuda", torch.float64))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert cuda_usable(backends._Kind("cuda", dtype)) is None


def test_loader_reasons(fresh_loader, monkeypatch, use_settings):
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            _cuda_ext.load()
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # kept, not retried
            _cuda_ext.load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, _cuda_ext.PREBUILT, None)  # no prebuilt module, even on a GPU machine
    _cuda_ext.reset()
    with fusedpeft.settings.override(skip_cuda_build=True):
        with pytest.raises(RuntimeError, match=_cuda_ext.SKIP_ENV):
            _cuda_ext.load()
    # The setting's refusal is not kept: without it, load() builds (here: fails at the next reason).
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(RuntimeError, match="nvcc was not found"):
        _cuda_ext.load()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    _cuda_ext.reset()
    with pytest.raises(RuntimeError, match="nvcc was not found"):
        _cuda_ext.load()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    _cuda_ext.reset()
    with pytest.raises(RuntimeError, match="needs ninja"):
        _cuda_ext.load()


def test_loader_prefers_a_prebuilt_module_and_refuses_a_stale_one(fresh_loader, monkeypatch, use_settings):
    good = types.ModuleType(_cuda_ext.PREBUILT)
    good.api_version = _cuda_ext.API_VERSION
    monkeypatch.setitem(sys.modules, _cuda_ext.PREBUILT, good)
    assert _cuda_ext.load() is good
    stale = types.ModuleType(_cuda_ext.PREBUILT)
    stale.api_version = 0
    monkeypatch.setitem(sys.modules, _cuda_ext.PREBUILT, stale)
    use_settings(skip_cuda_build=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _cuda_ext.reset()
    with pytest.raises(RuntimeError, match=r"stale build.*" + _cuda_ext.SKIP_ENV):
        _cuda_ext.load()


def test_arch_flags(monkeypatch):
    assert _cuda_ext.gencode_flags(["9.0"]) == ["-gencode=arch=compute_90,code=sm_90"]
    assert _cuda_ext.gencode_flags(["9.0a", "8.0+PTX"]) == [
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80"]
    assert _cuda_ext.parse_arch_list(" 8.0;9.0 10.0 ") == ["8.0", "9.0", "10.0"]
    with pytest.raises(ValueError, match="unrecognised"):
        _cuda_ext.gencode_flags(["hopper"])
    assert _cuda_ext.target_archs({"TORCH_CUDA_ARCH_LIST": "8.6;9.0"}) == ["8.6", "9.0"]
    if not torch.cuda.is_available():
        assert _cuda_ext.target_archs({}) == list(_cuda_ext.DEFAULT_ARCHS)
    assert "-O3" in _cuda_ext.nvcc_flags(["9.0"])


def _setup_kwargs(monkeypatch):
    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return seen


def test_setup_py_is_pure_python_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch
    assert _setup_kwargs(monkeypatch) == {}
    monkeypatch.setenv(_cuda_ext.SKIP_ENV, "1")
    assert _setup_kwargs(monkeypatch) == {}


def test_setup_py_builds_the_extension_where_cuda_is(monkeypatch):
    """With torch built for CUDA and nvcc found (faked here), setup.py asks for the extension, with
    the loader's sources and flags; FUSEDPEFT_SKIP_CUDA_BUILD=1 still keeps it pure Python."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv(_cuda_ext.SKIP_ENV, raising=False)
    monkeypatch.chdir(ROOT)
    kwargs = _setup_kwargs(monkeypatch)
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "fusedpeft._C_bgmv"
    assert ext.sources == ["csrc/bgmv.cu", "csrc/bgmv_binding.cpp"]
    assert "-gencode=arch=compute_90,code=sm_90" in ext.extra_compile_args["nvcc"]
    assert kwargs["cmdclass"]["build_ext"] is cpp_extension.BuildExtension
    monkeypatch.setenv(_cuda_ext.SKIP_ENV, "1")
    assert _setup_kwargs(monkeypatch) == {}


# ----------------------------------------------------------------------------- GPU
def _bank(S, R, K, N, dtype, ranks, garbage=float("nan")):
    """A bank whose rows of A and columns of B past each slot's rank hold `garbage` (NaN: the
    kernels must not read them, and the reference does not)."""
    A = torch.randn(S, R, K, device="cuda") / K**0.5
    B = torch.randn(S, N, R, device="cuda") / max(R, 1) ** 0.5
    for s, r in enumerate(ranks):
        A[s, r:] = garbage
        B[s, :, r:] = garbage
    return A.to(dtype), B.to(dtype)


def _case(M, K, N, R, ranks, dtype, index_dtype, bias=True):
    S = len(ranks)
    A, B = _bank(S, R, K, N, dtype, ranks)
    x = torch.randn(M, K, device="cuda").to(dtype)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype) if bias else None
    scalings = torch.rand(S, device="cuda") * 2 - 0.5
    rank_t = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    idx = torch.randint(-1, S, (M,), device="cuda").to(index_dtype)
    return x, W, b, A, B, scalings, rank_t, idx


def _reference(x, W, b, A, B, scalings, ranks, idx):
    def d(t):
        return None if t is None else t.double().cpu()

    return multi_lora_linear_reference(d(x), d(W), d(b), d(A), d(B), d(scalings), ranks.cpu(), idx.cpu())


@pytest.mark.cuda
def test_extension_builds_and_loads(fresh_loader):
    ext = _cuda_ext.load()
    assert ext.api_version == _cuda_ext.API_VERSION
    assert {"lora_update_", "shrink", "expand_", "lora_linear"} <= set(dir(ext))


MIXED = [1, 7, 8, 16, 33, 64, 0, 5]  # R = 64, a rank-0 slot


CUDA_BACKENDS = ["cuda", "cuda_overlap"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("M", [1, 7, 64, 256])
@pytest.mark.parametrize("K,N", [(4096, 4096), (1029, 517), (264, 77)])
def test_cuda_backend_matches_float64(backend, dtype, index_dtype, M, K, N):
    args = _case(M, K, N, 64, MIXED, dtype, index_dtype)
    with torch.no_grad(), fusedpeft.use_backend(backend):
        y = multi_lora_linear(*args)
    assert fusedpeft.last_backend(OP) == backend
    ref = _reference(*args)
    err = rel_err(y, ref)
    assert err <= GPU_TOL[dtype], f"M={M} K={K} N={N}: {err:.3e}"
    # Rows without an adapter are cuBLAS's output bit for bit; the rank-r term alone is accurate too,
    # up to the rounding of y itself: y - base cannot be nearer the exact term than the exact y
    # rounded to the dtype is (at M = 1 and a term small beside y that rounding alone is ~0.05).
    x, W, b, *_ = args
    base = torch.addmm(b, x, W.T)
    none = args[-1] < 0
    assert torch.equal(y[none], base[none])
    ref = ref.cuda()
    term = y.double() - base.double()
    ref_term = ref - base.double()
    rounded_term = ref.to(dtype).double() - base.double()
    has = ~none
    if has.any():
        rounding = rel_err(rounded_term[has], ref_term[has])
        assert rel_err(term[has], ref_term[has]) <= 4 * GPU_TOL[dtype] + 2 * rounding


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("R,ranks", [(20, [20, 19, 12, 1]), (128, [128, 100, 65, 7]), (8, [8, 3])])
def test_cuda_backend_other_bank_shapes(backend, dtype, R, ranks):
    """R off the 16-byte pack (scalar expand), ranks past 8 packs (the remainder loop), float32."""
    args = _case(37, 1000, 300, R, ranks, dtype, torch.int64, bias=False)
    with torch.no_grad(), fusedpeft.use_backend(backend):
        y = multi_lora_linear(*args)
    assert rel_err(y, _reference(*args)) <= GPU_TOL[dtype]


@pytest.mark.cuda
def test_launch_shape_overrides_agree():
    ext = _cuda_ext.load()
    x, W, b, A, B, scalings, ranks, idx = _case(48, 2048, 1000, 64, MIXED, torch.bfloat16, torch.int32)
    ref = _reference(x, W, b, A, B, scalings, ranks, idx)
    base = torch.addmm(b, x, W.T)
    for rc in (0, 1, 4):
        for rows in (0, 32, 64, 512, 4096):
            y = ext.lora_update_(base.clone(), x, A, B, scalings, ranks, idx, ranks_per_cta=rc, rows_per_cta=rows)
            assert rel_err(y, ref) <= GPU_TOL[torch.bfloat16], (rc, rows)
    with pytest.raises(RuntimeError, match="invalid argument"):
        ext.lora_update_(base.clone(), x, A, B, scalings, ranks, idx, ranks_per_cta=3)
    # shrink and expand_ alone compose to the same.
    u = ext.shrink(x, A, ranks, idx)
    y = ext.expand_(base.clone(), u, B, scalings, ranks, idx)
    assert rel_err(y, ref) <= GPU_TOL[torch.bfloat16]


@pytest.mark.cuda
def test_binding_rejects_bad_arguments():
    ext = _cuda_ext.load()
    x, W, b, A, B, scalings, ranks, idx = _case(4, 64, 32, 8, [8, 2], torch.bfloat16, torch.int32)
    y = torch.addmm(b, x, W.T)
    with pytest.raises(RuntimeError, match="scalings must be float32"):
        ext.lora_update_(y, x, A, B, scalings.double(), ranks, idx)
    with pytest.raises(RuntimeError, match="ranks must be int32"):
        ext.lora_update_(y, x, A, B, scalings, ranks.long(), idx)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.lora_update_(y, x.cpu(), A, B, scalings, ranks, idx)
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        ext.lora_update_(y, x, A, B[:, :16], scalings, ranks, idx)
    with pytest.raises(RuntimeError, match="lora_A must be .*BFloat16"):
        ext.lora_update_(y, x, A.half(), B, scalings, ranks, idx)
    with pytest.raises(RuntimeError, match="adapter_index must have shape"):
        ext.lora_update_(y, x, A, B, scalings, ranks, idx[:2])


@pytest.mark.cuda
def test_lora_linear_empty_and_rank_zero():
    """No rows, no outputs, or every slot at rank 0: the GEMM alone (and no launch that could fail)."""
    ext = _cuda_ext.load()
    for overlap in (False, True):
        for M, N, ranks in ((0, 64, [8, 2]), (5, 0, [8, 2]), (5, 64, [0, 0])):
            x, W, b, A, B, scalings, rank_t, idx = _case(M, 96, N, 8, ranks, torch.bfloat16, torch.int32)
            y = ext.lora_linear(x, W, b, A, B, scalings, rank_t, idx, overlap)
            assert y.shape == (M, N)
            assert torch.equal(y, torch.addmm(b, x, W.T))
        with pytest.raises(RuntimeError, match="weight must be"):
            ext.lora_linear(x, W[:, :5], b, A, B, scalings, rank_t, idx, overlap)


@pytest.mark.cuda
def test_overlapped_shrink_waits_for_the_input():
    """x written by slow work just before the call: the side stream's shrink must read the new x
    (the fork waits for the current stream), and the expand the finished u (the join)."""
    ext = _cuda_ext.load()
    x, W, b, A, B, scalings, ranks, idx = _case(64, 4096, 4096, 16, [16, 8, 4, 16], torch.bfloat16, torch.int32)
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    for trial in range(5):
        x0 = torch.randn_like(x)
        torch.cuda.synchronize()
        h = x0
        for _ in range(20):  # some milliseconds of GEMMs queued ahead of the call
            h = (h @ big).clamp_(-4, 4)
        x.copy_(h)
        y = ext.lora_linear(x, W, b, A, B, scalings, ranks, idx, True)
        torch.cuda.synchronize()
        assert rel_err(y, _reference(x, W, b, A, B, scalings, ranks, idx)) <= GPU_TOL[torch.bfloat16], trial


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_runs_on_the_current_stream_and_captures_in_a_graph(backend):
    """On a non-default current stream and inside a capture (cuda_overlap forks its shrink to a
    side stream and joins it: the graph keeps both branches), replayed with new inputs."""
    x, W, b, A, B, scalings, ranks, idx = _case(64, 1024, 1024, 16, [16, 8, 4, 16], torch.bfloat16, torch.int32)
    side = torch.cuda.Stream()
    with torch.no_grad(), fusedpeft.use_backend(backend):
        multi_lora_linear(x, W, b, A, B, scalings, ranks, idx)  # load (or build) before capturing
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = multi_lora_linear(x, W, b, A, B, scalings, ranks, idx)
        side.synchronize()
        assert rel_err(y, _reference(x, W, b, A, B, scalings, ranks, idx)) <= GPU_TOL[torch.bfloat16]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = multi_lora_linear(x, W, b, A, B, scalings, ranks, idx)
        x.copy_(torch.randn_like(x))
        idx.copy_(torch.randint(-1, 4, idx.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
    assert rel_err(y, _reference(x, W, b, A, B, scalings, ranks, idx)) <= GPU_TOL[torch.bfloat16]


@pytest.mark.cuda
def test_automatic_choice_measures_the_cuda_backend(use_settings):
    """Without a forced backend, the shape key's first call times every tunable candidate, the
    cuda backend among them, and the fastest runs."""
    from fusedpeft import tuning

    use_settings(autotune=True, cache_dir="")
    args = _case(3, 1000 + 8 * (os.getpid() % 50), 808, 16, [16, 4, 8], torch.bfloat16, torch.int32)
    before = len(tuning.LOG)
    with torch.no_grad():
        y = multi_lora_linear(*args)
    entries = [e for e in tuning.LOG[before:] if e["op"] == OP]
    assert entries, "no measurement was made"
    assert "cuda" in entries[-1]["ms"], entries[-1]
    assert fusedpeft.last_backend(OP) == entries[-1]["winner"]
    assert rel_err(y, _reference(*args)) <= GPU_TOL[torch.bfloat16]


@pytest.mark.cuda
def test_timing(capsys):
    """Not a check: microseconds per call of each multi_lora_linear backend at decode shapes
    (python -m pytest -m cuda tests/test_cuda_ext.py -k timing -s)."""
    from fusedpeft import tuning

    rows = []
    for M, K, N, S, R in [(1, 4096, 4096, 1, 16), (8, 4096, 4096, 8, 16), (32, 4096, 4096, 32, 64),
                          (64, 4096, 14336, 8, 16), (64, 14336, 4096, 64, 64), (256, 4096, 4096, 16, 32)]:
        ranks = [R if s % 2 == 0 else max(1, R // 4) for s in range(S)]
        args = _case(M, K, N, R, ranks, torch.bfloat16, torch.int32, bias=False)
        line = {}
        for name in ["base"] + backends.registered(OP):
            try:
                if name == "base":
                    fn = functools.partial(torch.mm, args[0], args[1].T)
                else:
                    fn = functools.partial(backends._REGISTRY[OP][name].impl().lora, *args)
                with torch.no_grad():
                    line[name] = f"{1000 * tuning.time_ms(fn):.1f}"
            except Exception as exc:  # a backend that cannot run here
                line[name] = type(exc).__name__
        rows.append((f"M={M} K={K} N={N} S={S} R={R}", line))
    with capsys.disabled():
        print("\nmulti_lora_linear, us per call (bf16; 'base' is the GEMM alone):")
        for key, line in rows:
            print(f"  {key:34s} " + "  ".join(f"{k}={v}" for k, v in line.items()))
