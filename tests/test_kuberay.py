"""The KubeRay manifests in cluster/k8s against the KubeRay v1.7.0 CRD schemas (tests/kuberay),
strictly: like the API server, which prunes (and with `kubectl apply --validate=strict`
rejects) fields a schema does not list, an unknown field fails. Then the runs they describe
must add up: workers against GPU pods, the exchange across pods, start-or-continue."""
from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "cluster" / "k8s").glob("*.yaml"))
SCHEMAS = {"RayCluster": "raycluster", "RayJob": "rayjob"}
CORE_KINDS = {"PersistentVolumeClaim"}  # plain Kubernetes objects, no CRD to check against
IMAGE = "ghcr.io/OWNER/amfs-dist:0.1.0"


def strict(schema: dict) -> dict:
    """The schema with unknown fields forbidden wherever it lists an object's properties (and
    does not say x-kubernetes-preserve-unknown-fields), and int-or-string spelled out."""
    s = dict(schema)
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s and "type" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    return s


def validator(kind: str):
    path = ROOT / "tests" / "kuberay" / f"{SCHEMAS[kind]}-v1.7.0.schema.json.gz"
    return jsonschema.Draft7Validator(strict(json.loads(gzip.decompress(path.read_bytes()))))


def errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator(doc["kind"]).iter_errors(doc)]


def documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(doc: dict) -> list[dict]:
    spec = ray_cluster_spec(doc)
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in
                                                  spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        pods.append(doc["spec"]["submitterPodTemplate"])
    return [c for pod in pods for c in pod["spec"]["containers"]]


def gpu_pods(doc: dict, replicas: str = "maxReplicas") -> tuple[int, int]:
    """(GPU pods, GPUs in all) of the worker groups with `replicas` pods each (maxReplicas:
    what the cluster can grow to; minReplicas: what the autoscaler keeps)."""
    pods = gpus = 0
    for g in ray_cluster_spec(doc).get("workerGroupSpecs", []):
        per_pod = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                      for c in g["template"]["spec"]["containers"])
        if per_pod:
            pods, gpus = pods + g[replicas], gpus + g[replicas] * per_pod
    return pods, gpus


def overrides(command: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in shlex.split(command) if "=" in w and "://" not in w)


def amfs_train_commands(name: str, doc: dict) -> list[str]:
    """The `amfs train` commands a manifest runs: the RayJob entrypoint, or the usage comment."""
    if doc["kind"] == "RayJob":
        lines = [doc["spec"]["entrypoint"]]
    else:  # shell lines in the comment, with their backslash continuations joined
        text = (ROOT / "cluster" / "k8s" / name).read_text()
        comment = "\n".join(ln[1:].strip() for ln in text.splitlines() if ln.startswith("#"))
        lines = comment.replace("\\\n", " ").splitlines()
    return [re.split(r"`|\s#", ln[m.start():])[0] for ln in lines
            for m in re.finditer(r"amfs train(?= -)", ln)]


def test_every_manifest_is_a_kind_we_can_check():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml",
                                           "rayjob-elastic.yaml", "prepare-data.yaml",
                                           "pvc.yaml"}
    kinds = [d["kind"] for _, d in documents()]
    assert set(kinds) <= set(SCHEMAS) | CORE_KINDS, kinds
    assert {"RayCluster", "RayJob"} <= set(kinds)


