"""Stop signals (Ctrl-C, SIGTERM from Slurm/Kubernetes/`ray job stop`, Slurm's SIGUSR1 before
the time limit) end the current step, checkpoint and exit; `--resume` then ends at the
parameters of an uninterrupted run. Through the CLI, in a subprocess, as a scheduler would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amfs_dist.config import load_config
from amfs_dist.train import CHECKPOINT
from conftest import TINY
from helpers import (
    assert_same_params,
    metrics,
    model_state,
    resume_to_the_end,
    train_in_process,
)

STEPS = 30
CMD = [sys.executable, "-m", "amfs_dist", "train", "--no-progress"]


def _env(**extra) -> dict:
    return dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
                PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                            os.environ.get("PYTHONPATH", "")]), **extra)


def _signal_mid_run(run: Path, args: list[str], signum: int, env: dict, log_path: Path):
    """Start `amfs train`, send `signum` once a few steps are logged; (returncode, output)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(CMD + ["--out", str(run)] + args, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if (run / "metrics.jsonl").exists() \
                        and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before the signal: " + log_path.read_text()
            proc.send_signal(signum)
            rc = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, log_path.read_text()


def _check_stopped(run: Path, rc: int, output: str, signum: int) -> None:
    name = signal.Signals(signum).name
    assert rc == 128 + signum, output[-3000:]
    assert f"stopped by {name}" in output and f"amfs train --resume {run}" in output, output
    assert "Traceback" not in output
    assert not (run / "result.json").exists()
    stopped_at = torch.load(run / CHECKPOINT, weights_only=True)["step"]
    # the checkpoint holds the last finished step, and every finished step is logged once
    assert 3 <= stopped_at < STEPS
    assert [r["step"] for r in metrics(run)] == list(range(1, stopped_at + 1))


# checkpoint_every beyond the run: only the checkpoint taken on the way out can save the steps
ARGS = TINY + [f"train.steps={STEPS}", f"train.checkpoint_every={10 * STEPS}"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT],
                         ids=lambda s: s.name)
def test_a_stop_signal_checkpoints_in_process_and_resume_matches(signum, tmp_path):
    run, env = tmp_path / "run", _env()
    rc, output = _signal_mid_run(run, ARGS, signum, env, tmp_path / "run.log")
    _check_stopped(run, rc, output, signum)
    resume_to_the_end(CMD, run, env, STEPS, timeout=300)
    reference = train_in_process(load_config(None, ARGS), tmp_path / "reference")
    for name, value in reference.items():  # in-process resume is exact
        torch.testing.assert_close(model_state(run)[name], value, rtol=0, atol=0)


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_checkpoints_with_workers_and_resume_matches(ray_session, tmp_path):
    args = ARGS + ["dist.workers=2", "dist.cpus_per_worker=0.5"]
    run = tmp_path / "run"
    env = _env(RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    rc, output = _signal_mid_run(run, args, signal.SIGTERM, env, tmp_path / "run.log")
    _check_stopped(run, rc, output, signal.SIGTERM)
    resume_to_the_end(CMD, run, env, STEPS, timeout=300)
    reference = train_in_process(load_config(None, ARGS), tmp_path / "reference")
    assert_same_params(model_state(run), reference, atol=1e-5)
