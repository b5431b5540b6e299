"""The installed package, not the checkout: what `pip install` (and so the image) ships."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# run in the installed copy, from a folder that holds no experiments/ or tuning/: each command
# must find its file (a shipped name, an old checkout-relative path, or the user's own file)
# and then refuse the unknown key, which proves the file was read
PROBE = """
import contextlib, io, json, sys
import amfs_dist
from amfs_dist.cli import main
out = {"package": amfs_dist.__file__, "runs": []}
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out["runs"].append([argv, rc, err.getvalue()])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_installed_package_runs_its_shipped_experiment_and_sweep_files_from_any_folder(tmp_path):
    src = tmp_path / "src"  # what the Dockerfile copies into the image before `pip install`
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "amfs_dist", src / "amfs_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(site), str(src)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mine = shutil.copy(site / "amfs_dist" / "experiments" / "smoke.yaml", elsewhere / "mine.yaml")
    bad = "kernel.lamda=1"
    argvs = [["experiment", "compare", bad],
             ["experiment", "steps", "--config", "smoke", bad],
             ["experiment", "steps", "--config", "experiments/smoke.yaml", bad],
             ["experiment", "steps", "--config", str(mine), bad],
             ["tune", bad],
             ["tune", "--config", "omniglot-gpu", bad],
             ["tune", "--config", "tuning/tiny-cpu.yaml", bad]]
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.splitlines()[-1])
    assert Path(probe["package"]).is_relative_to(site)
    for argv, rc, err in probe["runs"]:
        assert rc == 2 and "kernel.lamda: unknown config key" in err, (argv, err)
    assert [p.name for p in elsewhere.iterdir()] == ["mine.yaml"]  # nothing written


def test_a_missing_file_names_the_shipped_ones(tmp_path, capsys, monkeypatch):
    from amfs_dist.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert "sweep file nope: not found" in err and "tiny-cpu" in err
    assert main(["experiment", "compare", "--config", "tuning/tiny-cpu.yaml"]) == 2
    assert "experiment file tuning/tiny-cpu.yaml: not found" in capsys.readouterr().err
