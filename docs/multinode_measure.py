"""The multi-node figures of docs/scaling.md, on namespace nodes of one machine (as root):

    python docs/multinode_measure.py

1. the collective exchange's step time at dist.workers=2: both workers on one node, then one
   on each of two nodes (median step_s of metrics.jsonl, the first step left out);
2. a node lost with its raylet: with a spare node, the time from the kill to the next step
   written to metrics.jsonl (the lost worker replaced on the spare node).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import netns  # noqa: E402
from conftest import TINY  # noqa: E402

STEPS = 30
TRAIN = [sys.executable, "-m", "amfs_dist", "train", "--no-progress", *TINY]


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_time(layout: list[int], out: Path) -> float:
    nodes = netns.Nodes(len(layout))
    try:
        for i, cpus in enumerate(layout, 1):
            nodes.start_ray(i, cpus=cpus)
        nodes.wait_for_ray(len(layout))
        done = nodes.run(1, [*TRAIN, "--out", str(out), f"train.steps={STEPS}",
                             "dist.workers=2", "dist.exchange=collective",
                             "dist.block_size=512"], timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return statistics.median(r["step_s"] for r in rows(out)[1:])
    finally:
        nodes.remove()


def worker_nodes(nodes: netns.Nodes) -> list[int]:
    found = []
    for i in range(2, nodes.count + 1):
        for pid in nodes.pids(i):
            try:
                if Path(f"/proc/{pid}/comm").read_text().startswith("ray::ShardWork"):
                    found.append(i)
                    break
            except OSError:
                pass
    return found


def lost_node_to_next_step(out: Path) -> float:
    nodes = netns.Nodes(3)
    driver = None
    try:
        for i in (1, 2, 3):
            nodes.start_ray(i)
        nodes.wait_for_ray(3)
        driver = nodes.popen(1, [*TRAIN, "--out", str(out), "train.steps=100000",
                                 "dist.workers=2"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        while len(rows(out)) < 3:
            assert driver.poll() is None, "the run ended"
            time.sleep(0.2)
        victim = worker_nodes(nodes)[0]
        before = len(rows(out))
        t0 = time.monotonic()
        nodes.kill(victim)
        while len(rows(out)) <= before:
            assert driver.poll() is None, "the run ended"
            time.sleep(0.05)
        return time.monotonic() - t0
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.remove()


if __name__ == "__main__":
    why = netns.unavailable()
    if why:
        sys.exit(f"no namespace nodes here: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        one = step_time([2], Path(tmp) / "one")
        two = step_time([1, 1], Path(tmp) / "two")
        print(json.dumps({"collective_step_s_one_node": round(one, 4),
                          "collective_step_s_two_nodes": round(two, 4)}), flush=True)
        print(json.dumps({"lost_node_to_next_step_s":
                          round(lost_node_to_next_step(Path(tmp) / "lost"), 2)}))
