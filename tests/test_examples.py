"""Every script in examples/ runs, with its tiny settings (as a user would run it)."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,args,expected", [
    ("train_and_adapt.py", ["--tiny"], "queries right"),
    ("predict_your_images.py", ["--demo", "--tiny"], "adapted to 3 classes from 6 images"),
])
def test_example_runs(script, args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' runs and folders
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert expected in out, out
    assert list(tmp_path.iterdir())  # what it made went where the test said


def test_custom_head_example_registers_trains_and_evaluates_its_head(tmp_path):
    """In a process of its own, as a user runs it: the head it registers stays out of this
    test session's registry."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "custom_head.py"), "--tiny", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "method cosproto (inner cosine_prototypes)" in done.stdout, done.stdout
    assert (tmp_path / "run" / "result.json").is_file()


def test_every_example_is_tested():
    tested = {"train_and_adapt.py", "predict_your_images.py", "custom_head.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
