"""benchmarks/layers.py on CPU: the smoke run of the layer table (tiny shapes, perf_counter timings)
produces every expected row with finite positive times, and the summary's weighted block and
targets come out right on results made up for the purpose."""
import importlib.util
import json
import math

import pytest

from benchmarks import harness, layers

from helpers import StoppedByTimeLimit, cut_after_first_group

SHAPES = "16x32x24,16x24x40+b"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("layers")
    argv = ["--device", "cpu", "--shapes", SHAPES, "--methods", "lora,dora,ia3,ssf", "--ranks", "4", "--dropouts", "0,0.05",
            "--warmup-ms", "0", "--rep-ms", "1", "--out", str(out / "t.md"), "--json", str(out / "t.json")]
    results = layers.main(argv)
    return results, (out / "t.md").read_text(), json.loads((out / "t.json").read_text())


def _expected():
    labels = {"16x32x24": "custom linear 32->24 M=16", "16x24x40+b": "custom linear 24->40 +bias M=16"}
    rows = set()
    with_peft = {"base (cuBLAS)", "fusedpeft", "torch composition"}
    if importlib.util.find_spec("peft") is not None:
        with_peft.add("peft")
    for shape in SHAPES.split(","):
        for p in ("0", "0.05"):
            rows |= {(f"{labels[shape]} r=4 p={p}", v) for v in with_peft | {"torch composition, float32 adapters"}}
            rows |= {(f"{labels[shape]} dora r=4 p={p}", v) for v in with_peft}
        for method in ("ia3-out", "ia3-ff"):
            rows |= {(f"{labels[shape]} {method}", v) for v in with_peft | {"fusedpeft [torch]"}}
        rows |= {(f"{labels[shape]} ssf", v) for v in ("base (cuBLAS)", "fusedpeft", "fusedpeft [torch]", "torch composition")}
    return rows


def test_every_row_with_finite_positive_times(smoke):
    results, md, data = smoke
    got = {(r.group, r.variant) for r in results}
    assert got == _expected()  # CPU: no forced triton / cublas rows
    for r in results:
        assert math.isfinite(r.fwd_ms) and r.fwd_ms > 0, r
        assert math.isfinite(r.train_ms) and r.train_ms > 0, r
        assert math.isnan(r.train_mem_mib)  # not measured on CPU
    paths = {(r.group, r.variant): r.path for r in results}
    for (group, variant), path in paths.items():
        if variant.startswith("fusedpeft"):
            assert path == "torch", (group, variant, path)  # automatic on CPU, and the forced one
    for group, variant in got:
        assert f"| {group} | {variant} |" in md
    assert "## Summary" in md and "Targets" in md
    assert {(row["group"], row["variant"]) for row in data["rows"]} == got
    assert all(row["train_mem_mib"] is None for row in data["rows"])


def _made_up(groups, times):
    results = []
    for g in groups:
        for variant, (fwd, train, mem) in times(g).items():
            results.append(harness.Result(g.label, variant, fwd, train, mem, 0.0, ""))
    return results


