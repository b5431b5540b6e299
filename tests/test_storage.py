"""Run directories and data stores on object storage, against a real S3 HTTP server (moto)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from amfs_dist.cli import main
from amfs_dist.data.episodes import ImageSet
from amfs_dist.data.store import write_store
from amfs_dist.train import CHECKPOINT
from conftest import BUCKET, ctrl_c_at_step

pafs = pytest.importorskip("pyarrow.fs")

def _files(fs, prefix: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(f"{BUCKET}/{path}") as f:
        return f.read()


@pytest.mark.slow
def test_train_resume_and_eval_with_the_run_on_s3(s3, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local folder named "s3:" would appear here
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/runs/a"
    args = [*tiny, "train.steps=4", "train.checkpoint_every=2"]
    with ctrl_c_at_step(3):
        assert main(["train", "--out", uri, "--no-progress", *args]) == 130
    assert f"amfs train --resume {uri}" in capsys.readouterr().err
    assert set(_files(s3, "runs/a")) == {"amfs-run.json", "config.yaml", "metrics.jsonl",
                                         CHECKPOINT}
    ckpt = torch.load(io.BytesIO(_read(s3, f"runs/a/{CHECKPOINT}")),
                      weights_only=True)
    assert ckpt["step"] == 3
    assert main(["status", uri]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["run"] == uri and status["step"] == 3 and status["finished"] is False
    assert 0 <= status["checkpoint_age_s"] < 300

    assert main(["train", "--resume", uri, "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meta_steps"] == 4
    assert set(_files(s3, "runs/a")) == {"amfs-run.json", "config.yaml", "metrics.jsonl",
                                         CHECKPOINT, "model.pt", "result.json"}
    assert json.loads(_read(s3, "runs/a/result.json")) == result
    rows = [json.loads(line) for line in _read(s3, "runs/a/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("s3*")) and os.listdir(tmp_path) == ["cache"]
    assert os.listdir(tmp_path / "cache" / "staging") == []  # local copies are removed

    # the same parameters as one uninterrupted local run
    straight = tmp_path / "straight"
    assert main(["train", "--out", str(straight), "--no-progress", *args]) == 0
    capsys.readouterr()
    remote_model = torch.load(io.BytesIO(_read(s3, "runs/a/model.pt")),
                              weights_only=True)["model"]
    for name, value in torch.load(straight / "model.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(remote_model[name], value, rtol=0, atol=0)

    # start-or-continue on the finished run only reports it
    assert main(["train", "--out", uri, "--resume-if-exists", "--no-progress", *args]) == 0
    assert json.loads(capsys.readouterr().out) == result

    assert main(["eval", uri, "--episodes", "3"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["run"] == uri and evaluated["test_episodes"] == 3


def test_a_store_on_s3_is_a_data_source(s3, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 4)
    data = ImageSet(images=rng.integers(0, 256, (len(labels), 1, 16, 16), dtype=np.uint8),
                    labels=labels, class_names=[f"c{i}" for i in range(12)],
                    splits={"train": np.arange(6), "val": np.arange(6, 9),
                            "test": np.arange(9, 12)}, groups=[""] * 12)
    write_store(tmp_path / "store", data, source="unit", split_name="fixed")
    pafs.copy_files(str(tmp_path / "store"), f"{BUCKET}/stores/unit", destination_filesystem=s3)
    uri = f"s3://{BUCKET}/stores/unit"
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=1",
                 f"data.source={uri}"]) == 0
    assert json.loads(capsys.readouterr().out)["data_source"] == uri
    cached = list((tmp_path / "cache" / "stores").iterdir())
    assert len(cached) == 1 and sorted(os.listdir(cached[0])) == ["data.arrow", "manifest.json"]
    assert (cached[0] / "data.arrow").read_bytes() == (tmp_path / "store/data.arrow").read_bytes()
    stamp = (cached[0] / "data.arrow").stat().st_mtime_ns
    assert main(["eval", str(run), "--episodes", "3"]) == 0  # the cached copy, not downloaded again
    assert (cached[0] / "data.arrow").stat().st_mtime_ns == stamp
    assert main(["train", "--out", str(tmp_path / "r2"), *tiny,
                 f"data.source=s3://{BUCKET}/stores/none"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_a_bucket_that_cannot_be_written_fails_before_training(s3, tiny, tmp_path, capsys,
                                                               monkeypatch):
    """The first upload used to come only after train.checkpoint_every steps."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    uri = "s3://nobucket/run"
    assert main(["train", "--out", uri, "--no-progress", *tiny, "train.steps=2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "not writable" in lines[0], lines
    assert os.listdir(tmp_path / "cache" / "staging") == []


@pytest.mark.slow
def test_a_killed_runs_staging_copy_is_reused_and_removed(s3, tiny, tmp_path):
    """SIGKILL leaves the local copy of an s3:// run; continuing the run takes it over."""
    uri = f"s3://{BUCKET}/runs/killed"
    env = {**os.environ, "AMFS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    train = [sys.executable, "-m", "amfs_dist", "train", "--out", uri, "--no-progress", *tiny,
             "train.checkpoint_every=1", "train.steps=100000"]
    proc = subprocess.Popen(train, env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while CHECKPOINT not in _files(s3, "runs/killed") and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert len(os.listdir(tmp_path / "cache" / "staging")) == 2  # the copy and its lock file
    done = subprocess.run([sys.executable, "-m", "amfs_dist", "train", "--resume", uri,
                           "--no-progress", "train.steps=1"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr  # train.steps=1: it finishes at once
    assert json.loads(done.stdout)["meta_steps"] >= 1
    assert os.listdir(tmp_path / "cache" / "staging") == []


def test_a_local_copy_whose_upload_failed_is_uploaded_when_the_run_continues(s3, tiny,
                                                                             tmp_path, capsys,
                                                                             monkeypatch):
    """The copy an upload failure left (the error named it) holds what the URI lacks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/runs/unsynced"
    with ctrl_c_at_step(1):
        assert main(["train", "--out", str(tmp_path / "local"), "--no-progress", *tiny,
                     "train.steps=2"]) == 130
    copy = tmp_path / "cache" / "staging" / hashlib.sha256(uri.encode()).hexdigest()[:12]
    shutil.copytree(tmp_path / "local", copy)
    (copy / ".unsynced").touch()
    capsys.readouterr()
    assert main(["train", "--resume", uri, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["meta_steps"] == 2
    assert {"result.json", "model.pt", CHECKPOINT} <= set(_files(s3, "runs/unsynced"))
    assert os.listdir(tmp_path / "cache" / "staging") == []


def test_read_copies_a_killed_command_left_are_removed_after_a_day(s3, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    staging = tmp_path / "cache" / "staging"
    old, recent, training = staging / "0123456789ab-x1", staging / "0123456789ab-x2", \
        staging / "0123456789ab"
    for folder in (old, recent, training):
        folder.mkdir(parents=True)
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    os.utime(training, (time.time() - 2 * 86400,) * 2)
    assert main(["status", f"s3://{BUCKET}/runs/none"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert sorted(os.listdir(staging)) == [training.name, recent.name]


@pytest.mark.parametrize("uri", ["ftp://host/run", "s4://bucket/run"])
def test_an_unknown_scheme_is_one_line_and_exit_2(uri, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--out", uri, "--no-progress", *tiny]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unsupported storage scheme" in err and uri in err
    assert main(["train", "--out", str(tmp_path / "r"), *tiny, f"data.source={uri}"]) == 2
    assert "unsupported storage scheme" in capsys.readouterr().err
    assert os.listdir(tmp_path) in ([], ["cache"]) and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_sweep_on_s3(s3, tmp_path, capsys, monkeypatch):
    """`amfs tune --out s3://...`: Tune's experiment and the results go to the bucket. A
    subprocess with its own local Ray, so that its trials inherit the S3 environment."""
    from amfs_dist.config import dump_yaml
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(dump_yaml({
        "base": {"data.image_size": 16, "data.ways": 3, "data.queries": 2, "model.width": 8,
                 "train.meta_batch": 2, "train.steps": 2, "train.val_every": 2,
                 "train.val_episodes": 2, "eval.queries": 2, "eval.batch": 3,
                 "train.device": "cpu"},
        "search": {"kernel.lam": {"loguniform": [0.01, 1.0]}},
        "sweep": {"name": "s3", "num_samples": 2, "max_concurrent_trials": 1, "seed": 0,
                  "scheduler": "fifo", "test_episodes": 3}}))
    uri = f"s3://{BUCKET}/sweeps/a"
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "amfs_dist", "tune", "--config", str(sweep),
                           "--out", uri, "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("best of 2 trials")
    # the summary names the bucket, not the local copy it was written in (removed by now)
    assert proc.stdout.strip().splitlines()[-1].endswith(f"config: {uri}/best.yaml")
    files = _files(s3, "sweeps/a")
    assert {"sweep.yaml", "result.json", "trials.csv", "best.yaml"} <= set(files)
    assert {"model.pt", "result.json", "checkpoint.pt"} <= set(_files(s3, "sweeps/a/best-run"))
    trials = [i for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/a/tune"))
              if i.base_name.startswith("trial_")]
    assert len(trials) == 2
    result = json.loads(_read(s3, "sweeps/a/result.json"))
    assert result["trials"] == 2 and result["test"]["meta_steps"] == 2
    assert result["best_config"] == f"{uri}/best.yaml" and result["out"] == uri
    assert sorted(os.listdir(tmp_path)) == ["sweep.yaml"]  # nothing local, no "s3:" folder
    # --resume reads sweep.yaml and Tune's state from the bucket (a finished sweep: no new trial)
    proc = subprocess.run([sys.executable, "-m", "amfs_dist", "tune", "--resume", uri,
                           "--allow-pickle", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("best of 2 trials")
    assert json.loads(_read(s3, "sweeps/a/result.json"))["best_trial"] == result["best_trial"]

    assert main(["tune", "--config", str(sweep), "--out", uri, "--quiet"]) == 2
    assert f"--out {uri}: holds a sweep already" in capsys.readouterr().err
    assert main(["eval", f"{uri}/best-run", "--episodes", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["test_episodes"] == 3


def test_gs_uris_map_to_pyarrow_gcs():  # s3:// has the moto tests; GCS has no local server
    from amfs_dist.storage import filesystem
    fs, path = filesystem("gs://bucket/runs/a/")  # no I/O yet
    assert fs.type_name == "gcs" and path == "bucket/runs/a"
    # a GCS that cannot be reached is retried for seconds, not pyarrow's default 15 minutes
    _, (options,) = fs.__reduce__()
    assert options["retry_time_limit"].total_seconds() == 10
