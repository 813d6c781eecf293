"""``python -m fusedpeft demo`` end to end, as a user runs it: exit code, the lines it prints, the
adapter directories it writes; and that a failed check makes it exit non-zero. Off a terminal its
progress is plain lines, it leaves no temporary directory, and its --help names README's devices."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedpeft import demo
from fusedpeft.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDPEFT_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run_demo(*args, timeout=120):
    proc = subprocess.run(
        [sys.executable, "-m", "fusedpeft", "demo", "--device", "cpu", *args],
        cwd=ROOT, env=_demo_env(), capture_output=True, text=True, timeout=timeout,
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
    # The progress went to stderr with the running loss (as plain lines: stderr is a pipe here).
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


@pytest.fixture(scope="module")
def demo_off_a_terminal(tmp_path_factory):
    """One run of the demo as in a CI log: stdout and stderr are pipes, no --out-dir, and TMPDIR is
    a fresh empty directory. The output is kept as bytes: text mode would turn a \\r into \\n."""
    tmpdir = tmp_path_factory.mktemp("demo_tmpdir")
    proc = subprocess.run(
        [sys.executable, "-m", "fusedpeft", "demo", "--device", "cpu", "--steps", "8"],
        cwd=ROOT, env=_demo_env(TMPDIR=str(tmpdir)), capture_output=True, timeout=120,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"demo exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err, tmpdir


def test_demo_progress_is_plain_lines_off_a_terminal(demo_off_a_terminal):
    out, err, _ = demo_off_a_terminal
    assert "\r" not in out and "\r" not in err, f"carriage returns in the output:\n{(out + err)!r}"
    # A line per steps // 10 steps (at least one per step) and the last step, with the loss.
    assert re.findall(r"^training: step (\d+)/8 loss=\d+\.\d{4} ", err, re.M) == [str(i) for i in range(1, 9)]


def test_demo_shows_a_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    # In-process, with the captured streams claiming to be a terminal: the tqdm bar, not plain lines.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    threads = torch.get_num_threads()
    try:
        rc = main(["demo", "--device", "cpu", "--steps", "3", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "\r" in err and "3/3" in err and "loss=" in err
    assert not re.search(r"^training: step ", err, re.M)


def test_demo_leaves_no_temporary_directory(demo_off_a_terminal):
    out, _, tmpdir = demo_off_a_terminal
    # The adapters went to a directory under TMPDIR and were reloaded from there...
    saved = re.findall(r"^saved adapter '(\w+)' to (\S+) ", out, re.M)
    assert [name for name, _ in saved] == ["lora", "ia3", "ssf"]
    assert all(Path(d).parent.parent == tmpdir for _, d in saved), saved
    assert "[ok] reloaded model reproduces the trained model's outputs" in out
    # ...and nothing is left there.
    assert sorted(os.listdir(tmpdir)) == []


def test_help_names_the_device_choices_the_readme_names(capsys):
    readme = (Path(ROOT) / "README.md").read_text()
    section = readme.split("\n## A fresh machine\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"`--device` picks where it runs: (.*?)\.\s", section)
    assert m, "README's 'A fresh machine' names no --device choices"
    readme_text = m.group(1)
    readme_choices = re.findall(r"`([^`]+)`", readme_text)
    (readme_default,) = re.findall(r"`([^`]+)` \(the default", readme_text)

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    m = re.search(r"--device \{([^}]*)\}", help_text)
    assert m, help_text
    assert m.group(1).split(",") == readme_choices
    assert readme_text.replace("`", "") in help_text  # the same words, the default included

    # And the parser takes each of them (cuda:N as cuda:1), defaults to README's default, and
    # refuses a name outside them.
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args([]).device == readme_default
    for choice in readme_choices:
        value = choice.replace(":N", ":1")
        assert parser.parse_args(["--device", value]).device == value
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "gpu"])
