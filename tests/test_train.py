"""Training, checkpoint/resume, evaluation and the CLI end to end on tiny settings."""
import json

import pytest
import torch

from amfs_dist import lifecycle
from amfs_dist.cli import main
from amfs_dist.config import load_config
from amfs_dist.train import CHECKPOINT
from conftest import ctrl_c_at_step
from helpers import assert_whole_queries

RESULT_KEYS = {"method", "test_accuracy", "test_ci95", "test_episodes", "adapt_ms_per_task",
               "meta_steps", "wall_s"}


def _params(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny, tmp_path):
    cfg = load_config(None, tiny + ["train.steps=6", "train.checkpoint_every=2", "method=amfs",
                                    "kernel.learn_lam=true"])
    straight = lifecycle.train(cfg, tmp_path / "straight", progress=False)

    def stop_at_3(trainer, row):
        if trainer.step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        lifecycle.train(cfg, tmp_path / "cut", progress=False, on_step=stop_at_3)
    state = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert state["step"] == 3  # the checkpoint taken on the way out, not the step-2 one
    resumed = lifecycle.resume(tmp_path / "cut", progress=False)
    for name, value in _params(tmp_path / "straight").items():
        torch.testing.assert_close(_params(tmp_path / "cut")[name], value, rtol=0, atol=0)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("method", ["amfs", "iamfs", "oamfs", "maml", "fomaml"])
def test_every_method_trains_and_writes_a_result(method, tiny, tmp_path):
    cfg = load_config(None, tiny + ["train.steps=2", "train.val_every=2", f"method={method}"])
    result = lifecycle.train(cfg, tmp_path, progress=False)
    assert RESULT_KEYS <= set(result)
    assert result["method"] == method and result["meta_steps"] == 2
    assert result["test_episodes"] == 6
    assert_whole_queries(result["test_accuracy"], episodes=6, ways=3, queries=2)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert load_config(tmp_path / "config.yaml").to_flat() == cfg.to_flat()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "val_accuracy" in rows[1]
    for key in ("weights", "weight_entropy", "agreement_min", "agreement_max", "sampling_s",
                "compute_s", "weighting_s", "update_s", "bad_tasks"):
        assert key in rows[0]
    assert abs(sum(rows[0]["weights"]) - 1) < 1e-5
    if method in ("amfs", "oamfs"):
        assert len(set(rows[0]["weights"])) > 1  # cosine weighting is not the mean


def test_training_improves_on_synthetic_glyphs(tmp_path):
    """Enough steps on the default settings (smaller model) beat the untrained model."""
    cfg = load_config(None, ["train.steps=30", "train.val_every=0", "eval.episodes=40",
                             "data.queries=5", "model.width=16", "train.lr=0.005"])
    before = lifecycle.train(cfg.replace(**{"train.steps": 0}), tmp_path / "0", progress=False)
    after = lifecycle.train(cfg, tmp_path / "30", progress=False)
    assert after["test_accuracy"] > before["test_accuracy"] + 0.03
    assert after["test_accuracy"] > 0.5  # chance is 0.2


def test_sinusoid_regression(tmp_path):
    cfg = load_config(None, ["data.source=sinusoid", "data.shots=10", "data.queries=10",
                             "train.steps=3", "train.val_every=0", "eval.episodes=20",
                             "method=iamfs", "kernel.gamma=0"])
    result = lifecycle.train(cfg, tmp_path, progress=False)
    assert result["test_accuracy"] is None and result["test_mse"] > 0


