"""cluster/slurm/amfs-ray.sbatch on a real one-node Slurm (tests/slurm_cluster.sh).

The Slurm is this module's own: munged, slurmctld and slurmd started from a temp dir with their
own key, ports and state, stopped by pid at the end. It needs root and the Debian packages
slurm-wlm and munge (.ci/run installs them where apt is there); without them the tests skip.
Each job runs the script as a user would: its own Ray head, then `amfs train` on it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "slurm" / "amfs-ray.sbatch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}
TRAIN = ["train", "--no-progress", "--resume-if-exists", *TINY, "dist.workers=1",
         "dist.cpus_per_worker=1"]


def slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "starting a private slurmctld/slurmd needs root"
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
               if shutil.which(t) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.ray,
              pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))]


class Slurm:
    def __init__(self, root: Path, conf: str):
        self.root = root
        bin_dir = str(Path(sys.executable).parent)  # `amfs`, `ray`, `python3` of this environment
        self.env = dict(os.environ, SLURM_CONF=conf, RAY_AUTH_MODE="disabled",
                        PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                 os.environ.get("PYTHONPATH")])))
        self.env.pop("RAY_ADDRESS", None)

    def run(self, *cmd: str) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
        return done.stdout

    def submit(self, *args: str, options: tuple[str, ...] = (), env: dict | None = None) -> str:
        cmd = ["sbatch", "--parsable", "--cpus-per-task=1", "--time=10",
               f"--output={self.root}/job-%j.out", *options, str(SCRIPT), *args]
        done = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=60, cwd=self.root)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, until: set[str] = ENDED, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in until:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']} " \
                                                f"after {timeout} s:\n{self.output(job_id)}"
            time.sleep(1)

    def output(self, job_id: str) -> str:
        """The job's own output, then what slurmctld and slurmd logged about it (why a launch
        failed shows only there)."""
        path = self.root / f"job-{job_id}.out"
        text = path.read_text() if path.exists() else ""
        mention = re.compile(rf"\bjob(id=| )?{job_id}\b", re.IGNORECASE)
        for daemon in ("slurmctld", "slurmd"):
            log = self.root / "log" / f"{daemon}.log"
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if mention.search(ln)] \
                if log.exists() else []
            text += f"\n--- {daemon}.log on job {job_id} ---\n" + "\n".join(lines[-40:])
        return text

    def job_output(self, job_id: str) -> str:
        path = self.root / f"job-{job_id}.out"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def slurm():
    root = Path(tempfile.mkdtemp(prefix="amfs-slurm-", dir="/tmp"))  # short: socket paths
    cluster = [str(REPO / "tests" / "slurm_cluster.sh")]
    started = subprocess.run([*cluster, "start", str(root)], capture_output=True, text=True,
                             timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        yield Slurm(root, started.stdout.strip())
    finally:
        subprocess.run([*cluster, "stop", str(root)], timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def assert_quiet_success(slurm: Slurm, job_id: str, job: dict) -> str:
    log = slurm.job_output(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", slurm.output(job_id)
    # a clean end: no srun/slurmstepd errors, nothing killed, this job's Ray temp dir gone
    # (a requeue shows as Slurm's own "CANCELLED ... DUE TO JOB REQUEUE" line)
    log_without_requeue = re.sub(r".*CANCELLED AT \S+ DUE TO JOB REQUEUE.*\n", "", log)
    assert not re.search(r"srun: error|Killed|Terminated|CANCELLED|Traceback",
                         log_without_requeue), log
    assert not Path(f"/tmp/ray-{job_id}").exists()
    return log


def test_two_jobs_at_once_each_complete_on_their_own_ray_cluster(slurm, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    ids = [slurm.submit(*TRAIN, "--out", str(run), "train.steps=3") for run in runs]
    jobs = [slurm.wait(i) for i in ids]
    addresses = []
    for job_id, job, run in zip(ids, jobs, runs):
        log = assert_quiet_success(slurm, job_id, job)
        # the driver ran on this job's head, which checked that every node is this job's
        address = re.search(r"amfs-ray: 1 node\(s\) at (\S+): 1 CPUs, 0 GPUs", log)
        assert address, log
        addresses.append(address.group(1))
        assert f"Using address {address.group(1)} set in the environment variable RAY_ADDRESS" in log
        assert json.loads((run / "result.json").read_text())["meta_steps"] == 3
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(r["exchange_bytes"] > 0 for r in rows)  # on a Ray worker
    assert addresses[0] != addresses[1]
    start, end = ([datetime.fromisoformat(j[k]) for j in jobs] for k in ("StartTime", "EndTime"))
    assert start[0] < end[1] and start[1] < end[0], "the two jobs did not run at the same time"


def test_a_job_signalled_before_its_time_limit_is_requeued_and_continues_the_run(slurm, tmp_path):
    steps = 40
    run = tmp_path / "run"
    # checkpoint_every > steps: the only checkpoint before the end is the one USR1 makes
    args = [*TRAIN, "--out", str(run), f"train.steps={steps}", f"train.checkpoint_every={steps + 10}"]
    job_id = slurm.submit(*args)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert slurm.job(job_id)["JobState"] in {"PENDING", "RUNNING"}, slurm.output(job_id)
        assert time.monotonic() < deadline, slurm.output(job_id)
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@300` sends 300 s before the time limit, sent now
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    job = slurm.wait(job_id, until={"PENDING"} | ENDED)
    assert job["JobState"] == "PENDING" and job["Restarts"] == "1", slurm.output(job_id)
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < stopped_at < steps, slurm.output(job_id)
    assert not (run / "result.json").exists()
    # Slurm holds a requeued job for cred_expire + 1 s (6 s here, tests/slurm_cluster.sh)

    # the uninterrupted run, in-process, meanwhile
    from amfs_dist import lifecycle
    from amfs_dist.config import load_config
    reference = tmp_path / "reference"
    lifecycle.train(load_config(None, TINY + [f"train.steps={steps}"]), reference, progress=False)

    job = slurm.wait(job_id)
    log = assert_quiet_success(slurm, job_id, job)
    assert job["Restarts"] == "1"
    assert "USR1: the time limit is near" in log and f"requeueing job {job_id}" in log
    result = json.loads((run / "result.json").read_text())
    assert result["meta_steps"] == steps and result["resumed"] is True
    rows = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert rows == list(range(1, steps + 1))
    got = torch.load(run / "model.pt", weights_only=True)["model"]
    want = torch.load(reference / "model.pt", weights_only=True)["model"]
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_a_job_whose_head_does_not_start_fails_fast_and_says_why(slurm, tmp_path):
    # a temp dir that cannot be created: the head cannot start
    job_id = slurm.submit(*TRAIN, "--out", str(tmp_path / "run"), "train.steps=3",
                          env={"AMFS_RAY_TMPDIR": "/proc/no-such-dir"})
    job = slurm.wait(job_id, timeout=120)
    log = slurm.output(job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", log
    assert "amfs-ray: error: the Ray head on" in log and "did not start" in log
    assert not (tmp_path / "run").exists()  # the driver never ran
