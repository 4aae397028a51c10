"""docs/python-api.md's walk-through runs as written: its code blocks, in order, in an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mctool

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_public_api_lists_the_commands_and_their_results():
    for name in ("train", "connect", "evaluate_curve", "export_point", "export_member", "plane", "fge", "evaluate",
                 "evaluate_models", "plot_files", "load_model", "load_curve", "load_ensemble", "TrainConfig",
                 "ConnectConfig", "FGEConfig", "progress", "read_h5", "file_info"):
        assert name in mctool.__all__ and callable(getattr(mctool, name)), name
    assert all(hasattr(mctool, name) for name in mctool.__all__)


def test_python_api_walkthrough_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name}[block {i + 1}]", "exec"), namespace)
        except Exception as e:  # name the block that failed
            pytest.fail(f"block {i + 1} of {DOC.name} raised {type(e).__name__}: {e}\n{code}")
    out = capsys.readouterr().out
    assert "refused:" in out
    for name in ("a1.safetensors", "curve.safetensors", "bezier.h5", "plane.h5", "mid.safetensors", "fge.safetensors",
                 "curves.png", "plane.png"):
        assert (tmp_path / name).is_file(), name
