"""Waits that end: a RAY_ADDRESS where no cluster answers and a gs:// location that cannot be
reached each give one line within a bounded time (cluster/README.md, README "Object storage"),
and change nothing."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from amfs_dist import storage
from amfs_dist.cli import main
from conftest import TINY
from helpers import snapshot

# generous on a loaded 2-core machine (building the run comes first); the waits are bounded at
# seconds here, and were 3 (GCS) and 8 (RAY_ADDRESS) minutes before
DEADLINE_S = 150


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep(tmp_path):
    from helpers import write_sweep
    return ["tune", "--config", str(write_sweep(tmp_path / "sweep.yaml")), "--out",
            str(tmp_path / "sweep"), "--quiet"]


def _experiment(tmp_path):
    (tmp_path / "e.yaml").write_text("base: {data.ways: 3, model.width: 8, train.steps: 2}\n"
                                     "grid: {method: [amfs]}\nseeds: 1\nresources: {cpus: 1}\n")
    return ["experiment", "compare", "--config", str(tmp_path / "e.yaml"), "--out",
            str(tmp_path / "exp"), "--quiet"]


# (id, argv(tmp_path), env, what the line names)
ROWS = [
    ("ray-address-down-train", lambda t: ["train", "--out", str(t / "run"), "--no-progress",
                                          *TINY, "dist.workers=1"], "ray", "RAY_ADDRESS="),
    ("ray-address-down-tune", _sweep, "ray", "RAY_ADDRESS="),
    ("ray-address-down-experiment", _experiment, "ray", "RAY_ADDRESS="),
    ("gcs-unreachable", lambda t: ["train", "--out", "gs://amfs-no-such-bucket/run",
                                   "--no-progress", *TINY], "gcs", "gs://amfs-no-such-bucket/run"),
]


@pytest.mark.parametrize("argv,env,named", [pytest.param(a, e, n, id=i) for i, a, e, n in ROWS])
def test_a_wait_that_cannot_end_well_is_one_line_in_bounded_time(argv, env, named, tmp_path,
                                                                 capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    if env == "ray":
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
        monkeypatch.setenv("AMFS_RAY_CONNECT_TIMEOUT_S", "2")
    else:  # no credentials, and a GCS endpoint where nothing answers
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{_closed_port()}")
        monkeypatch.setattr(storage, "GCS_RETRY_TIME_LIMIT", timedelta(seconds=2), raising=False)
    args = argv(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    started = time.monotonic()
    if env == "ray":  # a process of its own: this one may be connected to the tests' Ray already
        done = subprocess.run([sys.executable, "-m", "amfs_dist", *args], capture_output=True,
                              text=True, timeout=DEADLINE_S)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        code = main(args)
        out, err = capsys.readouterr()
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("amfs: error: "), err
    assert named in lines[0], err
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("cache")} == {
        k: v for k, v in before.items() if not k.startswith("cache")}


def test_a_wait_for_the_autoscaler_says_what_it_waits_for(monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    from amfs_dist.distributed import cluster
    monkeypatch.setattr(cluster, "autoscaling_maximum", lambda: {"CPU": 64.0, "GPU": 8.0})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cluster.check_resources([{"CPU": 1.0, "GPU": 1.0}] * 2, "dist.workers=2")
    err = capsys.readouterr().err
    assert "dist.workers=2 asks for 2 CPU, 2 GPU" in err and "0 GPU now" in err, err
    assert "waiting for its autoscaler" in err and "dist.timeout_s" in err, err
    cluster.check_resources([{"CPU": 1.0}], "dist.workers=1")  # fits now: nothing to say
    assert capsys.readouterr().err == ""
