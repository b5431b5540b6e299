"""Conflicting tasks (data.conflict_fraction): which tasks, how they are corrupted, the metrics,
and what cosine weighting makes of them."""
import json

import pytest
import torch

from amfs_dist.config import ConfigError, load_config
from amfs_dist.data import make_task_source
from amfs_dist.data.conflict import corrupted_tasks
from amfs_dist.distributed import shard
from amfs_dist.distributed.worker import ShardWorker
from amfs_dist.train import Trainer


def test_corrupted_tasks_are_a_seeded_fraction_of_each_step():
    chosen = corrupted_tasks(0, 3, 8, 0.25)
    assert len(chosen) == 2 and chosen == sorted(set(chosen)) and all(0 <= t < 8 for t in chosen)
    assert corrupted_tasks(0, 3, 8, 0.25) == chosen
    assert len({tuple(corrupted_tasks(s, t, 8, 0.25)) for s in range(3) for t in range(10)}) > 5
    assert corrupted_tasks(0, 3, 8, 0.0) == [] and corrupted_tasks(0, 3, 8, 1.0) == list(range(8))
    assert len(corrupted_tasks(0, 3, 5, 0.5)) == 2  # round(2.5): Python's round, to even


def _sources(tiny, mode, fraction=0.5):
    cfg = load_config(None, tiny + ["data.ways=5", "data.queries=4", f"data.conflict={mode}",
                                    f"data.conflict_fraction={fraction}"])
    return cfg, make_task_source(cfg), make_task_source(cfg.replace(**{"data.conflict_fraction": 0.0}))


@pytest.mark.parametrize("mode", ["permute", "noise"])
def test_only_the_query_labels_of_chosen_training_tasks_change(tiny, mode):
    cfg, source, plain = _sources(tiny, mode)
    ids = list(range(cfg.train.meta_batch))
    for step in (0, 7):
        ep, ref = source.sample("train", step, ids), plain.sample("train", step, ids)
        chosen = corrupted_tasks(cfg.seed, step, len(ids), 0.5)
        assert ep.corrupted.tolist() == [t in chosen for t in ids] and ref.corrupted is None
        for name in ("xs", "ys", "xq"):
            assert torch.equal(getattr(ep, name), getattr(ref, name))
        for t in ids:
            y, y0 = ep.yq[t], ref.yq[t]
            if t not in chosen:
                assert torch.equal(y, y0)
            elif mode == "permute":  # a derangement: one new class per class, never the same
                mapping = {int(a): int(b) for a, b in zip(y0, y)}
                assert len(mapping) == 5 and sorted(mapping.values()) == list(range(5))
                assert all(a != b for a, b in mapping.items())
                assert all(mapping[int(a)] == int(b) for a, b in zip(y0, y))
            else:  # half of the 20 query labels moved to another class
                assert int((y != y0).sum()) == 10
    for split in ("val", "test"):
        ep, ref = source.sample(split, 0, ids), plain.sample(split, 0, ids)
        assert ep.corrupted is None and torch.equal(ep.yq, ref.yq)


def test_corruption_is_the_same_whatever_the_worker_count(tiny):
    """A shard worker draws its tasks' corruption from (seed, step, task id) alone."""
    cfg, source, _ = _sources(tiny, "permute")
    ids = list(range(cfg.train.meta_batch))
    whole = source.sample("train", 5, ids)
    for w, part in enumerate(shard(ids, 2)):
        worker = ShardWorker(cfg.to_flat(), w)
        ep = worker.backend.source.sample("train", 5, part)
        assert torch.equal(ep.yq, whole.yq[part]) and torch.equal(ep.corrupted, whole.corrupted[part])


def test_metrics_name_the_corrupted_tasks_and_their_mean_weight(tiny, tmp_path):
    cfg = load_config(None, tiny + ["method=amfs", "train.steps=2", "data.conflict_fraction=0.5"])
    trainer = Trainer(cfg, tmp_path)
    trainer.fit(progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        chosen = corrupted_tasks(cfg.seed, row["step"] - 1, 4, 0.5)
        assert row["corrupted"] == chosen
        w = row["weights"]
        assert row["weight_corrupted"] == pytest.approx(sum(w[t] for t in chosen) / 2)
        assert row["weight_clean"] == pytest.approx(sum(w[t] for t in range(4) if t not in chosen) / 2)
    plain = Trainer(load_config(None, tiny), tmp_path / "plain")
    assert "corrupted" not in plain.metrics_row(plain.train_step())


@pytest.mark.parametrize("override", ["data.conflict_fraction=1.5", "data.conflict=swap"])
def test_bad_conflict_settings_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="data.conflict_fraction"):
        load_config(None, ["data.source=sinusoid", "data.conflict_fraction=0.5"])


@pytest.mark.parametrize("mode", ["permute", "noise"])
def test_cosine_clip_weights_conflicting_tasks_lower(mode, tmp_path):
    """Controlled setting: 5-way tasks drawn from a pool of 6 training classes, so the clean tasks
    share most of their classes and their meta-gradients agree; a quarter of each batch is made
    conflicting. After 3 clean meta-steps, O-AMFS's clip weights of the conflicting tasks are
    below those of the clean ones in every batch, for every seed. (On the full synthetic
    data with a width-8 Conv-4, per-task gradients are nearly orthogonal, |cos| ~ 0.1, and the
    weights are not reliably lower: this shows the mechanism, not a guarantee.)"""
    from amfs_dist.algorithms.outer import task_weights
    from amfs_dist.backend import InProcessBackend
    from amfs_dist.data import load_images
    from amfs_dist.data.conflict import ConflictingTasks
    from amfs_dist.data.episodes import ImageEpisodeSampler, ImageSet

    images = load_images("synthetic", 16)
    pool = ImageSet(images.images, images.labels, images.class_names,
                    {**images.splits, "train": images.splits["train"][:6]})
    for seed in range(3):
        cfg = load_config(None, [f"seed={seed}", "method=amfs", "data.ways=5", "data.shots=5",
                                 "data.queries=10", "data.image_size=16", "model.width=8",
                                 "train.meta_batch=8", "train.val_every=0"])
        clean = ImageEpisodeSampler(pool, 5, 5, 10, seed)
        trainer = Trainer(cfg, tmp_path / str(seed))
        trainer._backend = InProcessBackend(cfg, trainer.learner, clean)
        for _ in range(3):
            trainer.train_step()
        conflicting = ConflictingTasks(clean, 0.25, mode, seed, 8)
        params = trainer.learner.load_flat(trainer.learner.flat_params())
        for step in (100, 101):
            ep = conflicting.sample("train", step, list(range(8)))
            grads = trainer.learner.meta_gradients(params, ep).grads
            w = task_weights(grads, "cosine", "clip").weights
            assert ep.corrupted.sum() == 2
            assert w[ep.corrupted].mean() < w[~ep.corrupted].mean(), (seed, step, w)