def test_cli_train_then_eval(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["meta_steps"] == 2
    assert main(["eval", str(run), "--episodes", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    evaluated = json.loads(out[0])
    assert evaluated["test_episodes"] == 4
    assert_whole_queries(evaluated["test_accuracy"], episodes=4, ways=3, queries=2)
    # the first 4 test episodes are the same ones whatever the number asked for
    assert main(["eval", str(run), "--episodes", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == evaluated["test_accuracy"]
    # an existing run is not overwritten by a new train
    assert main(["train", "--out", str(run), "--no-progress", *tiny]) == 2
    assert "--resume" in capsys.readouterr().err


def test_eval_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_checkpoint_loads_with_weights_only(tiny, tmp_path):
    cfg = load_config(None, tiny + ["train.steps=1"])
    lifecycle.train(cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert {"step", "model", "optimizer", "torch_rng"} <= set(state)


def test_cross_domain_eval_converts_the_other_stores_images(tiny, tmp_path, capsys):
    """Train on an RGB 16px store, evaluate on a grey 20px one and back (mini-ImageNet <-> CUB)."""
    import numpy as np

    from amfs_dist.data.episodes import ImageSet
    from amfs_dist.data.store import write_store

    def store(path, channels, size, seed):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(9 * 4, channels, size, size), dtype=np.uint8)
        labels = np.repeat(np.arange(9), 4)
        split = {"train": np.arange(3), "val": np.arange(3, 6), "test": np.arange(6, 9)}
        write_store(path, ImageSet(images, labels, [f"c{i}" for i in range(9)], split),
                    source="unit", split_name="fixed")
        return path

    rgb, grey = store(tmp_path / "rgb", 3, 16, 0), store(tmp_path / "grey", 1, 20, 1)
    for trained_on, other, shape in ((rgb, grey, [3, 16, 16]), (grey, rgb, [1, 20, 20])):
        run = tmp_path / f"run-{trained_on.name}"
        assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=1",
                     f"data.source={trained_on}"]) == 0
        capsys.readouterr()
        assert torch.load(run / "model.pt", weights_only=True)["input_shape"] == shape
        assert main(["eval", str(run), "--episodes", "3", f"data.source={other}"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["data_source"] == str(other)
        assert_whole_queries(result["test_accuracy"], episodes=3, ways=3, queries=2)


def test_an_input_too_small_for_the_backbone_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "data.image_size=8"]) == 2
    err = capsys.readouterr().err
    assert "data.image_size" in err and "conv4" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_keeps_a_checkpoint_and_says_how_to_resume(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    with ctrl_c_at_step(2):
        assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=5"]) == 130
    err = capsys.readouterr().err
    assert f"amfs train --resume {run}" in err
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 2
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "result.json").read_text())["meta_steps"] == 5


def test_resume_if_exists_starts_continues_and_then_only_reports(tiny, tmp_path, capsys):
    args = tiny + ["train.steps=4", "train.checkpoint_every=2"]
    straight = lifecycle.train(load_config(None, args), tmp_path / "straight", progress=False)
    run = tmp_path / "run"

    def stop_at_3(trainer, row):
        if trainer.step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):  # the first attempt starts the run (no --out there yet)
        lifecycle.train(load_config(None, args), run, progress=False, on_step=stop_at_3,
                     start_or_continue=True)
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 3
    cli = ["train", "--out", str(run), "--resume-if-exists", "--no-progress", *args]
    assert main(cli) == 0  # the second continues it from step 3
    result = json.loads(capsys.readouterr().out)
    assert result["meta_steps"] == 4 and result["resumed"] is True
    for name, value in _params(tmp_path / "straight").items():
        torch.testing.assert_close(_params(run)[name], value, rtol=0, atol=0)
    assert result["test_accuracy"] == straight["test_accuracy"]
    # a third, finished: the stored result, nothing retrained or rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(cli) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps


def test_resume_if_exists_refuses_another_config_naming_the_keys(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=1"]) == 0
    capsys.readouterr()
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["train", "--out", str(run), "--resume-if-exists", "--no-progress", *tiny,
                 "train.steps=2", "kernel.lam=0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.steps (stored 1, given 2)" in err and "kernel.lam (stored 0.1, given 0.5)" in err
    assert "data.ways" not in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps
    assert main(["train", "--resume-if-exists", "--no-progress", *tiny]) == 2
    assert "--resume-if-exists needs --out" in capsys.readouterr().err
