"""The README's Python snippet runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([1, 10])" in capsys.readouterr().out
    assert (tmp_path / "pruned_tiny" / "arch.json").is_file()
