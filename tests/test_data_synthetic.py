"""The embedded data sets and the seeded episode sampler."""
import numpy as np
import pytest
import torch

from amfs_dist.cli import main as amfs
from amfs_dist.config import load_config
from amfs_dist.data import make_task_source
from amfs_dist.data.synthetic import (
    _RENDER_VERSION,
    GLYPH_CLASSES,
    GLYPH_INSTANCES,
    SinusoidTasks,
    glyph_images,
    render_glyphs,
)


def test_glyphs_are_deterministic_and_class_disjoint(tmp_path, monkeypatch):
    a = glyph_images(0)
    assert np.array_equal(render_glyphs(0, 28, GLYPH_INSTANCES, 4), a.images[:4 * GLYPH_INSTANCES])
    assert not np.array_equal(render_glyphs(1, 28, GLYPH_INSTANCES, 4), a.images[:4 * GLYPH_INSTANCES])
    # the disk cache gives back exactly what was rendered
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path))
    small = (("train", 3), ("test", 2))
    first = glyph_images.__wrapped__(0, 20, 2, small)
    assert len(list(tmp_path.glob("glyphs-*.npy"))) == 1
    assert np.array_equal(glyph_images.__wrapped__(0, 20, 2, small).images, first.images)
    assert a.images.shape == (sum(GLYPH_CLASSES.values()) * GLYPH_INSTANCES, 1, 28, 28)
    assert a.images.dtype == np.uint8 and a.images.max() == 255
    splits = [set(a.splits[s].tolist()) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == list(GLYPH_CLASSES.values())
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])


def test_instances_of_a_class_are_alike_but_not_identical():
    data = glyph_images(0)
    x = data.images.reshape(-1, GLYPH_INSTANCES, 28 * 28).astype(np.float32) / 255
    same = np.mean([np.abs(x[c, 0] - x[c, 1]).mean() for c in range(50)])
    other = np.mean([np.abs(x[c, 0] - x[c + 1, 0]).mean() for c in range(50)])
    assert 0 < same < other


def test_episodes_depend_only_on_seed_step_and_task_id():
    cfg = load_config(None, ["data.ways=5", "data.shots=2", "data.queries=3"])
    source = make_task_source(cfg)
    whole = source.sample("train", 7, list(range(6)))
    even, odd = source.sample("train", 7, [0, 2, 4]), source.sample("train", 7, [1, 3, 5])
    assert torch.equal(whole.xs[0::2], even.xs) and torch.equal(whole.xq[1::2], odd.xq)
    assert torch.equal(whole.yq, source.sample("train", 7, list(range(6))).yq)
    assert not torch.equal(whole.xs, source.sample("train", 8, list(range(6))).xs)
    assert whole.xs.shape == (6, 10, 1, 28, 28) and whole.xq.shape == (6, 15, 1, 28, 28)
    assert whole.xs.dtype == torch.uint8
    as_float = whole.to("cpu")
    assert as_float.xs.dtype == torch.float32 and float(as_float.xs.max()) == 1.0
    torch.testing.assert_close(as_float.xq * 255, whole.xq.float())
    assert torch.equal(whole.ys[0], torch.arange(5).repeat_interleave(2))


def test_episode_classes_come_from_their_split_only():
    data = glyph_images(0)
    cfg = load_config(None, ["data.ways=5"])
    source = make_task_source(cfg)
    lookup = {data.images[i].tobytes(): data.labels[i] for i in range(len(data.labels))}
    for split in ("train", "val", "test"):
        ep = source.sample(split, 0, list(range(4)))
        imgs = ep.xs.numpy().reshape(-1, 1, 28, 28)
        classes = {int(lookup[im.tobytes()]) for im in imgs}
        assert classes <= set(data.splits[split].tolist())


def test_image_size_option_renders_at_that_size():
    cfg = load_config(None, ["data.image_size=32", "data.channels=3"])
    source = make_task_source(cfg)
    assert source.input_shape == (3, 32, 32)
    assert source.sample("train", 0, [0]).xs.shape[-3:] == (3, 32, 32)


def test_sinusoid_tasks():
    tasks = SinusoidTasks(shots=5, queries=7, seed=0)
    ep = tasks.sample("train", 0, [0, 1])
    assert ep.xs.shape == (2, 5, 1) and ep.yq.shape == (2, 7, 1)
    assert float(ep.xs.abs().max()) <= 5 and float(ep.ys.abs().max()) <= 5
    # y = A sin(x - phase) for one A and phase per task: the support and query agree on them
    x = torch.cat([ep.xs[0], ep.xq[0]]).squeeze(-1).double()
    y = torch.cat([ep.ys[0], ep.yq[0]]).squeeze(-1).double()
    basis = torch.stack([torch.sin(x), torch.cos(x)], 1)
    coef = torch.linalg.lstsq(basis, y[:, None]).solution
    torch.testing.assert_close(basis @ coef, y[:, None], atol=1e-5, rtol=0)


# --- a damaged glyph cache is rendered again, not used --------------------------------

@pytest.mark.slow  # renders the 14,400 glyphs at 16x16 once: ~25 s on 2 busy cores
def test_a_glyph_cache_file_of_the_wrong_shape_is_rebuilt(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("AMFS_CACHE", str(cache))
    name = f"glyphs-v{_RENDER_VERSION}-s0-16px-{GLYPH_INSTANCES}-" + "-".join(
        f"{split}{n}" for split, n in GLYPH_CLASSES.items()) + ".npy"
    np.save(cache / name, np.zeros((10, 1, 16, 16), np.uint8))  # e.g. from another version
    glyph_images.cache_clear()
    try:
        rc = amfs(["train", "--no-progress", "--out", str(tmp_path / "run"),
                   "data.source=synthetic", "data.image_size=16", "train.steps=0", "data.ways=3",
                   "model.width=8", "eval.episodes=2", "eval.queries=2", "eval.batch=2"])
    finally:
        glyph_images.cache_clear()
    assert rc == 0, capsys.readouterr().err
    rebuilt = np.load(cache / name)
    assert rebuilt.shape == (sum(GLYPH_CLASSES.values()) * GLYPH_INSTANCES, 1, 16, 16)
    last = len(rebuilt) // GLYPH_INSTANCES - 1
    assert np.array_equal(rebuilt[-GLYPH_INSTANCES:],
                          render_glyphs(0, 16, GLYPH_INSTANCES, [last]))
    assert [p.name for p in cache.iterdir()] == [name]  # replaced in place, no temporary left


@pytest.mark.parametrize("damage", ["dtype", "content", "truncated", "not-npy"])
def test_a_damaged_glyph_cache_file_is_rendered_again(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path))
    small = (("train", 3), ("test", 2))
    good = glyph_images.__wrapped__(0, 20, 2, small).images
    (path,) = tmp_path.glob("glyphs-*.npy")
    if damage == "dtype":
        np.save(path, good.astype(np.float32))
    elif damage == "content":
        np.save(path, 255 - good)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"PK\x03\x04 not a numpy file")
    assert np.array_equal(glyph_images.__wrapped__(0, 20, 2, small).images, good)
    cached = np.load(path)
    assert cached.dtype == np.uint8 and np.array_equal(cached, good)
