"""The model-level training benchmark (benchmarks/model.py) end to end on CPU with tiny configs:
every family, adapter and variant yields a timed row, and the loss-curve check yields numbers and
can fail."""
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

try:
    from benchmarks import model as bench
except ImportError:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import model as bench


def test_tiny_run_on_cpu(one_thread, tmp_path):
    out, js = tmp_path / "t.md", tmp_path / "t.json"
    report = bench.main(["--device", "cpu", "--tiny", "--batches", "2x16", "--adapters", "lora,lora-dropout,ia3,dora",
                         "--timed-steps", "1", "--warmup-steps", "1", "--curve-steps", "3", "--check",
                         "--out", str(out), "--json", str(js)], log=lambda *a: None)
    rows = {(r["model"], r["batch"], r["adapter"], r["variant"]): r for r in report["rows"]}
    for model_name in bench.MODELS:
        for adapter in bench.ADAPTERS:
            for variant in bench.VARIANTS.values():
                r = rows[(model_name, "2x16", adapter, variant)]
                assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
                assert r["peak_gib"] is None  # no memory on CPU
                trainable = r["trainable"]
                assert (trainable == 0) == (variant == "floor"), r
            # peft, from_peft and inject adapt the same modules
            assert len({rows[(model_name, "2x16", adapter, v)]["trainable"] for v in list(bench.VARIANTS.values())[:3]}) == 1
            fused = rows[(model_name, "2x16", adapter, "fusedpeft (inject)")]["backend_counts"]
            assert any(k.endswith("/torch") for k in fused), fused  # the torch backend ran on CPU
    curves = report["curves"]
    assert len(curves) == len(bench.MODELS) * len(bench.ADAPTERS) * 2
    for c in curves:
        assert c["error"] is None, c
        assert len(c["loss_peft"]) == len(c["loss"]) == 3
        assert all(math.isfinite(v) for v in c["loss_peft"] + c["loss"] + [c["max_rel_diff"]]), c
        assert c["ok"], c
    assert report["status"] == 0
    text = out.read_text()
    assert "| llama3-8b | 2x16 | lora | fusedpeft (from_peft) |" in text and "Loss curves" in text
    assert js.stat().st_size > 0


def test_curve_check_can_fail():
    args = bench.parse_args(["--tiny", "--batches", "2x16"])
    ref = [4.0, 3.9, 3.8]
    curves = {"peft": ref, "from_peft": [4.0, 3.9, 3.8 * 1.03], "inject": "ValueError: names differ"}
    out = {c["variant"]: c for c in bench.compare_curves("llama3-8b", "lora", curves, args)}
    assert not out["fusedpeft (from_peft)"]["ok"] and out["fusedpeft (from_peft)"]["max_rel_diff"] == pytest.approx(0.03)
    assert not out["fusedpeft (inject)"]["ok"]
    dropout = bench.compare_curves("llama3-8b", "lora-dropout", curves, args)
    assert dropout[0]["ok"]  # 3% is within the 5% allowed with dropout
    assert "**FAIL**" in bench.curve_table(list(out.values()))


def test_a_variant_that_raises_is_reported(one_thread, monkeypatch):
    build = bench.build_variant

    def broken(variant, *a, **k):
        if variant == "inject":
            raise RuntimeError("planted failure")
        return build(variant, *a, **k)

    monkeypatch.setattr(bench, "build_variant", broken)
    report = bench.main(["--device", "cpu", "--tiny", "--models", "qwen2.5-0.5b", "--adapters", "lora", "--batches", "2x16",
                         "--timed-steps", "1", "--warmup-steps", "1", "--curve-steps", "2"], log=lambda *a: None)
    assert [e["variant"] for e in report["errors"]] == ["fusedpeft (inject)"]
    assert "planted failure" in report["errors"][0]["error"]
    assert {r["variant"] for r in report["rows"]} == {"peft", "fusedpeft (from_peft)", "floor"}
    assert [c["variant"] for c in report["curves"]] == ["fusedpeft (from_peft)"]
    assert report["status"] == 1


def test_a_run_cut_short_keeps_the_cases_it_finished(one_thread, monkeypatch, tmp_path):
    """A run stopped by a time limit (here: the second case never returns) leaves the first case's
    rows in --out and --json, marked partial; a whole run's report is not marked."""
    run_case = bench.run_case

    class Stopped(Exception):
        pass

    def second_never_returns(model_name, adapter, *a, **k):
        if adapter == "ia3":
            raise Stopped
        return run_case(model_name, adapter, *a, **k)

    monkeypatch.setattr(bench, "run_case", second_never_returns)
    out, js = tmp_path / "t.md", tmp_path / "t.json"
    argv = ["--device", "cpu", "--tiny", "--models", "qwen2.5-0.5b", "--batches", "2x16", "--timed-steps", "1",
            "--warmup-steps", "1", "--curve-steps", "2", "--out", str(out), "--json", str(js)]
    with pytest.raises(Stopped):
        bench.main([*argv, "--adapters", "lora,ia3"], log=lambda *a: None)
    saved = json.loads(js.read_text())
    assert saved["partial"] == "1 of 2 (model, adapter) cases"
    assert {r["adapter"] for r in saved["rows"]} == {"lora"} and len(saved["rows"]) == len(bench.VARIANTS)
    assert "Partial: 1 of 2" in out.read_text() and "| qwen2.5-0.5b | 2x16 | lora | peft |" in out.read_text()
    report = bench.main([*argv, "--adapters", "lora"], log=lambda *a: None)
    assert report["partial"] is None and "Partial" not in out.read_text()


