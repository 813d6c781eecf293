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


def test_readme_settings_table_lists_every_setting():
    """Every setting and its environment variable has a row in README's Settings table, and the
    table names nothing that is not a setting."""
    from fusedpeft.settings import environment_variables

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(FUSEDPEFT_\w+)` \|", table, flags=re.M))
    assert rows == environment_variables()
