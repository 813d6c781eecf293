"""The README's API example runs as written and prints what its comment says."""
import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 10, 128) and scope["z"].shape == (2, 10, 128)
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").exists()
    expected = re.search(r"# (trainable params: [\d,]+ \|\| all params: [\d,]+)", code).group(1)
    assert expected in capsys.readouterr().out
