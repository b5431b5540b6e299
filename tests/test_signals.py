"""Stop signals (Ctrl-C, SIGTERM from Slurm/Kubernetes/`ray job stop`, Slurm's SIGUSR1 before
the time limit) end the current step, checkpoint and exit; `--resume` then ends at the
parameters of an uninterrupted run. Through the CLI, in a subprocess, as a scheduler would."""
from __future__ import annotations

import json
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
    amfs_env,
    assert_same_params,
    logged_rows,
    metrics,
    model_state,
    resume_to_the_end,
    signal_when_ready,
    train_in_process,
)

STEPS = 30
CMD = [sys.executable, "-m", "amfs_dist", "train", "--no-progress"]


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
    run, env = tmp_path / "run", amfs_env()
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
    env = amfs_env(RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    rc, output = _signal_mid_run(run, args, signal.SIGTERM, env, tmp_path / "run.log")
    _check_stopped(run, rc, output, signal.SIGTERM)
    resume_to_the_end(CMD, run, env, STEPS, timeout=300)
    reference = train_in_process(load_config(None, ARGS), tmp_path / "reference")
    assert_same_params(model_state(run), reference, atol=1e-5)


# -- a stop signal ends whatever runs within seconds ----------------------------------------------
ENDLESS = 10**6  # episodes: hours of evaluation


def test_a_stop_signal_ends_a_validation_at_once(tmp_path):
    # a validation after step 2 that would take hours: SIGTERM ends it, step 2 is logged
    # (without a validation) and checkpointed, and the run says how to continue
    run, log = tmp_path / "run", tmp_path / "run.log"
    args = TINY + [f"train.steps={STEPS}", "train.val_every=2", f"train.val_episodes={ENDLESS}",
                   f"train.checkpoint_every={10 * STEPS}"]
    rc, output = signal_when_ready(CMD + ["--out", str(run)] + args, log, amfs_env(),
                                   lambda: len(logged_rows(run)) >= 1, signal.SIGTERM,
                                   settle=2)  # into step 2's validation
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output and f"amfs train --resume {run}" in output, output
    assert "Traceback" not in output
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 2
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert "val_accuracy" not in metrics(run)[-1]


@pytest.mark.slow  # three commands in subprocesses
def test_a_stop_signal_ends_the_final_test_and_amfs_eval(tmp_path):
    run, log, env = tmp_path / "run", tmp_path / "run.log", amfs_env()
    args = TINY + ["train.steps=3", f"eval.episodes={ENDLESS}"]
    rc, output = signal_when_ready(CMD + ["--out", str(run)] + args, log, env,
                                   lambda: (run / "model.pt").exists(),  # written before the test
                                   signal.SIGUSR1, settle=1)
    assert rc == 128 + signal.SIGUSR1, output[-3000:]
    assert "stopped by SIGUSR1 during the final test" in output, output
    assert f"amfs train --resume {run}" in output and "Traceback" not in output, output
    assert not (run / "result.json").exists()
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 3

    # `amfs eval` of hours of episodes: SIGTERM ends it with one line
    log = tmp_path / "eval.log"
    rc, output = signal_when_ready(
        [sys.executable, "-m", "amfs_dist", "eval", str(run), "--episodes", str(ENDLESS)], log, env,
        lambda: "test episodes" in log.read_text(), signal.SIGTERM)  # its progress bar
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    assert "amfs: stopped by SIGTERM" in output and "Traceback" not in output, output

    # as the message said: --resume runs the final test (at a size that ends)
    done = subprocess.run(CMD + ["--resume", str(run), "eval.episodes=6"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["test_episodes"] == 6


# SIGTERM to `amfs data prepare` while it writes the store (sent from inside the Arrow write, so
# that it comes exactly then), through the real command line in a subprocess
PREPARE_TERMINATED_IN_WRITE = """
import os, signal, sys
import pyarrow.ipc
real = pyarrow.ipc.new_file
def new_file(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
pyarrow.ipc.new_file = new_file
from amfs_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_data_prepare_removes_its_temporary_store(tmp_path):
    from helpers import lake_tree
    src, out = lake_tree(tmp_path / "src"), tmp_path / "stores" / "omniglot"
    done = subprocess.run([sys.executable, "-c", PREPARE_TERMINATED_IN_WRITE, "data", "prepare",
                           "omniglot", "--split", "lake", "--src", str(src), "--out", str(out)],
                          env=amfs_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "amfs: stopped by SIGTERM" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no .omniglot.tmp-* left behind


def test_a_stop_signal_ends_a_wait_for_ray(tmp_path):
    # RAY_ADDRESS where nothing answers, waited for up to 10 minutes: SIGTERM ends the wait
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run, log = tmp_path / "run", tmp_path / "run.log"
    env = amfs_env(RAY_ADDRESS=f"127.0.0.1:{port}", AMFS_RAY_CONNECT_TIMEOUT_S="600")
    rc, output = signal_when_ready(
        CMD + ["--out", str(run)] + TINY + ["dist.workers=1"], log, env,
        lambda: "waiting up to 600 s for the Ray cluster" in log.read_text(), signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    assert "amfs: stopped by SIGTERM" in output and "Traceback" not in output, output
    assert not run.exists()
