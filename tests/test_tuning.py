"""The measured choice between tunable backends (fusedpeft.tuning, backends.select), its on-disk
store, and the rank-r update kernel of the cublas path (Triton interpreter on CPU)."""
import json

import pytest
import torch

import fusedpeft
from fusedpeft import backends, tuning

from helpers import assert_close, leaf


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch, use_settings):
    use_settings(cache_dir=str(tmp_path))
    use_settings(autotune=True)
    tuning.clear()
    yield tmp_path
    tuning.clear()


def test_choose_measures_once_keeps_the_fastest_and_persists(tuning_dir):
    calls = []

    def bench(name):
        calls.append(name)
        return {"slow": 2.0, "fast": 1.0}[name]

    assert tuning.choose("op_a", (128, 64), ["slow", "fast"], bench) == "fast"
    assert tuning.choose("op_a", (128, 64), ["slow", "fast"], bench) == "fast"
    # one key measured once: its PASSES turns, every other one in reverse order
    assert calls == (["slow", "fast", "fast", "slow", "slow", "fast"] * tuning.PASSES)[:2 * tuning.PASSES]
    stored = json.load(open(tuning.cache_file()))["entries"]
    assert any(k.startswith("path|") and "op_a" in k and v["winner"] == "fast" for k, v in stored.items())
    # A new process (memory cleared) reads the winner from disk without measuring.
    tuning.clear()
    assert tuning.choose("op_a", (128, 64), ["slow", "fast"], lambda n: pytest.fail("measured again")) == "fast"
    assert {"op": "op_a", "key": repr((128, 64)), "winner": "fast"} in tuning.entries()


def test_a_stored_choice_is_measured_again_against_a_new_candidate(tuning_dir):
    """The disk's winner stands against the candidates it was measured against; a candidate
    registered since (a new backend) makes the key measured again, and the new winner stored."""
    assert tuning.choose("op_n", (64,), ["a", "b"], {"a": 2.0, "b": 1.0}.get) == "b"
    tuning.clear()  # a new process
    assert tuning.choose("op_n", (64,), ["b", "a"], lambda n: pytest.fail("measured again")) == "b"
    tuning.clear()
    measured = []

    def bench(name):
        measured.append(name)
        return {"a": 2.0, "b": 1.0, "c": 0.5}[name]

    assert tuning.choose("op_n", (64,), ["a", "b", "c"], bench) == "c"
    assert set(measured) == {"a", "b", "c"}
    tuning.clear()
    assert tuning.choose("op_n", (64,), ["a", "b", "c"], lambda n: pytest.fail("measured again")) == "c"


def test_choose_skips_a_failing_candidate_and_reports_when_none_runs(tuning_dir):
    def bench(name):
        if name == "broken":
            raise RuntimeError("no config fits")
        return 1.0

    assert tuning.choose("op_b", (1,), ["broken", "works"], bench) == "works"
    with pytest.raises(RuntimeError, match="no candidate could run"):
        tuning.choose("op_b", (2,), ["broken"], bench)