@pytest.mark.parametrize("name, doc", [nd for nd in documents() if nd[1]["kind"] in SCHEMAS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_against_the_kuberay_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    assert errors(doc) == []
    assert {c["image"] for c in containers(doc)} == {IMAGE}  # one image name everywhere


def test_an_elastic_manifest_scales_within_bounds_the_autoscaler_publishes():
    """rayjob-elastic.yaml: the autoscaler on, in its v2 (which publishes the node types that
    `amfs train` checks dist.workers against), a GPU group of minReplicas < maxReplicas, and an
    elastic run (dist.min_workers < dist.workers) on it."""
    doc = next(d for n, d in documents() if n == "rayjob-elastic.yaml")
    spec = ray_cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if gpu_pods({"kind": "RayCluster", "spec": {
        "workerGroupSpecs": [g]}})[0]]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    (command,) = amfs_train_commands("rayjob-elastic.yaml", doc)
    o = overrides(command)
    assert 0 < int(o["dist.min_workers"]) < int(o["dist.workers"])


@pytest.mark.parametrize("break_it, expect", [
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=4),
     "'replica' was unexpected"),  # a typo: the API server would drop it silently
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="four"),
     "'four' is not of type 'integer'"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(imagePullPolice="Always"), "'imagePullPolice' was unexpected"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
     .update({"num-cpus": 0}), "0 is not of type 'string'"),
    (lambda d: d["spec"].update(backoffLimit="3"), "'3' is not of type 'integer'"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0]["resources"]["limits"].update(cpu=[8]), "is not valid under any"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"),
     "'maxReplicas' is a required property"),
    (lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling="true"),
     "'true' is not of type 'boolean'"),
    (lambda d: d["spec"]["rayClusterSpec"].update(autoscalerOptions={"version": "v3"}),
     "'v3' is not one of ['v1', 'v2']"),
    (lambda d: d["spec"]["rayClusterSpec"].update(autoscalerOptions={"idleTimeout": 60}),
     "'idleTimeout' was unexpected"),
])
def test_a_broken_manifest_fails(break_it, expect):
    doc = copy.deepcopy(next(d for n, d in documents() if n == "rayjob.yaml"))
    assert errors(doc) == []
    break_it(doc)
    found = errors(doc)
    assert any(expect in e for e in found), found


@pytest.mark.parametrize("name, doc", [nd for nd in documents() if nd[1]["kind"] in SCHEMAS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_the_runs_a_manifest_describes_add_up(name, doc):
    spec = ray_cluster_spec(doc)
    for g in spec.get("workerGroupSpecs", []):  # replica bounds act only with the autoscaler
        if not spec.get("enableInTreeAutoscaling"):
            assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], g["groupName"]
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    pods, gpus = gpu_pods(doc)
    _, kept_gpus = gpu_pods(doc, "minReplicas")
    commands = amfs_train_commands(name, doc)
    if name in ("raycluster.yaml", "rayjob.yaml", "rayjob-elastic.yaml"):
        assert commands, f"{name}: no `amfs train` command found"
    for command in commands:
        o = overrides(command)
        workers, per_worker = int(o.get("dist.workers", 0)), float(o.get("dist.gpus_per_worker", 0))
        assert workers * per_worker <= gpus, f"{name}: {command!r} asks for more GPUs than {gpus}"
        fewest = int(o.get("dist.min_workers", 0)) or workers
        if kept_gpus < gpus:  # the autoscaler may take GPU pods away: the run must go on
            assert fewest < workers, f"{name}: {command!r} is not elastic (dist.min_workers)"
            assert fewest * per_worker <= kept_gpus, f"{name}: minReplicas cannot hold {command!r}"
            assert o.get("dist.exchange", "exact") in ("exact", "sketch"), command
        if pods > 1 and workers > 1:  # gradients cross pods: the README's advice
            assert o.get("dist.exchange") == "sketch", f"{name}: {command!r}"
        words = shlex.split(command)
        assert "--resume-if-exists" in words, f"{name}: not start-or-continue: {command!r}"
        out = words[words.index("--out") + 1]
        assert out.startswith("/runs/") or "://" in out, out  # shared storage, absolute
        source = o.get("data.source", "synthetic")
        if source.startswith("/"):  # a store on the PVC: some manifest prepares it
            prepared = [d["spec"]["entrypoint"] for _, d in documents()
                        if d["kind"] == "RayJob" and "amfs data prepare" in d["spec"]["entrypoint"]]
            assert any(f"--out {source}" in e for e in prepared), source