def test_block_weights_and_targets():
    shapes = {s.layers: s for s in layers.MODELS["llama3-8b"]}
    groups = [layers.Group(s, 8192, "lora", 16, 0.0) for s in shapes.values()]
    base_ms = {"q/o": 1.0, "k/v": 0.5, "gate/up": 3.0, "down": 3.0}
    ours = {"q/o": 1.2, "k/v": 0.5, "gate/up": 3.0, "down": 3.3}  # q/o misses the train target (1.2 > 1.10)

    def times(g):
        b, o = base_ms[g.shape.layers], ours[g.shape.layers]
        return {"base (cuBLAS)": (b, 2 * b, 100.0), "fusedpeft": (b, 2 * o, 104.0 if g.shape.layers != "down" else 110.0),
                "peft": (b, 4 * b, 300.0), "torch composition": (b, 3 * b, 200.0),
                "torch composition, float32 adapters": (b, 3.5 * b, 210.0)}

    text = layers.summary(_made_up(groups, times), groups)
    # time-weighted: q, k, v, o, gate, up, down once each
    weights = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
    expect = sum(weights[k] * ours[k] for k in ours) / sum(weights[k] * base_ms[k] for k in ours)
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if "fusedpeft train / base" in ln)
    block_row = lines[head + 2]
    assert block_row.startswith("| 8192 | r=16 p=0 |")
    cells = [c.strip() for c in block_row.strip("|").split("|")]
    # train / base: fusedpeft, peft, the composition, the composition with float32 adapters
    assert cells[2:6] == [f"{expect:.3f}", "2.000", "1.500", "1.750"]
    assert cells[6:10] == ["1.000"] * 4  # fwd / base
    slower = [ln for ln in lines if ln.startswith("| 8192 | r=16 p=0 | 4 |")][0]
    assert "| 0 / 4 |" in slower  # never slower than peft or the composition here
    target = [ln for ln in lines if ln.startswith("| 0 | 4 |")][0]
    assert "| 3 / 4 | 4 / 4 | 3 / 4 |" in target  # train (q/o misses), fwd, memory (down misses)
    assert "llama3-8b q/o 4096->4096: train 1.20" in target and "llama3-8b down 14336->4096: mem 1.10" in target


def test_a_run_cut_short_keeps_the_groups_it_finished(one_thread, monkeypatch, tmp_path):
    """A run stopped by a time limit (here: a case of the second group never returns) leaves the
    first group's rows in --out and --json, marked partial; the whole run's files are not marked."""
    out, js = tmp_path / "t.md", tmp_path / "t.json"
    argv = ["--device", "cpu", "--shapes", SHAPES, "--ranks", "4", "--dropouts", "0", "--warmup-ms", "0", "--rep-ms", "1",
            "--out", str(out), "--json", str(js)]
    run = cut_after_first_group(monkeypatch, harness)
    with pytest.raises(StoppedByTimeLimit):
        layers.main(argv)
    saved = json.loads(js.read_text())
    assert saved["partial"] == "1 of 2 groups"
    assert {r["group"] for r in saved["rows"]} == {"custom linear 32->24 M=16 r=4 p=0"}
    assert "Partial: 1 of 2 groups" in out.read_text() and "custom linear 24->40" not in out.read_text()
    monkeypatch.setattr(harness, "run", run)
    layers.main(argv)
    saved = json.loads(js.read_text())
    assert saved["partial"] is None and len({r["group"] for r in saved["rows"]}) == 2
    assert "Partial" not in out.read_text()


@pytest.mark.parametrize("thread,multithreaded", [("caller", False), ("engine", True)])
def test_harness_runs_the_backward_on_the_thread_asked_for(thread, multithreaded):
    """The layer table's steps run their backward on the calling thread by default (a model pays
    autograd's hand-off to its device thread once per step, not per layer); the setting is restored
    after the run, and a thread the harness does not know is refused."""
    import torch

    seen = []

    def make():
        x = torch.randn(4, 3, requires_grad=True)

        def fwd():
            seen.append(torch.autograd.is_multithreading_enabled())
            return x * 2.0

        return fwd, harness.step_fn(fwd, torch.ones(4, 3), [x])

    before = torch.autograd.is_multithreading_enabled()
    harness.run([harness.Case("g", "v", make)], log=lambda line: None, device="cpu", warmup_ms=0, rep_ms=1,
                backward_thread=thread)
    assert seen and set(seen) == {multithreaded}
    assert torch.autograd.is_multithreading_enabled() == before
    with pytest.raises(ValueError, match="backward_thread"):
        harness.run([], device="cpu", backward_thread="device")


def test_host_dispatch_tool_runs_the_composed_paths():
    """tools.host_dispatch (its own process: it rewires the registry and the tuner): a row per op,
    and the backends it names as the tuner's picks are the ones that ran, the compositions."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tools.host_dispatch", "--calls", "20"], capture_output=True,
                         text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("ia3_linear") and "fwd + bwd" in line for line in lines), out.stdout
    assert any(line.startswith("lora_linear") and "fwd + bwd" in line for line in lines), out.stdout
    assert "backends that ran: lora_linear cublas_autograd, ia3_linear torch" in out.stdout
