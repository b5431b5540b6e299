"""`amfs tune`: sweep-file validation, an end-to-end sweep with ASHA, the best config through
`amfs train`, and an interrupted sweep resumed from its trials' checkpoints."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from amfs_dist.cli import main as amfs
from amfs_dist.config import PACKAGE_DIR, load_config
from amfs_dist.tune.space import load_sweep
from conftest import PickleThatWritesAFile
from helpers import GOOD, TEST_BASE, TEST_SEARCH, assert_whole_queries, read_csv_rows, write_sweep

REPO = Path(__file__).resolve().parent.parent
TUNING = PACKAGE_DIR / "tuning"  # the sweep files shipped with the package

# bandwidth 1e-3 on unit-norm features: K = I and K_q = 0, so every query gets the same logits
# and the accuracy is exactly chance (1/3) at every validation, below any learning trial
BAD = {"kernel.bandwidth": 0.001, "kernel.lam": 0.1, "kernel.mu": 0.05, "kernel.gamma": 0.01}


# -- the sweep file ------------------------------------------------------------------------------
def test_ready_sweeps_parse_and_tiny_cpu_is_the_default():
    tiny = load_sweep(TUNING / "tiny-cpu.yaml")
    assert tiny.to_yaml_dict() == load_sweep(None).to_yaml_dict()
    assert set(tiny.search) >= {"kernel.bandwidth", "kernel.lam", "kernel.mu", "kernel.gamma"}
    assert tiny.settings.num_samples >= 4 and tiny.settings.max_concurrent_trials == 2
    assert tiny.search["kernel.bandwidth"].log and tiny.search["kernel.lam"].log
    assert tiny.search["kernel.mu"].low == 0.0 and tiny.search["kernel.gamma"].low == 0.0
    for name in ("omniglot-gpu.yaml", "mini-imagenet-gpu.yaml"):
        spec = load_sweep(TUNING / name, check_paths=False)
        d = spec.base.dist
        assert d.workers >= 1 and d.gpus_per_worker > 0
        bundles = spec.bundles()
        assert len(bundles) == 1 + d.workers
        assert all(b.get("GPU") == d.gpus_per_worker for b in bundles[1:])
        assert Path(spec.base.data.source).is_absolute()
    assert load_sweep(None).settings.name == "tiny-cpu"
    assert load_sweep("tiny-cpu").to_yaml_dict() == tiny.to_yaml_dict()  # a shipped name


def test_overrides_route_to_settings_search_and_base():
    spec = load_sweep(TUNING / "tiny-cpu.yaml", [
        "sweep.num_samples=3", "search.train.lr={loguniform: [0.0001, 0.01]}",
        "kernel.gamma=0.02", "model.width=8", "search.model.backbone=[conv4, resnet12]"])
    assert spec.settings.num_samples == 3
    assert spec.search["train.lr"].kind == "loguniform"
    assert spec.search["model.backbone"].choices == ("conv4", "resnet12")
    assert "kernel.gamma" not in spec.search  # fixed by the override
    assert spec.base["kernel.gamma"] == 0.02 and spec.base["model.width"] == 8
    space = spec.param_space()
    assert space["kernel.gamma"] == 0.02 and space["data.ways"] == 5


def test_bundles_hold_the_driver_and_each_worker():
    spec = load_sweep(None, ["dist.workers=3", "dist.gpus_per_worker=0.5",
                             "dist.cpus_per_worker=2", "sweep.trial_cpus=1"])
    assert spec.bundles() == [{"CPU": 1.0}] + [{"CPU": 2.0, "GPU": 0.5}] * 3
    from ray import tune

    from amfs_dist.tune.sweep import make_trainable
    pgf = tune.PlacementGroupFactory(spec.bundles(), strategy="PACK")
    assert pgf.required_resources == {"CPU": 7.0, "GPU": 1.5}
    assert make_trainable(spec) is not None


def test_integer_ranges_include_both_ends():
    spec = load_sweep(None, ["search.maml.steps={randint: [1, 3]}"])
    dom = spec.search["maml.steps"].to_tune()
    assert {dom.sample() for _ in range(200)} == {1, 2, 3}


BAD_SPACES = [
    ("search.kernel.foo={uniform: [0, 1]}", "search.kernel.foo", "unknown config key"),
    ("search.kernel.mu={uniform: [0.5, 0.1]}", "search.kernel.mu", "low must be below high"),
    ("search.kernel.lam={loguniform: [0, 1]}", "search.kernel.lam", "bounds > 0"),
    ("search.kernel.bandwidth={loguniform: [-1, 2]}", "search.kernel.bandwidth", "bounds > 0"),
    ("search.kernel.gamma={normal: [0, 1]}", "search.kernel.gamma", "unknown distribution"),
    ("search.kernel.mu={uniform: [-0.1, 0.1]}", "search.kernel.mu", "must be >= 0"),
    ("search.model.width={uniform: [8, 16]}", "search.model.width", "integer"),
    ("search.dist.workers=[1, 2]", "search.dist.workers", "cannot be swept"),
    ("search.kernel.lam=0.5", "search.kernel.lam", "one distribution"),
    ("sweep.num_smaples=4", "sweep.num_smaples", "unknown sweep setting"),
    ("sweep.grace_period=9", "sweep.grace_period", "validations"),
    ("kernel.lamda=0.5", "kernel.lamda", "unknown config key"),
    ("sweep.trial_gpus=-0.5", "sweep.trial_gpus", "must be >= 0"),
    ("sweep.trial_cpus=.nan", "sweep.trial_cpus", "finite"),
    ("sweep.trial_gpus=1e6", "sweep.trial_gpus", "<= 64"),
    ("sweep.name=../../elsewhere", "sweep.name", "letters, digits"),
    ("dist.gpus_per_worker=-0.5", "dist.gpus_per_worker", "must be >= 0"),
    ("data.source=" + "x" * 5000, "data.source", "not a usable path (File name too long)"),
    ('data.source="a\\0b"', "data.source", "no prepared store at 'a\\x00b'"),
]


@pytest.mark.parametrize("override,key,why", BAD_SPACES)
def test_bad_search_space_is_one_line_naming_the_key(override, key, why, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = amfs(["tune", "--config", str(TUNING / "tiny-cpu.yaml"), "--out", str(out), override])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"amfs: error: {key}:") and why in err, err
    assert not out.exists()  # nothing started


def test_bad_sweep_file_errors_name_the_key(tmp_path, capsys):
    f = write_sweep(tmp_path / "s.yaml", search={"kernel": {"lam": {"loguniform": [1.0, 0.1]}}})
    assert amfs(["tune", "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "search.kernel.lam: low must be below high" in capsys.readouterr().err
    f = write_sweep(tmp_path / "s.yaml", points_to_evaluate=[{"kernel.bandwidth": 9.0}])
    assert amfs(["tune", "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "sweep.points_to_evaluate[0].kernel.bandwidth: 9.0 is outside" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text("base: {}\nsearch: {kernel.lam: {loguniform: [0.1, 1]}}\n"
                                     "kernel.mu: 0.1\n")
    assert amfs(["tune", "--config", str(tmp_path / "t.yaml")]) == 2
    assert "kernel.mu: unknown section" in capsys.readouterr().err
    assert amfs(["tune", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_resume_loads_tunes_pickled_state_only_with_allow_pickle(tmp_path, capsys):
    import pickle

    out = tmp_path / "sweep"
    (out / "tune").mkdir(parents=True)
    load_sweep(None).save(out / "sweep.yaml")
    ran = tmp_path / "code-ran"
    for name in ("tuner.pkl", "trainable.pkl"):
        (out / "tune" / name).write_bytes(pickle.dumps(PickleThatWritesAFile(ran)))
    assert amfs(["tune", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"amfs: error: --resume {out}:") and "--allow-pickle" in err, err
    assert not ran.exists()  # nothing was unpickled (and Ray never started)
    assert amfs(["tune", "--allow-pickle"]) == 2
    assert "--allow-pickle goes with --resume or --resume-if-exists" in capsys.readouterr().err


# -- sweeps (Ray) ----------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_sweep_end_to_end_asha_stops_and_best_config_trains(ray_session, tmp_path, capsys):
    # 4 trials, one at a time (2 at a time is in the resume test) so that ASHA's decisions do
    # not depend on timing; the first three are fixed: a learning config, then two at chance,
    # which are below the learning one at the first rung: ASHA stops both there.
    f = write_sweep(tmp_path / "sweep.yaml", points_to_evaluate=[GOOD, BAD, BAD],
                    max_concurrent_trials=1)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert amfs(["tune", "--config", str(f), "--out", str(out), "--quiet"]) == 0
    wall = time.perf_counter() - t0
    summary_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary_line.startswith("best of 4 trials") and "val_accuracy=" in summary_line

    rows = read_csv_rows(out / "trials.csv")
    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, rows
    assert all(int(r["reports"]) < 4 and int(r["step"]) < 8 for r in stopped)
    chance = [r for r in rows if float(r["kernel.bandwidth"]) == 0.001]
    assert len(chance) == 2 and all(abs(float(r["val_accuracy"]) - 1 / 3) < 1e-6 for r in chance)
    assert all(r["status"] == "stopped" and r["reports"] == "1" for r in chance), rows
    for r in rows:  # every sampled value is inside its range
        assert 0.001 <= float(r["kernel.bandwidth"]) <= 3.0
        assert 0.01 <= float(r["kernel.lam"]) <= 1.0
        assert 0.0 <= float(r["kernel.mu"]) <= 0.1 and 0.0 <= float(r["kernel.gamma"]) <= 0.05

    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert [t["trial"] for t in table] == [r["trial"] for r in rows]
    assert "| trial | status |" in (out / "trials.md").read_text()
    assert (out / "metric_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = rows[0]  # best first: a completed trial with the highest final accuracy
    assert best["status"] == "completed" and int(best["step"]) == 8
    completed = [float(r["val_accuracy"]) for r in rows if r["status"] == "completed"]
    assert float(best["val_accuracy"]) == max(completed) > 1 / 3

    result = json.loads((out / "result.json").read_text())
    assert result["best_trial"] == best["trial"]
    assert result["test"]["test_episodes"] == 6
    best_cfg = load_config(out / "best-run" / "config.yaml")
    assert_whole_queries(result["test"]["test_accuracy"], 6, best_cfg.data.ways,
                         best_cfg.eval.queries)
    assert result["test"]["meta_steps"] == 8 and result["stopped"] == len(stopped)
    assert json.loads((out / "best-run" / "result.json").read_text()) == result["test"]
    steps = [json.loads(ln)["step"] for ln in (out / "best-run" / "metrics.jsonl").open()]
    assert steps == list(range(1, 9))

    # best.yaml is a full amfs config holding the best trial's values ...
    cfg = load_config(out / "best.yaml")
    for key in TEST_SEARCH:
        assert cfg[key] == pytest.approx(float(best[key]), rel=1e-3)
    for key, value in TEST_BASE.items():
        assert cfg[key] == value
    # ... that `amfs train --config` takes as it is
    run = tmp_path / "retrain"
    assert amfs(["train", "--config", str(out / "best.yaml"), "--out", str(run), "--no-progress",
                 "train.steps=2", "eval.episodes=3"]) == 0
    assert json.loads((run / "result.json").read_text())["meta_steps"] == 2
    # and `amfs eval` reads the best trial's run dir
    assert amfs(["eval", str(out / "best-run"), "--episodes", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_episodes"] == 3
    print(f"sweep wall {wall:.1f}s")


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_trials_from_their_checkpoints(ray_session, tmp_path, capsys):
    # two trials of 40 steps (20 validations), no early stopping; the sweep is interrupted (by
    # the signal handler Tune installs for Ctrl+C) once a trial has written its second
    # checkpoint: a trial's report waits for Tune to take the previous one, so Tune's saved
    # state then knows a checkpoint of that trial to resume from
    f = write_sweep(tmp_path / "sweep.yaml", base={"train.steps": 40}, num_samples=2,
                    scheduler="fifo", points_to_evaluate=[GOOD])
    out = tmp_path / "out"
    stop = threading.Event()

    def interrupt_after_first_checkpoint():
        while not stop.is_set():
            if any(p.name != "checkpoint_000000"
                   for p in (out / "tune").glob("trial_*/checkpoint_*")):
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune: as for SIGINT, save and stop
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        rc = amfs(["tune", "--config", str(f), "--out", str(out), "--quiet"])
    finally:
        stop.set()
        watcher.join()
    err = capsys.readouterr().err
    assert rc == 130, err
    assert f"amfs tune --resume {out} --allow-pickle" in err
    assert not (out / "trials.csv").exists()

    assert amfs(["tune", "--resume", str(out), "--quiet"]) == 2  # Tune's state is a pickle
    assert "--allow-pickle" in capsys.readouterr().err
    assert amfs(["tune", "--resume", str(out), "--allow-pickle", "--quiet"]) == 0
    rows = read_csv_rows(out / "trials.csv")
    assert len(rows) == 2
    assert all(r["status"] == "completed" and int(r["step"]) == 40 for r in rows), rows
    resumed = [r for r in rows if int(r["resumed_from"]) > 0]
    assert resumed, rows  # at least one trial went on from its checkpoint, not from step 0
    assert all(int(r["resumed_from"]) % 2 == 0 for r in resumed)  # a validation step
    # the best trial's log has each step once, 1..40: no step lost or repeated by the resume
    steps = [json.loads(ln)["step"] for ln in (out / "best-run" / "metrics.jsonl").open()]
    assert steps == list(range(1, 41))
    assert (out / "best.yaml").is_file()
    # a finished sweep cannot be started again into the same directory
    assert amfs(["tune", "--config", str(f), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["exact", "collective"])
def test_distributed_trial_runs_its_workers_inside_its_placement_group(ray_session, tmp_path,
                                                                       exchange):
    # The session cluster has 2 CPUs and 2 GPUs. exact: the trial's group takes all of them:
    # the driver bundle (1 CPU) and 2 worker bundles (0.5 CPU + 1 GPU); the shard workers the
    # driver starts can only be scheduled inside that group, so the trial finishing shows they
    # were placed in it. collective: the trial's group is its driver's bundle, and Ray Train
    # places its 2 ranks (0.5 CPU each) in a group of its own. (A watchdog interrupts the sweep
    # if they never start.) 5 steps with a validation every 2: the trial reports at steps 2
    # and 4, then once more at its end.
    gpus = 1 if exchange == "exact" else 0
    f = write_sweep(tmp_path / "sweep.yaml", num_samples=1, max_concurrent_trials=1,
                    base={"train.steps": 5, "dist.workers": 2, "dist.cpus_per_worker": 0.5,
                          "dist.gpus_per_worker": gpus, "dist.exchange": exchange})
    out = tmp_path / "out"
    done = threading.Event()

    def watchdog():
        if not done.wait(300):
            os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        rc = amfs(["tune", "--config", str(f), "--out", str(out), "--quiet"])
    finally:
        done.set()
    assert rc == 0
    (row,) = read_csv_rows(out / "trials.csv")
    assert row["status"] == "completed" and row["step"] == "5" and row["reports"] == "3"
    assert load_config(out / "best.yaml")["dist.workers"] == 2
    steps = [json.loads(ln)["step"] for ln in (out / "best-run" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5]
