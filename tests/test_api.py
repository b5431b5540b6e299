"""The Python API (amfs_dist.train_run/load/evaluate_run, Model.adapt, Adapted.predict) and
`amfs predict` on folders of PNG files the tests write."""
from __future__ import annotations

import csv
import io
import json
import pydoc
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import amfs_dist
from amfs_dist.cli import main
from amfs_dist.config import parse_override
from amfs_dist.data import make_task_source
from amfs_dist.data.convert import image_converter
from amfs_dist.data.synthetic import glyph_images
from amfs_dist.errors import UserError
from conftest import BUCKET, TINY
from helpers import snapshot, write

SETTINGS = dict(parse_override(o) for o in TINY)
HEADS_FROM_THE_SUPPORT_SET = ("amfs", "protonet", "r2d2", "metaoptnet")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """method -> a finished 1-step run (3 ways) of it."""
    root = tmp_path_factory.mktemp("runs")
    return {method: amfs_dist.train_run(SETTINGS, out=root / method, method=method, train_steps=1,
                                    eval_episodes=1).path
            for method in (*HEADS_FROM_THE_SUPPORT_SET, "maml")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An ImageFolder support set of 4 test-split glyph classes (2 RGB 64x64 PNGs each) and a
    query folder (2 grey 28x28 PNGs of each class): the domain of the tiny runs, in other sizes
    and modes."""
    root = tmp_path_factory.mktemp("images")
    glyphs = glyph_images(0, 28)
    for c in glyphs.splits["test"][:4]:
        name = glyphs.class_names[int(c)]
        members = glyphs.members(int(c))
        (root / "support" / name).mkdir(parents=True)
        (root / "query").mkdir(exist_ok=True)
        for i in members[:2]:
            Image.fromarray(glyphs.images[i][0]).resize((64, 64)).convert("RGB").save(
                root / "support" / name / f"{i}.png")
        for i in members[2:4]:
            Image.fromarray(glyphs.images[i][0]).save(root / "query" / f"{name}-{i}.png")
    return root


@pytest.mark.parametrize("method", [*HEADS_FROM_THE_SUPPORT_SET, "maml"])
def test_adapt_and_predict_match_the_episode_evaluation(runs, method):
    model = amfs_dist.load(runs[method])
    learner = model.learner(model.trained_ways)
    ep = make_task_source(model.cfg, model.input_shape, training=False).sample("test", 0, [0, 1])
    _, accuracy = learner.evaluate(learner.params(), ep)
    for t in range(2):
        adapted = model.adapt(ep.xs[t], ep.ys[t])  # uint8 images, as the sampler gives them
        labels, probabilities = adapted.predict(ep.xq[t])
        assert probabilities.shape == (len(ep.xq[t]), model.trained_ways)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(ep.xq[t])))
        hits = (torch.tensor(labels) == ep.yq[t]).float().mean()
        assert float(hits) == pytest.approx(float(accuracy[t]), abs=1e-6)


@pytest.mark.parametrize("method", HEADS_FROM_THE_SUPPORT_SET)
def test_heads_built_from_the_support_set_take_any_number_of_classes(runs, method):
    model = amfs_dist.load(runs[method])
    assert model.trained_ways == 3
    images = torch.rand(10, 3, 40, 50)  # RGB of another size: converted to 1x28x28
    adapted = model.adapt(images, ["a", "b", "c", "d", "e"] * 2)
    labels, probabilities = adapted.predict(images[:4])
    assert adapted.classes == ["a", "b", "c", "d", "e"] and probabilities.shape == (4, 5)
    assert set(labels) <= set(adapted.classes)


def test_a_fixed_output_layer_takes_only_its_trained_class_count(runs):
    model = amfs_dist.load(runs["maml"])
    with pytest.raises(UserError, match="fixed at the 3 classes it was trained for; the "
                                        "support set has 5"):
        model.adapt(torch.rand(5, 1, 28, 28), [0, 1, 2, 3, 4])
    _, probabilities = model.adapt(torch.rand(3, 1, 28, 28), [0, 1, 2]).predict(
        torch.rand(2, 1, 28, 28))
    assert probabilities.shape == (2, 3)


def test_images_are_converted_as_cross_domain_evaluation_does(runs, tmp_path):
    model = amfs_dist.load(runs["amfs"])
    rgb = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    expected = image_converter(1, 28)(rgb.float()[None] / 255.0)
    png = tmp_path / "x.png"
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(png)
    for given in ([rgb], [Image.open(png)], [png], rgb[None]):
        torch.testing.assert_close(model.images(given), expected, rtol=0, atol=1e-6)


def test_predict_prints_and_writes_each_query_and_its_probabilities(runs, folders, tmp_path,
                                                                    capsys):
    argv = ["predict", runs["amfs"], "--support", str(folders / "support"),
            "--query", str(folders / "query")]
    assert main(argv) == 0
    printed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    queries = sorted(str(p) for p in (folders / "query").iterdir())
    classes = sorted(p.name for p in (folders / "support").iterdir())
    assert [r["query"] for r in printed] == queries
    for row in printed:
        assert row["predicted"] in classes
        p = [float(row[f"p_{c}"]) for c in classes]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == classes[p.index(max(p))]

    files, labels = amfs_dist.image_folder(folders / "support")
    api_labels, _ = amfs_dist.load(runs["amfs"]).adapt(files, labels).predict(
        amfs_dist.query_files(folders / "query"))
    assert [r["predicted"] for r in printed] == api_labels  # one path: the CLI is the API

    assert main([*argv, "--out", str(tmp_path / "p.json")]) == 0
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["classes"] == classes and written["method"] == "amfs"
    assert [(r["query"], r["predicted"]) for r in written["predictions"]] == \
        [(r["query"], r["predicted"]) for r in printed]
    assert main([*argv, "--out", str(tmp_path / "p.csv")]) == 0
    assert list(csv.DictReader((tmp_path / "p.csv").open())) == printed

    listed = write(tmp_path / "queries.txt", "# two of them\n" + "\n".join(queries[:2]) + "\n")
    assert main(["predict", runs["amfs"], "--support", str(folders / "support"),
                 "--query", str(listed)]) == 0
    assert list(csv.DictReader(io.StringIO(capsys.readouterr().out))) == printed[:2]


def test_predict_with_a_run_on_s3(s3, runs, folders, tmp_path, capsys, monkeypatch):  # noqa: F811
    import pyarrow.fs as pafs
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    argv = ["--support", str(folders / "support"), "--query", str(folders / "query")]
    assert main(["predict", runs["r2d2"], *argv]) == 0
    local = capsys.readouterr().out
    pafs.copy_files(runs["r2d2"], f"{BUCKET}/predict/r2d2", destination_filesystem=s3)
    assert main(["predict", f"s3://{BUCKET}/predict/r2d2", *argv]) == 0
    assert capsys.readouterr().out == local
    s3.delete_file(f"{BUCKET}/predict/r2d2/model.pt")
    assert main(["predict", f"s3://{BUCKET}/predict/r2d2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"amfs: error: s3://{BUCKET}/predict/r2d2: no model.pt; the run has "
                          f"not finished") and len(err.splitlines()) == 1
    assert list((tmp_path / "cache" / "staging").iterdir()) == []  # local copies are removed


def _support(tmp, classes=("a", "b"), images=2):
    for c in classes:
        (tmp / "support" / c).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            Image.new("L", (28, 28), 40 * i).save(tmp / "support" / c / f"{i}.png")
    return str(tmp / "support")


def _predict(run, tmp, *extra, support=None, query=None):
    return ["predict", str(run), "--support", support or _support(tmp), "--query",
            query or str(tmp / "support" / "a"), *extra]


def _unfinished(run):
    (run / "model.pt").unlink()
    return run


# (id, setup(tmp, runs copied into tmp) -> (argv, text the one error line must contain))
ROWS = [
    ("missing-run", lambda t, r: (_predict(t / "nope", t), "nope")),
    ("unfinished-run", lambda t, r: (_predict(_unfinished(r["amfs"]), t), "has not finished")),
    ("missing-support", lambda t, r: (_predict(r["amfs"], t, support=str(t / "none")),
                                      "none: support folder not found")),
    ("support-without-classes", lambda t, r: (
        (t / "flat").mkdir() or _predict(r["amfs"], t, support=str(t / "flat")),
        "no class subfolders")),
    ("empty-class", lambda t, r: (
        _support(t) and (t / "support" / "c").mkdir() or _predict(r["amfs"], t),
        "class 'c' has no images")),
    ("unreadable-support-image", lambda t, r: (
        _support(t) and write(t / "support" / "b" / "bad.png", b"not a png")
        and _predict(r["amfs"], t), "bad.png")),
    ("unreadable-query-image", lambda t, r: (
        _support(t) and write(t / "q.png", b"\x89PNG\r\n") and _predict(
            r["amfs"], t, query=str(write(t / "list.txt", "q.png\n"))), "q.png")),
    ("missing-query", lambda t, r: (_predict(r["amfs"], t, query=str(t / "nothing")),
                                    "nothing")),
    ("query-folder-without-images", lambda t, r: (
        (t / "empty").mkdir() or _predict(r["amfs"], t, query=str(t / "empty")),
        "no query images")),
    ("query-list-names-a-missing-image", lambda t, r: (
        _predict(r["amfs"], t, query=str(write(t / "list.txt", "gone.png\n"))), "gone.png")),
    ("one-class", lambda t, r: (_predict(r["amfs"], t, support=_support(t, ("a",))),
                                "at least 2")),
    ("maml-more-classes-than-trained", lambda t, r: (
        _predict(r["maml"], t, support=_support(t, "abcd")), "fixed at the 3 classes")),
    ("out-suffix", lambda t, r: (_predict(r["amfs"], t, "--out", str(t / "p.txt")), "p.txt")),
    ("out-folder-missing", lambda t, r: (_predict(r["amfs"], t, "--out", str(t / "x" / "p.csv")),
                                         "x/p.csv")),
]


@pytest.mark.parametrize("setup", [pytest.param(s, id=i) for i, s in ROWS])
def test_predict_bad_input_is_one_line_and_writes_nothing(setup, runs, tmp_path, capsys):
    copies = {m: shutil.copytree(runs[m], tmp_path / "runs" / m) for m in ("amfs", "maml")}
    argv, named = setup(tmp_path, copies)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amfs: error: "), err
    assert named in lines[0]
    assert snapshot(tmp_path) == before


def test_train_is_amfs_train_with_start_or_continue(runs, capsys):
    run = amfs_dist.train_run(SETTINGS, out=runs["amfs"], resume_if_exists=True, method="amfs",
                          train_steps=1, eval_episodes=1)  # finished: only read back
    assert run.result == json.loads((Path(run.path) / "result.json").read_text())
    with pytest.raises(UserError, match="train.steps"):
        amfs_dist.train_run(SETTINGS, out=runs["amfs"], resume_if_exists=True, train_steps=2,
                        eval_episodes=1)
    with pytest.raises(UserError, match="kernel_lamda: unknown config key"):
        amfs_dist.train_run(SETTINGS, kernel_lamda=1.0)


def test_evaluate_run_is_amfs_eval(runs, capsys):
    assert main(["eval", runs["protonet"], "--episodes", "2", "eval.queries=1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    evaluated = amfs_dist.evaluate_run(runs["protonet"], episodes=2, eval_queries=1)
    timing = "adapt_ms_per_task"
    assert {**evaluated, timing: None} == {**printed, timing: None}
    other = amfs_dist.evaluate_run(runs["protonet"], episodes=2, data_source="synthetic",
                                   **{"data.image_size": 32})
    assert other["data_source"] == "synthetic" and other["test_episodes"] == 2


def test_a_sweep_trial_is_finished_by_the_same_evaluation(runs, tmp_path):
    """tune's best run: model.pt from its checkpoint, then eval_run, as `amfs eval` does."""
    from amfs_dist.tune.results import evaluate_trial_run
    trial = tmp_path / "best-run"
    trial.mkdir()
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl"):
        shutil.copy2(f"{runs['r2d2']}/{name}", trial / name)
    result = evaluate_trial_run(str(trial), 3)
    assert json.loads((trial / "result.json").read_text()) == result
    assert result["meta_steps"] == 1 and result["test_episodes"] == 3
    expected = amfs_dist.evaluate_run(runs["r2d2"], episodes=3)
    assert result["method"] == expected["method"] == "r2d2"
    assert (result["test_accuracy"], result["test_loss"]) == \
        pytest.approx((expected["test_accuracy"], expected["test_loss"]))


def test_import_is_cheap_and_help_shows_the_api():
    code = "import sys, amfs_dist; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    text = pydoc.render_doc(amfs_dist, renderer=pydoc.plaintext)
    for name in ("train_run(", "load(", "evaluate_run(", "class Model", "class Adapted", "adapt(",
                 "predict("):
        assert name in text, name


def test_bench_adapt_times_each_head_through_the_api(runs, capsys):
    assert main(["bench", "adapt", "--methods", "protonet,maml", "--shots", "1,2", "--tasks", "3",
                 "--warmup", "0", "--run", f"protonet={runs['protonet']}",
                 "--run", f"maml={runs['maml']}", "eval.queries=2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["method"], r["shots"]) for r in rows] == [("protonet", 1), ("protonet", 2),
                                                         ("maml", 1), ("maml", 2)]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["tasks"] == 3 and r["queries_per_task"] == 6
    assert main(["bench", "adapt", "--methods", "amfs", "--run", "maml=x"]) == 2
    assert "--run" in capsys.readouterr().err
