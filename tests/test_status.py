"""`amfs status`: a run in progress, a finished run, and a path that is no run."""
import json
import os
import time

import pytest

from amfs_dist import lifecycle
from amfs_dist.cli import main
from amfs_dist.config import load_config
from amfs_dist.train import CHECKPOINT


class Interrupt(Exception):
    pass


def _status(capsys, run) -> dict:
    assert main(["status", str(run)]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_of_a_run_in_progress_then_finished(tiny, tmp_path, capsys):
    cfg = load_config(None, tiny + ["train.steps=4", "train.val_every=2"])
    run = tmp_path / "run"

    def stop_at_3(trainer, row):
        if trainer.step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        lifecycle.train(cfg, run, progress=False, on_step=stop_at_3)
    hour_ago = time.time() - 3600
    os.utime(run / CHECKPOINT, (hour_ago, hour_ago))
    status = _status(capsys, run)
    assert status["step"] == 3 and status["steps"] == 4 and status["finished"] is False
    assert status["result"] is None and status["method"] == "amfs"
    assert 3600 <= status["checkpoint_age_s"] < 3600 + 120
    assert status["last_metrics"]["step"] == 3 and "loss" in status["last_metrics"]
    assert status["last_validation"]["step"] == 2
    assert "workers" not in status  # in-process: no shard workers
    step_2 = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert status["last_validation"]["val_accuracy"] == step_2["val_accuracy"]
    with (run / "metrics.jsonl").open("a") as log:  # step 4's row, caught half written
        log.write('{"step": 4, "lo')
    assert _status(capsys, run)["last_metrics"] == status["last_metrics"]

    result = lifecycle.resume(run, progress=False)
    status = _status(capsys, run)
    assert status["step"] == 4 and status["finished"] is True and status["result"] == result
    assert status["last_validation"]["step"] == 4 and status["checkpoint_age_s"] < 120


@pytest.mark.ray
def test_status_says_how_many_workers_computed_the_last_step(ray_session, tiny, tmp_path, capsys):
    """An elastic run of dist.workers=3 on 2 CPUs goes with the 2 that fit: status says 2."""
    cfg = load_config(None, tiny + ["train.steps=1", "dist.workers=3", "dist.min_workers=2",
                                    "dist.replace_timeout_s=2", "dist.cpus_per_worker=1"])
    lifecycle.train(cfg, tmp_path, progress=False)
    status = _status(capsys, tmp_path)
    assert status["step"] == 1 and status["workers"] == 2
    assert status["last_metrics"]["workers"] == 2


def test_status_of_a_path_that_is_no_run_is_one_line(tmp_path, capsys):
    for path in (tmp_path, tmp_path / "missing"):
        assert main(["status", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"amfs: error: {path}: not a run directory (no config.yaml)\n"
