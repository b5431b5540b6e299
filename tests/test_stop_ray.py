"""Stop signals and a killed driver for the commands that start a Ray of their own (`amfs tune`,
`amfs experiment`, `amfs train` with workers): a stop signal stops them cleanly within a
deadline (Ray's native TERM handler would abort them), and a SIGKILLed driver leaves no Ray
process behind. Real signals to real `amfs` subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amfs_dist.train import CHECKPOINT
from conftest import TINY
from helpers import (
    GOOD,
    STOP_DEADLINE_S,
    amfs_env,
    logged_rows,
    read_csv_rows,
    signal_when_ready,
    wait_until_ready,
    write_sweep,
)

AMFS = [sys.executable, "-m", "amfs_dist"]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _no_ray_abort(output: str) -> None:
    assert "SIGTERM received" not in output and "Traceback" not in output, output[-3000:]


def test_sigterm_stops_a_sweep_and_the_same_command_continues_it(tmp_path):
    # two trials of 40 steps with a validation (and a Tune checkpoint) every 2 steps
    f = write_sweep(tmp_path / "sweep.yaml", base={"train.steps": 40}, num_samples=2,
                    scheduler="fifo", points_to_evaluate=[GOOD])
    out, log, env = tmp_path / "out", tmp_path / "tune.log", amfs_env()
    cmd = AMFS + ["tune", "--config", str(f), "--out", str(out), "--resume-if-exists",
                  "--allow-pickle", "--quiet"]
    rc, output = signal_when_ready(
        cmd, log, env, lambda: any(p.name != "checkpoint_000000"
                                   for p in (out / "tune").glob("trial_*/checkpoint_*")),
        signal.SIGTERM, timeout=300)
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    _no_ray_abort(output)
    assert "sweep stopped by SIGTERM" in output, output[-3000:]
    assert f"amfs tune --resume {out.resolve()} --allow-pickle" in output, output[-3000:]
    assert not (out / "trials.csv").exists()

    # a requeued job runs the very same command: it continues the sweep
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv_rows(out / "trials.csv")
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    assert any(int(r["resumed_from"]) > 0 for r in rows), rows
    # another sweep into the same --out is refused, naming what differs
    other = write_sweep(tmp_path / "other.yaml", base={"train.steps": 42}, num_samples=2)
    done = subprocess.run(AMFS + ["tune", "--config", str(other), "--out", str(out),
                                  "--resume-if-exists", "--allow-pickle"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds another sweep" in done.stderr, done.stderr[-3000:]


EXPERIMENT = """
base: {data.ways: 3, data.shots: 1, data.queries: 2, model.width: 8, train.meta_batch: 4,
       train.steps: 3000, train.val_every: 0, train.checkpoint_every: 100000,
       eval.episodes: 6, eval.queries: 2, eval.batch: 3}
grid: {method: [amfs]}
seeds: 1
resources: {cpus: 1}
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_stops_an_experiment_and_its_cells_checkpoint(signum, tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(EXPERIMENT)
    out, log = tmp_path / "out", tmp_path / "exp.log"
    cells = out / "cells"
    rc, output = signal_when_ready(
        AMFS + ["experiment", "compare", "--config", str(f), "--out", str(out), "--quiet"], log,
        amfs_env(), lambda: any(len(logged_rows(c)) >= 3 for c in cells.glob("*")), signum,
        timeout=300)
    assert rc == 128 + signum, output[-3000:]
    _no_ray_abort(output)
    assert f"experiment stopped by {signal.Signals(signum).name}" in output, output[-3000:]
    [cell] = list(cells.glob("*"))
    step = torch.load(cell / CHECKPOINT, weights_only=True)["step"]  # the cell checkpointed
    assert step >= 3 and [r["step"] for r in logged_rows(cell)] == list(range(1, step + 1))


def _session_processes(sid: int) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid:
                found.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes()
                             .replace(b"\0", b" ").decode(errors="replace")[:120])
        except OSError:
            pass
    return found


def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    with log.open("w") as f:  # a session of its own: every process it starts stays in it
        proc = subprocess.Popen(AMFS + ["train", "--no-progress", "--out", str(run)] + TINY
                                + ["train.steps=3000", "dist.workers=1",
                                   "dist.cpus_per_worker=0.5"],
                                env=amfs_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sid = proc.pid
    try:
        wait_until_ready(proc, lambda: len(logged_rows(run)) >= 2, log, 300)
        assert any("DashboardAgent" in p for p in _session_processes(sid))  # Ray is up
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + STOP_DEADLINE_S
        while _session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _session_processes(sid)
    finally:
        if proc.poll() is None:
            proc.kill()
    for line in left:  # never leave them to the next test
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not left, left
