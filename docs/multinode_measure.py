"""The multi-node figures of docs/scaling.md, on namespace nodes of one machine (as root):

    python docs/multinode_measure.py [PART ...]    # all parts, or those named

1. `collective`: the collective exchange's step time at dist.workers=2: both workers on one
   node, then one on each of two nodes (median step_s of metrics.jsonl, the first step left
   out);
2. `spare`: a node lost with its raylet: with a spare node, the time from the kill to the
   next step written to metrics.jsonl (the lost worker replaced on the spare node);
3. `elastic`: the same without a spare node, dist.min_workers=1: the time from the kill to
   the next step (the replacement's bounded wait, then the step recomputed by worker 0);
4. `partition`: node 2's link cut for 30 s, dist.min_workers=1: the time from the cut to the
   next step.

The elastic parts also say how many steps were started again (the driver's "going on with
N workers" lines) and check that no step was written twice (no checkpoint is reloaded).
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


def elastic_fault_to_next_step(out: Path, fault: str) -> dict:
    """Two nodes, dist.workers=2, dist.min_workers=1, no spare node: node 2 killed with its
    raylet (fault="kill") or its link cut for 30 s (fault="partition") after step 3."""
    nodes = netns.Nodes(2)
    driver = None
    try:
        for i in (1, 2):
            nodes.start_ray(i)
        nodes.wait_for_ray(2)
        log = out.with_suffix(".log")
        with log.open("w") as said:
            driver = nodes.popen(1, [*TRAIN, "--out", str(out), "train.steps=100000",
                                     "train.deterministic=true", "dist.workers=2",
                                     "dist.min_workers=1", "dist.replace_timeout_s=5"],
                                 stdout=subprocess.DEVNULL, stderr=said)
        while len(rows(out)) < 3:
            assert driver.poll() is None, "the run ended"
            time.sleep(0.05)
        before = len(rows(out))
        t0 = time.monotonic()
        if fault == "kill":
            nodes.kill(2)
        else:
            nodes.link(2, up=False)
        restored = False
        while len(rows(out)) <= before:
            assert driver.poll() is None, "the run ended"
            if fault == "partition" and not restored and time.monotonic() - t0 >= 30:
                nodes.link(2, up=True)
                restored = True
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        after = rows(out)
        assert [r["step"] for r in after] == list(range(1, len(after) + 1))  # none re-logged
        # each "going on with" is a step started again by the workers left
        return {f"elastic_{fault}_to_next_step_s": round(seconds, 2),
                "workers_after": after[before]["workers"],
                "steps_recomputed": log.read_text().count("going on with")}
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.remove()


if __name__ == "__main__":
    why = netns.unavailable()
    if why:
        sys.exit(f"no namespace nodes here: {why}")
    parts = sys.argv[1:] or ["collective", "spare", "elastic", "partition"]
    with tempfile.TemporaryDirectory() as tmp:
        if "collective" in parts:
            one = step_time([2], Path(tmp) / "one")
            two = step_time([1, 1], Path(tmp) / "two")
            print(json.dumps({"collective_step_s_one_node": round(one, 4),
                              "collective_step_s_two_nodes": round(two, 4)}), flush=True)
        if "spare" in parts:
            print(json.dumps({"lost_node_to_next_step_s":
                              round(lost_node_to_next_step(Path(tmp) / "lost"), 2)}), flush=True)
        for fault in ("elastic", "partition"):
            if fault in parts:
                print(json.dumps(elastic_fault_to_next_step(
                    Path(tmp) / fault, "kill" if fault == "elastic" else fault)), flush=True)