def test_interleaved_turns_rotate_the_variants(monkeypatch):
    """--rounds: each turn takes one step of every variant, the first variant of a turn moving by one
    each turn, and each variant's figure is the median of its own steps."""
    import torch

    calls = []
    step_ms = {"peft": [5.0, 1.0, 9.0, 7.0], "inject": [2.0, 2.0, 2.0, 8.0], "floor": [1.0, 1.0, 1.0, 1.0]}

    def fake_step(model, opt, batch):
        calls.append((model, batch))

    def fake_times(step, steps, cuda):
        before = len(calls)
        step(0)
        model = calls[before][0]
        return [step_ms[model][sum(1 for m, _ in calls if m == model) - 1]]

    monkeypatch.setattr(bench, "train_step", fake_step)
    monkeypatch.setattr(bench.harness, "step_times_ms", fake_times)
    runs = {v: (v, None) for v in step_ms}
    medians = bench.time_interleaved(runs, ["b0", "b1"], 4, torch.device("cpu"))
    assert [m for m, _ in calls] == ["peft", "inject", "floor", "inject", "floor", "peft", "floor", "peft", "inject",
                                     "peft", "inject", "floor"]
    assert [b for _, b in calls] == ["b0"] * 3 + ["b1"] * 3 + ["b0"] * 3 + ["b1"] * 3
    assert medians == {"peft": 6.0, "inject": 2.0, "floor": 1.0}


def test_rounds_replace_the_step_time_and_keep_the_lone_pass(one_thread):
    argv = ["--device", "cpu", "--tiny", "--models", "qwen2.5-0.5b", "--adapters", "lora", "--batches", "2x16",
            "--timed-steps", "1", "--warmup-steps", "1", "--curve-steps", "0"]
    interleaved = bench.main([*argv, "--rounds", "2"], log=lambda *a: None)
    for r in interleaved["rows"]:
        assert r["step_ms_alone"] > 0 and r["step_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(32 / (r["step_ms"] * 1e-3))
    alone = bench.main([*argv, "--rounds", "0"], log=lambda *a: None)
    assert all("step_ms_alone" not in r for r in alone["rows"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "-1"])


def test_model_split_runs_on_cpu(one_thread):
    """tools.model_split: a row per variant with its interleaved step time; no kernel columns on CPU."""
    from tools import model_split

    rows = model_split.main(["--device", "cpu", "--tiny", "--models", "qwen2.5-0.5b", "--batches", "1x16", "--adapters",
                             "lora", "--timed-steps", "2", "--warmup-steps", "1", "--rounds", "1"], log=lambda *a: None)
    assert [r["variant"] for r in rows] == list(bench.VARIANTS.values())
    for r in rows:
        assert r["event_ms"] > 0 and r["kernels_ms"] is None and r["batch"] == "1x16"


@pytest.mark.parametrize("adapter_gib,expect_above", [(0.25, True), (0.01, False)])
def test_least_memory_is_the_floor_plus_the_adapters_and_their_moments(adapter_gib, expect_above):
    """mem_bound_vs_peft = (floor's peak + 3 x the trainable bytes) / peft's peak, on every adapted
    row of the group, and none on the floor's own row: with the floor at 0.8 of peft's peak, adapters
    of 0.25 GiB (x 3) put the bound over 0.85, adapters of 0.01 GiB keep it under."""
    row = dict(model=bench.MODELS[0], batch="1x8", adapter="lora", tokens_per_s=100.0, step_ms=10.0, first_step_s=1.0)
    peft_peak, floor_peak = 10.0, 8.0
    trainable_bytes = adapter_gib * 2**30
    rows = [dict(row, variant="peft", peak_gib=peft_peak, trainable_bytes=trainable_bytes),
            dict(row, variant="fusedpeft (inject)", peak_gib=9.0, trainable_bytes=trainable_bytes),
            dict(row, variant="floor", peak_gib=floor_peak, trainable_bytes=0, step_ms=5.0)]
    bench.add_ratios(rows)
    bound = (floor_peak + 3 * adapter_gib) / peft_peak
    for r in rows[:2]:
        assert r["mem_bound_vs_peft"] == pytest.approx(bound)
    assert rows[2]["mem_bound_vs_peft"] is None
    assert (rows[1]["mem_bound_vs_peft"] > 0.85) == expect_above
    text = bench.table(rows)
    assert "least mem / peft" in text and f"| {bound:.3f} |" in text
