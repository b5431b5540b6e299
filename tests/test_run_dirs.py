"""Run directories on a shared machine: one process per folder (train, experiment, tune, data
prepare), a failed resume or a full disk leaves the run as it was, and what we write is whole,
strict JSON. Bad-input rows for run directories are in test_cli_bad_input.py."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from amfs_dist.cli import main
from amfs_dist.locks import lock_path
from amfs_dist.train import Trainer
from conftest import TINY as SHARED_TINY
from conftest import ctrl_c_at_step

REPO = Path(__file__).resolve().parents[1]
TINY = [*SHARED_TINY, "eval.episodes=3", "train.checkpoint_every=1", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# holds the lock of argv[1] as a second amfs process would, until killed
HOLDER = ("import sys, time\nfrom amfs_dist.locks import hold\n"
          "with hold(sys.argv[1], 'run directory'):\n"
          "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")


@contextlib.contextmanager
def held_by_another_process(folder: Path, seconds: float = 600):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, env=ENV)
    try:
        assert proc.stdout.readline().strip() == b"held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def amfs(*args, preexec_fn=None, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "amfs_dist", *map(str, args)],
                          capture_output=True, text=True, env=ENV, preexec_fn=preexec_fn,
                          timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(run), *TINY, "train.steps=2"]) == 0
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amfs: error: "), err
    assert "Traceback" not in err
    return lines[0]


# (id, argv given (tmp_path, a finished run's copy)): each would write into the folder in use
IN_USE = [
    ("train-out", lambda t, r: ["train", "--out", t / "new", *TINY]),
    ("train-resume", lambda t, r: ["train", "--resume", r, "train.steps=3"]),
    ("train-resume-if-exists", lambda t, r: ["train", "--out", r, "--resume-if-exists", *TINY,
                                             "train.steps=3"]),
    ("experiment", lambda t, r: ["experiment", "compare", "--config",
                                 "compare", "--out", t / "new"]),
    ("tune", lambda t, r: ["tune", "--out", t / "new"]),
    ("data-prepare", lambda t, r: ["data", "prepare", "omniglot", "--src", t / "src", "--out",
                                   t / "new"]),
]


@pytest.mark.parametrize("argv", [pytest.param(a, id=i) for i, a in IN_USE])
def test_a_folder_in_use_by_another_process_is_refused_naming_it(argv, run, tmp_path, capsys):
    argv = [str(a) for a in argv(tmp_path, run)]
    folder = run if str(run) in argv else tmp_path / "new"
    (tmp_path / "src").mkdir()
    with held_by_another_process(folder) as holder:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert f"PID {holder.pid} on host {socket.gethostname()}" in line and str(folder) in line


def test_a_link_to_a_folder_in_use_is_refused_too(run, tmp_path, capsys):
    (tmp_path / "link").symlink_to(run)
    with held_by_another_process(run) as holder:
        assert main(["train", "--resume", str(tmp_path / "link"), "train.steps=3"]) == 2
    assert f"PID {holder.pid}" in one_error_line(capsys.readouterr().err)


def test_wait_for_lock_waits_for_the_holder_and_a_killed_holder_blocks_nothing(tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    with held_by_another_process(out, seconds=2) as holder:
        assert main(["train", "--out", str(out), "--wait-for-lock", *TINY,
                     "train.steps=1"]) == 0
    assert f"waiting for PID {holder.pid}" in capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["meta_steps"] == 1
    assert not lock_path(out).exists()  # the holder's lock is removed when it is done

    with held_by_another_process(out) as holder:  # SIGKILLed: the kernel drops its lock
        holder.kill()
        holder.wait()
        assert lock_path(out).exists()
        assert main(["train", "--resume", str(out), "train.steps=2", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["meta_steps"] == 2


def test_a_live_training_owns_its_run_directory(tmp_path, capsys, monkeypatch):
    """`--resume-if-exists` or `--resume` of a run that is still training in another process.
    Here, a step stops the command at once: a second training is refused before its first."""
    def interrupted(trainer):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    out = tmp_path / "live"
    args = ["train", "--out", out, *TINY, "train.steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "amfs_dist", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # start-up on a loaded machine: up to 2 minutes
            if (out / "checkpoint.pt").is_file() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert (out / "checkpoint.pt").is_file()
        rows = (out / "metrics.jsonl").read_bytes()
        assert main(["train", "--out", str(out), "--resume-if-exists", *TINY,
                     "train.steps=100000"]) == 2
        assert f"PID {proc.pid}" in one_error_line(capsys.readouterr().err)
        assert main(["train", "--resume", str(out), "--no-progress"]) == 2
        assert f"PID {proc.pid}" in one_error_line(capsys.readouterr().err)
        assert (out / "metrics.jsonl").read_bytes()[:len(rows)] == rows
    finally:
        proc.kill()
        proc.wait()


def test_a_resume_that_stops_before_its_first_step_changes_nothing(run, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with ctrl_c_at_step(2):
        assert main(["train", "--resume", str(run), "train.steps=4", "train.lr=0.5",
                     "--no-progress"]) == 130
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_run_whose_every_step_was_skipped_fails_and_writes_no_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "train.steps=2", "kernel.lam=1e-300"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "skipped" in line and "metrics.jsonl" in line
    assert not (out / "result.json").exists() and not (out / "model.pt").exists()


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_result_and_metrics_are_strict_json(tmp_path, capsys):
    """One test episode has no confidence interval: null, not NaN."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "train.steps=1", "eval.episodes=1"]) == 0
    assert _strict(capsys.readouterr().out)["test_ci95"] is None
    assert _strict((out / "result.json").read_text())["test_ci95"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict(line)


@pytest.mark.slow  # a subprocess: ~20 s on 2 loaded cores
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """`ulimit -f`: the checkpoint cannot be written whole."""
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
    out = tmp_path / "run"
    done = amfs("train", "--out", out, *TINY, "train.steps=2", preexec_fn=small_files)
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert "File too large" in line and str(out / "checkpoint.pt") in line
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


NO_ROOT_POWERS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]  # root obeys modes too


@pytest.mark.slow  # two subprocesses
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv")
def test_permission_errors_are_one_line_naming_the_path(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    os.chmod(run / "metrics.jsonl", 0)
    for argv, path in ((["train", "--out", locked / "new", *TINY], locked),
                       (["train", "--resume", run, "train.steps=3"], run / "metrics.jsonl")):
        done = amfs(*argv, prefix=NO_ROOT_POWERS)
        assert done.returncode == 1, done.stderr
        line = one_error_line(done.stderr)
        assert str(path) in line and "Permission denied" in line
