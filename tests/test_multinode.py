"""Ray across nodes: two Linux network namespaces on one machine (tests/netns.py), a Ray head in
node 1 and a Ray node in node 2, one CPU each, so that two shard workers of one CPU land one on
each node. `amfs train` runs in node 1 with RAY_ADDRESS naming the head.

Each exchange runs with the nodes' hostnames resolving to loopback (the Debian default) and to
the node's address; with train.deterministic=true the parameters are bitwise those of the
in-process run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import netns
from amfs_dist.cli import main as amfs
from amfs_dist.distributed.collective import advertise_route_to, route_to
from amfs_dist.runs import RESULT
from amfs_dist.train import CHECKPOINT
from conftest import TINY

RUN = TINY + ["train.steps=2", "train.deterministic=true", "dist.block_size=512",
              "dist.timeout_s=60"]

# `amfs train ARGS`, then which nodes the run's shard workers were on (Ray's actor table keeps
# dead actors): one JSON line {"rc": ..., "ips": [...]}
DRIVER = """
import json, sys, ray
from ray._private import state
from amfs_dist.cli import main
rc = main(sys.argv[1:])
ray.init(log_to_driver=False)
workers = [a for a in state.actors().values()
           if a["ActorClassName"].endswith(("ShardWorker", "RayTrainWorker"))]
job = max((a["JobID"] for a in workers), default=None)
print(json.dumps({"rc": rc, "ips": sorted(a["Address"]["IPAddress"] for a in workers
                                          if a["JobID"] == job)}))
