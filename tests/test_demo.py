"""``python -m fusedpeft demo`` end to end, as a user runs it: exit code, the lines it prints, the
adapter directories it writes; and that a failed check makes it exit non-zero."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fusedpeft.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_demo(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDPEFT_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "fusedpeft", "demo", "--device", "cpu", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _float(pattern, text):
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return [float(g) for g in m.groups()]


def test_demo_trains_saves_reloads_and_reports(tmp_path):
    out_dir = tmp_path / "adapters"
    rc, out, err = _run_demo("--steps", "8", "--seed", "3", "--out-dir", str(out_dir))
    assert rc == 0, f"demo exited {rc}\nstdout:\n{out}\nstderr:\n{err}"

    assert re.search(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}$", out, re.M)
    before, after = _float(r"held-out loss: before (\d+\.\d+) -> after (\d+\.\d+)", out)
    assert after < before
    first, last = _float(r"train loss: first step (\d+\.\d+) -> last step (\d+\.\d+)", out)
    assert last < first
    (rel,) = _float(r"reloaded vs trained outputs: max relative error (\S+) ", out)
    assert rel <= 1e-5
    assert "FAIL" not in out and out.count("[ok]") >= 4
    assert out.rstrip().splitlines()[-1].startswith("demo passed in ")
    # Each fused op reports the backend that ran it (the torch one on a CPU).
    calls = dict(re.findall(r"^  (lora_linear|ia3_linear|ssf_linear): torch x (\d+)$", out, re.M))
    assert set(calls) == {"lora_linear", "ia3_linear", "ssf_linear"} and all(int(n) > 0 for n in calls.values())
    # The tqdm bar went to stderr with the running loss.
    assert "training" in err and "loss=" in err

    # One directory per adapter, in peft's format (SSF: fusedpeft's own, in the same layout).
    for name, peft_type in (("lora", "LORA"), ("ia3", "IA3"), ("ssf", "SSF")):
        d = out_dir / name
        assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
        assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == peft_type
        assert f"saved adapter '{name}' to {d}" in out


def test_demo_exits_nonzero_when_a_check_fails(tmp_path, capsys):
    # With a zero learning rate the loss cannot fall: the check fails and the exit code says so.
    # (In-process, through the console script's entry point, to save a second interpreter start.)
    threads = torch.get_num_threads()
    try:
        rc = main(["demo", "--device", "cpu", "--steps", "2", "--lr", "0", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "[FAIL] held-out loss fell" in out
    assert out.rstrip().splitlines()[-1].startswith("demo FAILED")


def test_cli_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])  # a subcommand is required
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "0"])
    assert exc.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--steps", "--device", "--seed", "--out-dir"):
        assert option in help_text
