"""Shared fixtures: the tiny settings, seeded global random generators, one Ray cluster per test
session (started on first use), and a `ray start --head` cluster of a test's own (head_node)."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Property tests draw the same examples on every run (a failure reproduces; CI does not flake on
# a new example); `pytest --hypothesis-profile=explore` draws new ones.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("repeatable")

# Settings small enough for a test on 2 CPU cores, large enough to exercise every code path.
TINY = ["data.ways=3", "data.shots=1", "data.queries=2", "model.width=8", "train.meta_batch=4",
        "train.val_every=0", "eval.episodes=6", "eval.queries=2", "eval.batch=3",
        "train.val_episodes=3", "maml.steps=1", "maml.test_steps=1"]


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Each test starts from the same state of torch's, numpy's and Python's global random
    generators: a test that draws from them without a generator of its own is reproducible and
    does not depend on which tests ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@contextlib.contextmanager
def ctrl_c_at_step(step: int):
    """Within the block, Trainer.train_step raises KeyboardInterrupt (what Ctrl-C raises) when
    the trainer's step counter is `step`."""
    from amfs_dist.train import Trainer
    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self)

    Trainer.train_step = interrupted
    try:
        yield
    finally:
        Trainer.train_step = real_step


class PickleThatWritesAFile:
    """Unpickling this (torch.load with weights_only=False, pickle.load) creates the file `path`:
    a stand-in for the code a crafted pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole session: 2 CPUs and 2 logical GPUs (placement only)."""
    ray = pytest.importorskip("ray")
    from amfs_dist.distributed.cluster import start_private_ray
    if not ray.is_initialized():
        # always a new private cluster on 127.0.0.1, never one that another `ray start` left
        start_private_ray(num_cpus=2, num_gpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def head_node(tmp_path):
    """A `ray start --head` cluster of the test's own: its own temp dir, free ports, every
    server on 127.0.0.1, RAY_AUTH_MODE=disabled; yields (ray_bin, dashboard address, env, process)."""
    from helpers import free_ports, stop_cluster

    ray_bin = shutil.which("ray", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                      os.environ.get("PATH", "")]))
    if ray_bin is None:
        pytest.skip("the `ray` command is not installed")
    temp_dir = tempfile.mkdtemp(prefix="amfs-ray-", dir="/tmp")  # short: Ray's socket paths
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "head.log").open("w")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
         "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
         f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "ray start failed: " + (tmp_path / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise AssertionError("the Ray dashboard did not come up in 60 s: "
                                         + (tmp_path / "head.log").read_text()[-3000:]) from e
                time.sleep(0.5)
        yield ray_bin, address, env, proc
    finally:
        stop_cluster(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- a local S3 endpoint (moto's server) ---------------------------------------------------------
BUCKET = "amfs-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 (moto's server, stopped by its PID), one bucket, and the
    environment that points pyarrow at it; yields a pyarrow S3FileSystem to inspect it with."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the S3 endpoint")
    pafs = pytest.importorskip("pyarrow.fs")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1",
                               allow_bucket_creation=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.create_dir(BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
