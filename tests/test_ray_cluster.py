"""Which Ray cluster amfs uses (distributed/cluster.py): its own instance listens on loopback
only and never joins a cluster it was not asked to; requests the cluster cannot hold fail at
once with what was asked and what the cluster has."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from amfs_dist.cli import main as amfs
from amfs_dist.config import dump_yaml
from conftest import TINY
from helpers import is_loopback, listening_sockets

REPO = Path(__file__).resolve().parents[1]


# -- what `ss -ltnp` shows, read from /proc -------------------------------------------------------
def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def ray_pids(driver: int, temp_dir: str) -> dict[int, str]:
    """pid -> name of the driver, its descendants, and every process whose command line names
    the instance's temp dir (in case one was re-parented)."""
    children, pids, todo = _children(), set(), [driver]
    while todo:
        pid = todo.pop()
        pids.add(pid)
        todo += children.get(pid, [])
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            pass
    names = {}
    for pid in pids:
        try:
            names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            pass
    return names


def end_processes(names: dict[int, str]) -> None:
    """SIGKILL those of `names` still alive under the same name (pids are not reused twice)."""
    for pid, name in names.items():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.slow
def test_own_ray_instance_listens_on_loopback_only_and_joins_no_other_cluster(tmp_path):
    """`amfs train dist.workers=2` with no RAY_ADDRESS: every listening socket of the Ray
    instance it starts (GCS, raylet, agents, driver and shard workers) is bound to loopback.
    The machine's 'last `ray start` cluster' file names a dead address on 127.0.0.1: a plain
    ray.init() would try to join it; the run must start its own instance instead."""
    temp_dir = tempfile.mkdtemp(prefix="amfs-rt-", dir="/tmp")  # short: Ray's socket paths
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    (Path(temp_dir) / "ray").mkdir()
    (Path(temp_dir) / "ray" / "ray_current_cluster").write_text(dead)
    env = dict(os.environ, RAY_TMPDIR=temp_dir,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # nothing asked: amfs picks both itself
        env.pop(key, None)
    run = tmp_path / "run"
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "amfs_dist", "train", "--no-progress", "--out", str(run), *TINY,
         "train.steps=100000", "train.checkpoint_every=100000", "dist.workers=2",
         "dist.cpus_per_worker=0.5"], env=env, stdout=log, stderr=subprocess.STDOUT)
    names: dict[int, str] = {}
    rows = run / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if rows.exists() and len(rows.read_text().splitlines()) >= 2:
                break  # both workers have answered
            time.sleep(0.2)
        assert proc.poll() is None and rows.exists(), (
            "the run did not train: " + (tmp_path / "train.log").read_text()[-3000:])
        names = ray_pids(proc.pid, temp_dir)
        sockets = listening_sockets(names)
        auth = {Path(f"/proc/{p}/environ").read_bytes().split(b"\0").count(
            b"RAY_AUTH_MODE=disabled") for p, n in names.items() if n == "gcs_server"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # checkpoint, shut Ray down, exit
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        end_processes(names)
        shutil.rmtree(temp_dir, ignore_errors=True)
    # the instance is the run's own, in its RAY_TMPDIR: it joined nothing
    owners = {names[p] for p, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= owners, owners
    assert sum(n.startswith("ray::ShardWork") for n in names.values()) == 2, names
    assert len({p for p, _, _ in sockets}) >= 5, sockets  # GCS, raylet, agents, driver, workers
    exposed = [(names[p], str(a), port) for p, a, port in sockets if not is_loopback(a)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert auth == {1}  # RAY_AUTH_MODE is set explicitly, not left to Ray


# -- requests the cluster cannot hold (the session cluster: 2 CPUs, 2 GPUs, 1 node) --------------
@pytest.mark.ray
@pytest.mark.parametrize("ask, says", [
    pytest.param(["dist.workers=1", "dist.gpus_per_worker=1", "dist.cpus_per_worker=3"],
                 "asks for 3 CPU, 1 GPU", id="a-worker-of-3-cpus-on-2"),
    pytest.param(["dist.workers=3", "dist.gpus_per_worker=1", "dist.cpus_per_worker=0.5"],
                 "asks for 1.5 CPU, 3 GPU (0.5 CPU, 1 GPU on one node)",
                 id="3-gpus-on-2"),
    pytest.param(["dist.workers=1", "dist.cpus_per_worker=99"], "asks for 99 CPU",
                 id="99-cpus-on-2"),
])
def test_workers_the_cluster_cannot_hold_fail_at_once(ray_session, tmp_path, capsys, ask, says):
    rc = amfs(["train", "--no-progress", "--out", str(tmp_path / "run"), *TINY, "train.steps=2",
               *ask])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("amfs: error: dist.workers="), err
    assert says in err and "the cluster (1 node, not autoscaling) has 2 CPU" in err, err


@pytest.mark.ray
def test_a_trial_the_cluster_cannot_hold_fails_at_once(ray_session, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(dump_yaml({
        "base": {"data.ways": 3, "data.queries": 2, "model.width": 8, "train.steps": 2,
                 "train.val_every": 1, "train.device": "cpu", "dist.workers": 1,
                 "dist.gpus_per_worker": 3},
        "search": {"kernel.lam": {"loguniform": [0.01, 1.0]}},
        "sweep": {"num_samples": 1, "grace_period": 1}}))
    out = tmp_path / "out"
    assert amfs(["tune", "--config", str(sweep), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("amfs: error: a trial (sweep.trial_cpus=1, sweep.trial_gpus=0, "
                          "dist.workers=1 x"), err
    assert "asks for 2 CPU, 3 GPU (1 CPU, 3 GPU on one node)" in err and "has 2 CPU, 2 GPU" in err
    assert not out.exists()  # refused before anything was written
    assert amfs(["tune", "--config", str(sweep), "--out", str(out), "--quiet",
                 "dist.gpus_per_worker=0", "sweep.trial_cpus=99"]) == 2
    assert "asks for 100 CPU" in capsys.readouterr().err
