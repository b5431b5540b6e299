"""The embedded textured-shapes data set (data.source=shapes) and cross-domain evaluation
between it and the glyphs."""
import json

import numpy as np
import pytest
import torch

import amfs_dist.data.shapes as shapes_module
from amfs_dist.cli import main
from amfs_dist.config import load_config
from amfs_dist.data import make_task_source
from amfs_dist.data.shapes import SCHEMES, SHAPES, TEXTURES, class_families, render_shapes

SMALL = (("train", 4), ("val", 2), ("test", 3))


def test_shapes_are_deterministic_rgb_and_class_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path))
    data = shapes_module.shape_images.__wrapped__(0, 16, 3, SMALL)
    assert data.images.shape == (9 * 3, 3, 16, 16) and data.images.dtype == np.uint8
    # class c depends on (seed, c) only, whichever classes are rendered with it
    assert np.array_equal(render_shapes(0, 16, 3, [2, 5]),
                          np.concatenate([data.images[6:9], data.images[15:18]]))
    assert not np.array_equal(render_shapes(1, 16, 3, [2]), data.images[6:9])
    # the colour channels differ: an RGB data set, not grey repeated
    assert np.abs(data.images[:, 0].astype(int) - data.images[:, 1]).mean() > 10
    splits = [set(data.splits[s].tolist()) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [4, 2, 3]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    assert len(set(data.class_names)) == 9


def test_every_class_is_a_distinct_family_combination_and_splits_mix_families():
    families = class_families(0)
    assert len({tuple(f) for f in families.tolist()}) == len(SHAPES) * len(TEXTURES) * SCHEMES
    test = families[480 + 80:]  # the default test split: the last 160 classes
    assert set(test[:, 0].tolist()) == set(range(len(SHAPES)))
    assert set(test[:, 1].tolist()) == set(range(len(TEXTURES)))
    assert not np.array_equal(families, class_families(1))


def test_the_disk_cache_is_reused_and_a_stale_one_rendered_again(tmp_path, monkeypatch):
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path))
    rendered = []

    def counting(seed, size, instances, classes):
        rendered.append(list(classes))
        return render_shapes(seed, size, instances, classes)

    monkeypatch.setattr(shapes_module, "render_shapes", counting)
    first = shapes_module.shape_images.__wrapped__(0, 16, 3, SMALL)
    assert rendered == [list(range(9))] and len(list(tmp_path.glob("shapes-*.npy"))) == 1
    rendered.clear()
    again = shapes_module.shape_images.__wrapped__(0, 16, 3, SMALL)
    assert np.array_equal(again.images, first.images)
    assert sorted(rendered) == [[0], [8]]  # only the spot check of the first and last class
    (cached,) = tmp_path.glob("shapes-*.npy")
    np.save(cached, np.zeros_like(first.images))
    rendered.clear()
    assert np.array_equal(shapes_module.shape_images.__wrapped__(0, 16, 3, SMALL).images,
                          first.images)
    assert list(range(9)) in rendered


def test_episodes_from_shapes():
    cfg = load_config(None, ["data.source=shapes", "data.ways=4", "data.shots=2",
                             "data.queries=3"])
    source = make_task_source(cfg)
    ep = source.sample("test", 0, [0, 1])
    assert ep.xs.shape == (2, 8, 3, 28, 28) and ep.xq.shape == (2, 12, 3, 28, 28)
    assert ep.xs.dtype == torch.uint8
    assert torch.equal(ep.xs, source.sample("test", 0, [0, 1]).xs)


@pytest.mark.parametrize("trained_on, other, shape", [
    ("synthetic", "shapes", [1, 28, 28]),
    ("shapes", "synthetic", [3, 28, 28]),
])
def test_cross_domain_eval_between_glyphs_and_shapes(trained_on, other, shape, tiny, tmp_path,
                                                     capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *tiny, "train.steps=1",
                 f"data.source={trained_on}"]) == 0
    capsys.readouterr()
    assert torch.load(run / "model.pt", weights_only=True)["input_shape"] == shape
    results = []
    for finetune in (0, 1):
        assert main(["eval", str(run), "--episodes", "3", f"data.source={other}",
                     f"eval.finetune_steps={finetune}"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    for result in results:
        assert result["data_source"] == other and result["test_episodes"] == 3
        assert 0.0 <= result["test_accuracy"] <= 1.0 and result["adapt_ms_per_task"] > 0
    assert results[0]["test_loss"] != results[1]["test_loss"]