def test_a_candidate_that_faults_on_the_gpu_is_named_not_skipped(tuning_dir):
    """A CUDA error (sticky: the context is gone) is raised naming the candidate, where a compile or
    resource failure only loses the measurement."""
    def bench(name):
        if name == "faults":
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
        return 1.0

    with pytest.raises(RuntimeError, match="candidate 'faults' faulted on the GPU"):
        tuning.choose("op_f", (1,), ["works", "faults"], bench)
    # a launch refused for its resources is no fault: that candidate only loses
    assert not tuning.device_fault(RuntimeError("Triton Error [CUDA]: too many resources requested for launch"))
    assert tuning.device_fault(RuntimeError("CUDA error: misaligned address"))
    # torch's hint after every CUDA error names device-side assertions; a failed capture is no fault
    hint = ("\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
            "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with "
            "`TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
    assert not tuning.device_fault(RuntimeError("CUDA error: operation failed due to a previous error during capture"
                                                + hint))
    assert not tuning.device_fault(RuntimeError("CUDA error: operation not permitted when stream is capturing" + hint))
    assert tuning.device_fault(RuntimeError("CUDA error: device-side assert triggered" + hint))
    assert tuning.device_fault(RuntimeError("CUDA error: an illegal memory access was encountered" + hint))


def test_choose_measures_in_mirrored_turns_past_a_burst_of_host_load(tuning_dir):
    """Interference only ever slows a measurement down. A burst that covers the second and third
    measurements made one pass over the candidates pick the wrong one (a: 1.0, b: 1.35, c: 1.8
    where b costs least); in mirrored turns each candidate's least time ranks them by what they
    cost. Each turn's time_ms takes ROUNDS_PER_PASS rounds, and none after."""
    clock = []
    true_ms = {"a": 1.00, "b": 0.90, "c": 1.20}

    def bench(name):
        clock.append(name)
        return true_ms[name] * (1.5 if 2 <= len(clock) <= 4 else 1.0)

    assert tuning.choose("op_burst", (5,), ["a", "b", "c"], bench) == "b"
    assert len(clock) == 3 * tuning.PASSES and clock[:6] == ["a", "b", "c", "c", "b", "a"]
    entry = tuning.LOG[-1]
    assert entry["ms"] == {"a": 1.0, "b": 0.9, "c": 1.2} and len(entry["passes"]["a"]) == tuning.PASSES
    seen = []
    assert tuning.choose("op_rounds", (6,), ["x"], lambda n: seen.append(tuning._rounds) or 1.0) == "x"
    assert seen == [tuning.ROUNDS_PER_PASS] * tuning.PASSES and tuning._rounds is None


def test_choose_drops_a_candidate_that_fails_in_a_later_turn(tuning_dir):
    """A candidate that ran in the first turn and raised in the second is out, whatever its time."""
    runs = {"flaky": 0}

    def bench(name):
        if name == "flaky":
            runs["flaky"] += 1
            if runs["flaky"] > 1:  # a failure that leaves the context usable (a fault is raised: next test)
                raise RuntimeError("out of resource: shared memory")
            return 0.1
        if name == "none":
            return None
        return 1.0 if name == "steady" else tuning.LAST_RESORT

    assert tuning.choose("op_flaky", (7,), ["flaky", "steady", "none", "last"], bench) == "steady"
    entry = tuning.LOG[-1]
    assert "flaky" in entry["errors"] and "flaky" not in entry["ms"] and "none" not in entry["ms"]
    assert entry["passes"]["last"] == [tuning.LAST_RESORT]  # asked once, never again


def test_autotune_off_takes_the_first_candidate_without_measuring(tuning_dir, monkeypatch, use_settings):
    use_settings(autotune=False)
    assert tuning.choose("op_c", (3,), ["first", "second"], lambda n: pytest.fail("measured")) == "first"
    assert tuning.entries() == [], "an unmeasured default must not be remembered"


def test_unreadable_cache_file_is_replaced(tuning_dir):
    path = tuning.cache_file()
    open(path, "w").write("{not json")
    tuning.clear()
    assert tuning.choose("op_d", (4,), ["a", "b"], lambda n: {"a": 3.0, "b": 1.0}[n]) == "b"
    assert json.load(open(path))["format"] == 1


def test_select_resolves_tunable_candidates_by_measurement(tuning_dir):
    op = "test_tunable_op"
    impls = {name: object() for name in ("low", "high", "plain")}
    for name, prio, tunable in (("low", 1, True), ("high", 9, True), ("plain", 0, False)):
        backends.register(op, name, load=lambda n=name: impls[n], supports=lambda *t, forced=False: None,
                          priority=prio, tunable=tunable)
    x = torch.zeros(2)
    # Without a shape key the highest-priority candidate runs.
    assert backends.select(op, x)[0] == "high"
    timings = {impls["low"]: 1.0, impls["high"]: 5.0}
    name, impl = backends.select(op, x, tune=((7,), lambda impl: timings[impl]))
    assert name == "low" and impl is impls["low"]
    assert fusedpeft.last_backend(op) == "low"
    index, impl = backends.select_index(op, x, tune=((7,), lambda impl: pytest.fail("measured twice")))
    assert backends.impl_at(op, index) is impls["low"], "the backward must find the measured backend"
    # A forced backend is never replaced by the measurement.
    with fusedpeft.use_backend("high"):
        assert backends.select(op, x, tune=((7,), lambda impl: 0.0))[0] == "high"


def test_a_refusal_by_setting_is_asked_again_a_load_failure_is_kept():
    op = "test_refusing_op"
    refuse, calls = [True], {"refusing": 0, "broken": 0}

    def load_refusing():
        calls["refusing"] += 1
        if refuse[0]:
            raise backends.LoadRefused("a setting forbids it")
        return "impl"

    def load_broken():
        calls["broken"] += 1
        raise RuntimeError("cannot load")

    for name, load in (("refusing", load_refusing), ("broken", load_broken)):
        backends.register(op, name, load=load, supports=lambda *t, forced=False: None, priority=1)
    x = torch.zeros(2)
    for name in ("refusing", "broken"):
        with fusedpeft.use_backend(name), pytest.raises(RuntimeError, match="setting forbids|cannot load"):
            backends.select(op, x)
    refuse[0] = False
    with fusedpeft.use_backend("refusing"):
        assert backends.select(op, x) == ("refusing", "impl")
    with fusedpeft.use_backend("broken"), pytest.raises(RuntimeError, match="cannot load"):
        backends.select(op, x)
    assert calls == {"refusing": 2, "broken": 1}


def _lowrank_reference(out, l, q, scale, mask):
    low = l.double() @ q.double().T
    return out.double() + scale * (low if mask is None else low * mask.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,C,R", [(1, 40, 1), (37, 70, 16), (20, 33, 100)])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_lowrank_into_matches_float64(M, C, R, dtype, dropout):
    from fusedpeft._kernels import triton_kernels

    kernels = triton_kernels
    out = torch.randn(M, C).to(dtype)
    l = torch.randn(M, R).to(dtype)
    q_full = torch.randn(R, C).to(dtype)
    q = q_full.T  # [C, R] as a strided view, as the LoRA backward passes A^T
    seed = torch.tensor([int(torch.randint(0, 2**31 - 1, ()))])
    mask = kernels.lora.dropout_mask(seed, (M, C), dropout, out.device) if dropout else None
    expect = _lowrank_reference(out, l, q, 0.6, mask)
    kernels.lowrank.lowrank_into(out, l, q, 0.6, seed if dropout else None, dropout)
    assert_close(out, expect, dtype, f"lowrank_into {M}x{C}x{R}")


def test_lowrank_into_refuses_a_strided_output():
    from fusedpeft._kernels import triton_kernels

    out = torch.randn(8, 16).T
    with pytest.raises(ValueError, match="unit column stride"):
        triton_kernels.lowrank.lowrank_into(out, torch.randn(16, 2), torch.randn(8, 2), 1.0)


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_tunable_backends_with_dropout_draw_the_triton_mask(op, monkeypatch):
    """The candidates measured against each other on CUDA all draw the LoRA kernels' philox mask
    (read from the seed on the GPU: no host sync, new masks at each CUDA-graph replay), so a
    measured switch between them never changes what dropout does. The torch backend, which
    seeds a generator on the host, is not among them."""
    from fusedpeft.ops import lora as lora_mod

    tunable = [name for name in backends.registered(op) if backends._REGISTRY[op][name].tunable]
    assert "torch" not in tunable and "triton" in tunable and len(tunable) >= 2, tunable
    reference = backends._REGISTRY["lora_linear"]["triton"].impl().dropout_mask(99, (9, 70), 0.3, torch.device("cpu"))
    for backend in tunable:
        impl = backends._REGISTRY[op][backend].impl()
        assert torch.equal(impl.dropout_mask(99, (9, 70), 0.3, torch.device("cpu")), reference), backend
    # The seed comes from torch's generator: manual_seed reproduces it.
    torch.manual_seed(5)
    a = lora_mod._new_seed(torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(a, lora_mod._new_seed(torch.device("cpu")))
    assert a.dtype == torch.int64 and a.shape == (1,)


def test_lora_cublas_zero_rows_and_every_gradient_subset():
    """M = 0 and each subset of needed gradients through the cublas backend."""
    x = leaf(torch.randn(0, 24), torch.float32)
    W = torch.randn(16, 24)
    A, B = leaf(torch.randn(4, 24), torch.float32), leaf(torch.randn(16, 4), torch.float32)
    with fusedpeft.use_backend("cublas"):
        y = fusedpeft.ops.lora_linear(x, W, None, A, B, 2.0, dropout_p=0.2, training=True)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
    for need_x in (True, False):
        x = leaf(torch.randn(5, 24), torch.float32, requires_grad=need_x)
        A = leaf(torch.randn(4, 24), torch.float32, requires_grad=not need_x)
        B = leaf(torch.randn(16, 4), torch.float32)
        with fusedpeft.use_backend("cublas"):
            y = fusedpeft.ops.lora_linear(x, W, None, A, B, 2.0)
        y.square().sum().backward()
        ref_args = [leaf(t, torch.float64, requires_grad=t.requires_grad) for t in (x, A, B)]
        ref = fusedpeft.ops.lora_linear_reference(ref_args[0], W.double(), None, ref_args[1], ref_args[2], 2.0)
        ref.square().sum().backward()
        for t, r in zip((x, A, B), ref_args):
            assert (t.grad is None) == (r.grad is None)
            if t.grad is not None:
                assert_close(t.grad, r.grad, torch.float32)


@pytest.mark.cuda
def test_time_ms_with_cold_l2_runs_each_step_after_an_overwrite(monkeypatch):
    """cold_l2 (the serving ops' eager tuning): every step, the first included, follows one zeroing of
    the scrub buffer (twice L2), and the figure is a positive time."""
    order = []
    scrub = torch.empty(1024, dtype=torch.int32, device="cuda")
    real_zero = scrub.zero_
    monkeypatch.setattr(tuning, "_l2_scrub", lambda device: scrub)
    monkeypatch.setattr(scrub, "zero_", lambda: (order.append("scrub"), real_zero())[1])
    data = torch.randn(1 << 20, device="cuda")
    ms = tuning.time_ms(lambda: (order.append("step"), data.sum())[1], rounds=3, round_ms=0.5, cold_l2=True)
    assert ms > 0
    assert order[0] == "scrub" and order.count("scrub") == order.count("step") > 3
    assert all(a != b for a, b in zip(order, order[1:]))  # scrub, step, scrub, step, ...