"""


@pytest.fixture(scope="module")
def nodes():
    why = netns.unavailable()
    if why:
        pytest.skip(f"no namespace nodes here: {why}")
    cluster = netns.Nodes(2)
    try:
        cluster.start_ray(1)
        cluster.start_ray(2)
        cluster.wait_for_ray(2)
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("in-process")
    assert amfs(["train", "--no-progress", "--out", str(run), *RUN]) == 0
    return model(run)


def model(run) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def train_across(nodes: netns.Nodes, run, *extra: str) -> dict:
    done = nodes.run(1, [sys.executable, "-c", DRIVER, "train", "--no-progress", "--out",
                         str(run), *RUN, *extra], timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.mark.slow
@pytest.mark.parametrize("hostname_is", ["loopback", "node address"])
@pytest.mark.parametrize("exchange", ["exact", "sketch", "collective"])
def test_two_workers_on_two_nodes(nodes, in_process, tmp_path, exchange, hostname_is):
    nodes.set_hosts(loopback=hostname_is == "loopback")
    result = train_across(nodes, tmp_path, "dist.workers=2", f"dist.exchange={exchange}")
    assert result["rc"] == 0, result["stderr"][-4000:]
    assert result["ips"] == [nodes.address(1), nodes.address(2)]  # one worker on each node
    params = model(tmp_path)
    if exchange == "sketch":  # weights from sketches: not the in-process numbers
        assert all(torch.isfinite(v).all() for v in params.values())
        assert not torch.equal(params["head.scale"], in_process["head.scale"]) or any(
            not torch.equal(v, in_process[k]) for k, v in params.items())
        return
    for key, value in in_process.items():
        assert torch.equal(value, params[key]), f"{key} differs from the in-process run"


# -- the address the collective advertises ---------------------------------------------------------
def test_route_to_names_the_interface_towards_the_host():
    assert route_to("127.0.0.1", 29500) == ("127.0.0.1", "lo")


@pytest.mark.parametrize("user_set", [{}, {"GLOO_SOCKET_IFNAME": "eth7"},
                                      {"GLOO_SOCKET_IFNAME": "eth7", "NCCL_SOCKET_IFNAME": "ib0"}])
def test_the_users_socket_interface_wins(monkeypatch, user_set):
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in user_set.items():
        monkeypatch.setenv(key, value)
    assert advertise_route_to("127.0.0.1", 29500, list(user_set)) == "127.0.0.1"
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert os.environ[key] == user_set.get(key, "lo")


# -- a node lost with its raylet -------------------------------------------------------------------
def wait_for(what: str, ready, proc, log, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the driver ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s: {log.read_text()[-3000:]}"
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.parametrize("then", ["the bounded wait ends", "SIGTERM while it waits"])
def test_a_lost_node_stops_the_run_with_a_checkpoint(nodes, tmp_path, then):
    """Every process of node 2 (its raylet and worker 1) is killed mid-run; node 1 has no room
    for worker 1's replacement. The driver says what it waits for and for how long, then stops
    with the checkpoint of the last finished step: at the bound, or at once on SIGTERM."""
    nodes.set_hosts(loopback=True)
    bound = 5 if then == "the bounded wait ends" else 600
    run, log = tmp_path / "run", tmp_path / "driver.log"
    with log.open("w") as out:
        driver = nodes.popen(1, [sys.executable, "-m", "amfs_dist", "train", "--no-progress",
                                 "--out", str(run), *TINY, "train.steps=100000",
                                 "train.checkpoint_every=1", "dist.workers=2",
                                 f"dist.replace_timeout_s={bound}"],
                             stdout=out, stderr=subprocess.STDOUT)
    rows = run / "metrics.jsonl"
    try:
        wait_for("second step", lambda: rows.exists() and len(rows.read_text().splitlines()) >= 2,
                 driver, log)
        nodes.kill(2)
        said = (f"waiting up to {bound:g} s (dist.replace_timeout_s) for a node with room for "
                f"shard worker 1's replacement")
        wait_for("word of the wait", lambda: said in log.read_text(), driver, log)
        if then == "SIGTERM while it waits":
            driver.send_signal(signal.SIGTERM)
            assert driver.wait(30) == 143, log.read_text()[-3000:]  # at once: no step ends soon
            (line,) = [ln for ln in log.read_text().splitlines() if ln.startswith("amfs:")]
            stopped = re.fullmatch(r"amfs: stopped by SIGTERM at step (\d+) while waiting for "
                                   r"shard workers; checkpoint saved: resume with `amfs train "
                                   r"--resume .+`", line)
            assert stopped, line
        else:
            assert driver.wait(120) == 1
            (line,) = [ln for ln in log.read_text().splitlines() if ln.startswith("amfs:")]
            assert line.startswith(f"amfs: error: no node had room for shard worker 1's "
                                   f"replacement within dist.replace_timeout_s={bound:g} s"), line
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.start_ray(2)
        nodes.wait_for_ray(2)
    finished = len(rows.read_text().splitlines())
    assert finished >= 2
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == finished
    if then == "SIGTERM while it waits":
        assert int(stopped[1]) == finished


# -- elastic: dist.min_workers ---------------------------------------------------------------------
@pytest.mark.slow
def test_an_elastic_run_goes_on_without_a_lost_node_and_grows_back(nodes, tmp_path, capsys):
    """dist.min_workers=1: node 2 is killed with its raylet, no node has room for worker 1's
    replacement within dist.replace_timeout_s, and the run goes on with worker 0 alone; node 2
    is started again and the run grows back to two workers (the `workers` column goes 2, 1, 2,
    and `amfs status` says 2). Its parameters are bitwise those of an in-process run of as many
    steps (train.deterministic)."""
    nodes.set_hosts(loopback=True)
    run, log = tmp_path / "run", tmp_path / "driver.log"
    with log.open("w") as out:
        driver = nodes.popen(1, [sys.executable, "-m", "amfs_dist", "train", "--no-progress",
                                 "--out", str(run), *RUN, "train.steps=100000",
                                 "train.checkpoint_every=1", "dist.workers=2",
                                 "dist.min_workers=1", "dist.replace_timeout_s=3"],
                             stdout=out, stderr=subprocess.STDOUT)
    rows = run / "metrics.jsonl"
    workers = lambda: [json.loads(r)["workers"] for r in rows.read_text().splitlines()] \
        if rows.exists() else []
    try:
        wait_for("second step", lambda: len(workers()) >= 2, driver, log)
        nodes.kill(2)
        wait_for("a step with one worker", lambda: 1 in workers(), driver, log)
        assert "going on with 1 workers (dist.min_workers=1)" in log.read_text()
        nodes.start_ray(2)
        wait_for("two workers again", lambda: workers()[-1] == 2 and 1 in workers(), driver, log)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(120) == 143, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if 2 not in nodes.procs:
            nodes.start_ray(2)
        nodes.wait_for_ray(2)
    counts = workers()
    assert re.fullmatch(r"2{2,}1+2+", "".join(map(str, counts))), counts
    assert amfs(["status", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["workers"] == 2
    reference = tmp_path / "in-process"
    assert amfs(["train", "--no-progress", "--out", str(reference), *RUN,
                 f"train.steps={len(counts)}"]) == 0
    elastic = torch.load(run / CHECKPOINT, weights_only=True)
    assert elastic["step"] == len(counts)
    for key, value in model(reference).items():
        assert torch.equal(value, elastic["model"][key]), f"{key} differs from the in-process run"


# -- a partition ---------------------------------------------------------------------------------
def every_wait_says_its_bound(log: str) -> None:
    """Each wait the driver announced names its bound and the setting that sets it."""
    for line in [ln for ln in log.splitlines() if ln.lower().startswith("waiting")]:
        assert re.match(r"waiting up to \d+(\.\d+)? s \([a-z_.]+\) for ", line), line


@pytest.mark.slow
def test_an_elastic_run_goes_on_through_a_partition(nodes, tmp_path):
    """Node 2's cable is pulled for 30 s mid-run, then plugged in again. Worker 1 is lost and
    replaced. Mostly Ray has marked node 2 dead meanwhile (its raylet exits when it hears so):
    the replacement finds no room within dist.replace_timeout_s and the elastic run goes on
    with worker 0 alone; where node 2 outlived the partition, the replacement lands there.
    Either way the run ends with its result, no hang, and every wait it printed says its
    bound."""
    nodes.set_hosts(loopback=True)
    steps = 30
    run, log = tmp_path / "run", tmp_path / "driver.log"
    with log.open("w") as out:
        driver = nodes.popen(1, [sys.executable, "-m", "amfs_dist", "train", "--no-progress",
                                 "--out", str(run), *RUN, f"train.steps={steps}",
                                 "train.checkpoint_every=1", "dist.workers=2",
                                 "dist.min_workers=1", "dist.replace_timeout_s=5"],
                             stdout=out, stderr=subprocess.STDOUT)
    rows = run / "metrics.jsonl"
    workers = lambda: [json.loads(r)["workers"] for r in rows.read_text().splitlines()] \
        if rows.exists() else []
    try:
        wait_for("second step", lambda: len(workers()) >= 2, driver, log)
        nodes.link(2, up=False)
        cut_at = len(workers())
        time.sleep(30)
        nodes.link(2, up=True)
        assert driver.wait(300) == 0, log.read_text()[-3000:]
    finally:
        nodes.link(2, up=True)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.kill(2)  # its raylet may have exited (marked dead) or not: a fresh one either way
        nodes.start_ray(2)
        nodes.wait_for_ray(2)
    said = log.read_text()
    assert cut_at < steps and (run / RESULT).exists()
    last = json.loads(rows.read_text().splitlines()[-1])
    assert last["step"] == steps and last["worker_restarts"] >= 1  # worker 1 was lost
    counts = workers()
    assert counts[:2] == [2, 2] and set(counts) <= {1, 2}, counts
    if 1 in counts:  # no room for the replacement: the run went on without it
        assert "going on with 1 workers (dist.min_workers=1)" in said
    else:
        assert "shard worker 1's replacement placed after" in said
    every_wait_says_its_bound(said)


@pytest.mark.ray
@pytest.mark.parametrize("exchange", ["exact", "collective"])
def test_an_elastic_run_starts_with_the_workers_that_fit(ray_session, tmp_path, exchange):
    """3 workers of 1 CPU on a 2-CPU cluster, dist.min_workers=2: the run starts with two (the
    exact exchange once dist.replace_timeout_s has passed; Ray Train's elastic scaling at
    once), and logs it per step."""
    from amfs_dist import lifecycle
    from amfs_dist.config import load_config

    cfg = load_config(None, RUN + ["dist.workers=3", "dist.min_workers=2",
                                   "dist.replace_timeout_s=2", "dist.cpus_per_worker=1",
                                   f"dist.exchange={exchange}"])
    lifecycle.train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in rows] == [2, 2]


@pytest.mark.slow
def test_an_elastic_collective_run_loses_a_node_and_grows_back_on_ray_train(nodes, tmp_path):
    """dist.exchange=collective, dist.min_workers=1: node 2 is killed with its raylet, Ray Train
    restarts the group with rank 0 alone from the last checkpoint; node 2 is started again and
    Ray Train grows the group back to two ranks. Each step is logged once, and the parameters
    are bitwise those of an in-process run of as many steps (train.deterministic)."""
    nodes.set_hosts(loopback=True)
    run, log = tmp_path / "run", tmp_path / "driver.log"
    with log.open("w") as out:
        driver = nodes.popen(1, [sys.executable, "-m", "amfs_dist", "train", "--no-progress",
                                 "--out", str(run), *RUN, "train.steps=100000",
                                 "train.checkpoint_every=1", "dist.workers=2",
                                 "dist.exchange=collective", "dist.min_workers=1",
                                 "dist.replace_timeout_s=3"],
                             stdout=out, stderr=subprocess.STDOUT)
    rows = run / "metrics.jsonl"
    steps = lambda: [json.loads(r) for r in rows.read_text().splitlines()] if rows.exists() else []
    workers = lambda: [r["workers"] for r in steps()]
    try:
        wait_for("second step", lambda: len(workers()) >= 2, driver, log)
        nodes.kill(2)
        wait_for("a step with one rank", lambda: 1 in workers(), driver, log)
        nodes.start_ray(2)
        wait_for("two ranks again", lambda: workers()[-1] == 2 and 1 in workers(), driver, log)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(120) == 143, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if 2 not in nodes.procs:
            nodes.start_ray(2)
        nodes.wait_for_ray(2)
    assert [r["step"] for r in steps()] == list(range(1, len(steps()) + 1))
    counts = workers()  # step 2 may be recomputed by rank 0 alone (from the step-1 checkpoint)
    assert counts[0] == 2 and 1 in counts and counts[-1] == 2, (counts, log.read_text()[-5000:])
    assert "are recomputed: the workers restarted from their checkpoint" in log.read_text()
    reference = tmp_path / "in-process"
    assert amfs(["train", "--no-progress", "--out", str(reference), *RUN,
                 f"train.steps={len(counts)}"]) == 0
    elastic = torch.load(run / CHECKPOINT, weights_only=True)
    assert elastic["step"] == len(counts)
    for key, value in model(reference).items():
        assert torch.equal(value, elastic["model"][key]), f"{key} differs from the in-process run"


@pytest.mark.slow
def test_sigterm_while_ray_train_waits_for_a_lost_node_stops_within_seconds(nodes, tmp_path):
    """dist.exchange=collective, 2 ranks, not elastic: node 2 is killed with its raylet and
    Ray Train waits for room for 2 ranks, which never comes. SIGTERM then stops the run within
    seconds with the last checkpoint the ranks reported, and one line saying so."""
    nodes.set_hosts(loopback=True)
    run, log = tmp_path / "run", tmp_path / "driver.log"
    with log.open("w") as out:
        driver = nodes.popen(1, [sys.executable, "-m", "amfs_dist", "train", "--no-progress",
                                 "--out", str(run), *RUN, "train.steps=100000",
                                 "train.checkpoint_every=1", "dist.workers=2",
                                 "dist.exchange=collective"],
                             stdout=out, stderr=subprocess.STDOUT)
    rows = run / "metrics.jsonl"
    try:
        wait_for("second step", lambda: rows.exists() and len(rows.read_text().splitlines()) >= 2,
                 driver, log)
        nodes.kill(2)
        wait_for("the group's failure", lambda: "Training failed due to worker errors"
                 in log.read_text(), driver, log)
        time.sleep(12)  # no step under way for longer than the driver waits for one to end
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(60) == 143, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.start_ray(2)
        nodes.wait_for_ray(2)
    said = [ln for ln in log.read_text().splitlines() if ln.startswith("amfs: ")]
    step = torch.load(run / CHECKPOINT, weights_only=True)["step"]
    assert said == [f"amfs: stopped by SIGTERM at step {step} while waiting for workers; "
                    f"checkpoint saved: resume with `amfs train --resume {run}`"], said
    assert step >= 1  # the step-2 checkpoint may not have been reported before the kill
