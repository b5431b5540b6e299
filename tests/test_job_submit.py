"""`ray job submit` against a real `ray start --head` cluster (cluster/README.md).

The cluster is this test's own: its own temp dir (so no other `ray.init()` on the machine finds
it), free ports, every server on 127.0.0.1 (Ray's single-machine mode: `ray start` alone turns
--node-ip-address=127.0.0.1 into the machine's outward address) and RAY_AUTH_MODE=disabled in
its environment and the client's.
It runs as `ray start --block` in a new session; teardown stops that process, then ends the
processes of that session that are left, by pid (`ray stop` would stop every Ray cluster on
the machine, the test session's own included).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from helpers import assert_whole_queries, is_loopback, listening_sockets, session_pids

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_ray_job_submit_runs_amfs_train_on_workers(head_node, tmp_path):
    ray_bin, address, env, head = head_node
    run = tmp_path / "run"  # on a multi-node cluster: shared storage (cluster/README.md)
    amfs = shutil.which("amfs", path=env["PATH"])
    entry = [amfs] if amfs else [sys.executable, "-m", "amfs_dist"]
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           *entry, "train", "--no-progress", "--out", str(run), *TINY, "train.steps=3",
           "dist.workers=2", "dist.cpus_per_worker=0.5"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out
    # the job's own output streamed back: the JSON line `amfs train` prints at the end
    streamed = [json.loads(line[line.index("{"):]) for line in out.splitlines()
                if '"test_accuracy"' in line and "{" in line]
    assert streamed and streamed[-1]["meta_steps"] == 3
    result = json.loads((run / "result.json").read_text())
    assert result["meta_steps"] == 3 and streamed[-1] == result
    assert_whole_queries(result["test_accuracy"], episodes=6, ways=3, queries=2)  # TINY's eval
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["exchange_bytes"] > 0 for r in rows)  # ran on workers
    # the head's servers (GCS, raylet, dashboard, agents, job supervisor) listen on loopback only
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip()
             for pid in session_pids(head.pid) if Path(f"/proc/{pid}").exists()}
    sockets = listening_sockets(names)
    assert {"gcs_server", "raylet"} <= {names[p] for p, _, _ in sockets}
    assert all(is_loopback(a) for _, a, _ in sockets), sockets


# -- cluster/ manifests and scripts -------------------------------------------------------------
def test_kuberay_manifests_parse_and_share_the_runs_volume():
    import yaml

    docs = {}
    for path in sorted((REPO / "cluster" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    assert {"PersistentVolumeClaim", "RayCluster", "RayJob"} <= set(docs)
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    job = docs["RayJob"]["spec"]
    assert "amfs train" in job["entrypoint"] and "--out /runs/" in job["entrypoint"]
    for spec in (docs["RayCluster"]["spec"], job["rayClusterSpec"]):
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for group in groups:
            pod = group["template"]["spec"]
            assert claim in [v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]]
            for c in pod["containers"]:
                assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in c["env"]
                assert any(m["mountPath"] == "/runs" for m in c["volumeMounts"])
        assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                   for g in spec["workerGroupSpecs"])
    submitter = job["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in submitter["env"]


def test_slurm_script_is_valid_bash():
    script = REPO / "cluster" / "slurm" / "amfs-ray.sbatch"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "RAY_AUTH_MODE" in text and 'amfs "$@"' in text
    # site-neutral: nodes, CPUs and GPUs come from sbatch's command line, never from the script
    directives = re.findall(r"^#SBATCH\s+(--[\w-]+)", text, re.M)
    assert not {"--nodes", "--gpus-per-node", "--gres", "--cpus-per-task", "--mem"} & set(directives)
    assert {"--requeue", "--signal"} <= set(directives) and "#SBATCH --signal=B:USR1@" in text
    code = re.sub(r"#.*", "", text)
    assert "hostname --ip-address" not in code  # 127.0.x.1 where /etc/hosts says so (Debian)
    assert "ray stop" not in code  # it would end every Ray on the node
