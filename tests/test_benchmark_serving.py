"""benchmarks/serving.py on CPU: the smoke run gives every expected row with finite positive times
(the GPU run times the Triton and CUDA backends too)."""
import math

import pytest
import torch
from helpers import StoppedByTimeLimit, cut_after_first_group

from benchmarks import harness, serving


def test_serving_benchmark_smoke_run_on_cpu(one_thread):
    lines = []
    results = serving.main(["--device", "cpu", "--hidden", "32", "--rows", "4,2x4", "--adapters", "1,3", "--ranks",
                            "4,mixed"], log=lines.append)
    groups = {r.group for r in results}
    assert groups == {f"{rows} rows, {n} adapters, r={rk}" for rows in ("4", "2x4") for n in (1, 3) for rk in ("4", "mixed")}
    for group in groups:
        variants = {r.variant: r for r in results if r.group == group}
        assert {"base (cuBLAS)", "fusedpeft", "peft"} <= set(variants)
        assert variants["fusedpeft"].path == "torch"
    assert all(math.isfinite(r.fwd_ms) and r.fwd_ms > 0 for r in results)
    assert "| 2x4 rows, 3 adapters, r=mixed | fusedpeft |" in lines[-1]


def test_serving_model_level_smoke_run_on_cpu(one_thread):
    lines = []
    rows = serving.main(["--model-level", "--device", "cpu", "--dtype", "float32", "--sequences", "3",
                         "--model-adapters", "2", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1"],
                        log=lines.append)
    assert [r["variant"] for r in rows] == ["fusedpeft mixed batch", "one adapter merged",
                                            "fusedpeft, one adapter for every sequence"]
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    assert "| fusedpeft mixed batch |" in lines[-1]


def test_a_serving_run_cut_short_keeps_the_groups_it_finished(one_thread, monkeypatch, tmp_path):
    out = tmp_path / "t.md"
    argv = ["--device", "cpu", "--hidden", "32", "--rows", "4", "--adapters", "1,3", "--ranks", "4", "--out", str(out)]
    run = cut_after_first_group(monkeypatch, harness)
    with pytest.raises(StoppedByTimeLimit):
        serving.main(argv, log=lambda *a: None)
    text = out.read_text()
    assert "**Partial:" in text and "| 4 rows, 1 adapters, r=4 | fusedpeft |" in text and "3 adapters" not in text
    monkeypatch.setattr(harness, "run", run)
    serving.main(argv, log=lambda *a: None)
    text = out.read_text()
    assert "Partial" not in text and "| 4 rows, 3 adapters, r=4 | fusedpeft |" in text


def test_graphs_mode_times_each_forward_through_its_capture(monkeypatch):
    """--graphs: every case's forward goes through harness.graphed (a stand-in here, which counts and
    returns the forward itself: capture needs CUDA) and peft's layer, which cannot be captured, is
    left out."""
    captured = []

    def stand_in(fn):
        captured.append(fn)
        return fn

    monkeypatch.setattr(harness, "graphed", stand_in)
    cases = serving.cases(("4", 1, 4), 2, "4", 16, torch.float32, "cpu", with_peft=True, graphs=True)
    assert "peft" not in {c.variant for c in cases}
    for case in cases:
        fwd, step = case.make()
        assert fwd is step and fwd().shape == (1, 4, 16)
    assert len(captured) == len(cases)
    plain = serving.cases(("4", 1, 4), 2, "4", 16, torch.float32, "cpu", with_peft=True)
    assert "peft" in {c.variant for c in plain}
