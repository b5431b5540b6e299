"""dist.exchange=collective: replicas on the workers, gradients exchanged among them.

Same numbers as in-process (exact weights), resume, sketch-weight bounds, lost and hung
workers, and train.deterministic (bitwise the same parameters for any worker count and
exchange). dist.block_size=512 splits the tiny model's parameters over up to 3 workers.
"""
from __future__ import annotations

import math
import threading

import pytest
import torch

from amfs_dist import lifecycle
from amfs_dist.algorithms.outer import (
    agreement,
    agreement_from_gram,
    block_gram,
    combine,
    task_weights,
)
from amfs_dist.backend import InProcessBackend
from amfs_dist.config import load_config
from amfs_dist.distributed.collective import shares, tasks_of
from amfs_dist.distributed.faults import faulty_source_factory
from amfs_dist.errors import WorkerFailedError
from amfs_dist.train import CHECKPOINT, Trainer
from helpers import (
    BASE,
    assert_same_params,
    cfg_of,
    metrics,
    model_state,
    train_in_process,
)

COLLECTIVE = ("dist.exchange=collective", "dist.block_size=512", "dist.timeout_s=30")
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return train_in_process(cfg_of(), tmp_path_factory.mktemp("reference"))


def fit(cfg, run_dir, backend=None, **kwargs):
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, backend)
    try:
        trainer.fit(progress=False, **kwargs)
    finally:
        trainer.close()
    trainer.params = {k: v.clone() for k, v in trainer.learner.module.state_dict().items()}
    return trainer


# -- pure pieces ------------------------------------------------------------------------------------
def test_shares_are_whole_blocks_and_cover_everything():
    assert shares(1000, 256, 3) == [0, 256, 512, 1000]
    assert shares(1000, 256, 1) == [0, 1000]
    assert shares(100, 256, 2) == [0, 0, 100]  # one block: one worker owns it
    assert tasks_of(7, 3) == [3, 2, 2] and tasks_of(2, 3) == [1, 1, 0]


def test_block_gram_and_ordered_combine():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 1000, generator=gen)
    exact = rows.double() @ rows.double().T
    torch.testing.assert_close(block_gram(rows, 300), exact)
    # the driver's agreement from the workers' Gram is the in-process one from the rows
    torch.testing.assert_close(agreement_from_gram(block_gram(rows, 300)), agreement(rows))
    w = torch.rand(5, generator=gen)
    ordered = combine(rows, w, ordered=True)
    torch.testing.assert_close(ordered, w @ rows, rtol=1e-5, atol=1e-6)
    # any split of the coordinates gives the same bits
    halves = torch.cat([combine(rows[:, :333], w, True), combine(rows[:, 333:], w, True)])
    assert torch.equal(halves, ordered)
    # weights from the Gram matrix are those from the vectors
    a, b = task_weights(rows), task_weights(None, gram=exact)
    torch.testing.assert_close(a.weights, b.weights)


def test_a_worker_given_several_gpus_is_refused(monkeypatch):
    from amfs_dist.distributed.worker import pick_device
    from amfs_dist.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="given 2 GPUs"):
        pick_device(cfg_of(), assigned_gpus=["0", "1"])
    assert pick_device(cfg_of("train.device=cpu"), assigned_gpus=["0", "1"]).type == "cpu"
    from amfs_dist.distributed import RayBackend
    with pytest.raises(UserError, match="dist.gpus_per_worker=2"):
        RayBackend(cfg_of("dist.workers=1", "dist.gpus_per_worker=2"))


def test_sampling_is_prefetched_off_the_critical_path():
    """In process, step s+1's episodes are drawn in the background thread while step s
    computes: after the first step, no step draws its own episodes, none is drawn twice, and
    the gradients are those of a step that draws its own."""
    cfg = load_config(None, BASE + ["data.queries=15"])
    backend = InProcessBackend(cfg)
    source = backend.prefetcher.source
    draws = []  # (step, thread that drew it)

    def sample(split, step, task_ids, *args, **kwargs):
        draws.append((step, threading.current_thread().name))
        return type(source).sample(source, split, step, task_ids, *args, **kwargs)

    source.sample = sample
    flat = backend.learner.flat_params()
    ids = list(range(4))
    try:
        for step in range(4):
            tg, _ = backend.task_gradients(flat, step, ids)
        here = threading.current_thread().name
        assert draws[0] == (0, here)  # nothing to prefetch from
        assert [(s, name.startswith("amfs-prefetch")) for s, name in draws[1:4]] == \
            [(1, True), (2, True), (3, True)]
        assert [s for s, _ in draws] in ([0, 1, 2, 3], [0, 1, 2, 3, 4])  # step 4: maybe begun
        fresh = InProcessBackend(cfg)  # no prefetch: draws step 3 itself
        tg3, _ = fresh.task_gradients(flat, 3, ids)
        assert torch.equal(tg3.grads, tg.grads)
        fresh.close()
    finally:
        backend.close()


# -- on the Ray cluster -----------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("workers", [3])  # 2: most tests below; 1: the elastic multi-node one
def test_collective_exact_gives_the_in_process_parameters(ray_session, reference, tmp_path,
                                                         workers):
    cfg = cfg_of(f"dist.workers={workers}", *COLLECTIVE)
    trainer = fit(cfg, tmp_path)
    assert_same_params(trainer.params, reference, atol=ATOL)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, cfg.train.steps + 1))
    row = rows[-1]
    P = trainer.learner.layout.size
    assert row["workers"] == workers and P > 2 * 512
    # a rank sends its share of the all-to-all, the T x T Gram matrix and one share of G:
    # about (t + 1) x P floats, never T x P
    t = -(-cfg.train.meta_batch // workers)
    assert (row["worker_bytes"] == 0) == (workers == 1)
    assert row["worker_bytes"] <= 4 * P * (t + 1) + 8 * cfg.train.meta_batch ** 2 * 3 + 1000
    for key in ("sampling_s", "sampling_wait_s", "compute_s", "transfer_s", "collective_s"):
        assert row[key] >= 0
    # Ray Train kept its checkpoints in the run's ray-train/ folder
    assert list((tmp_path / "ray-train").rglob("checkpoint.pt"))


@pytest.mark.ray
@pytest.mark.slow
def test_collective_resume_equals_uninterrupted(ray_session, reference, tmp_path):
    # the default dist.block_size: one block, which worker 1 does not share
    cfg = cfg_of("dist.workers=2", "dist.exchange=collective", "train.steps=3")
    lifecycle.train(cfg, tmp_path, progress=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    result = lifecycle.resume(tmp_path, ["train.steps=5"], progress=False)
    assert result["resumed"] and result["meta_steps"] == 5
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert_same_params(model_state(tmp_path), reference, atol=ATOL)


@pytest.mark.ray
def test_collective_sketch_weights_within_the_sketch_bounds(ray_session, tmp_path):
    """Sketch weights with task 1 NaN at every step: it gets weight 0 and the others the
    exact weights within the sketch's bounds (those of test_sketch_weights_approximate_exact_
    weights) at step 1, where both runs start from the same parameters."""
    factory = faulty_source_factory(nan_tasks=[(s, 1) for s in range(5)])
    sketch = cfg_of("dist.workers=2", *COLLECTIVE, "dist.weights_from=sketch",
                    "dist.sketch_dim=256", "train.steps=2")
    lifecycle.train(sketch, tmp_path / "sketch", progress=False, source_factory=factory)
    lifecycle.train(cfg_of("train.steps=2"), tmp_path / "exact", progress=False,
                    source_factory=factory)
    got, want = metrics(tmp_path / "sketch"), metrics(tmp_path / "exact")
    assert [r["bad_tasks"] for r in got] == [1, 1] and all(r["weights"][1] == 0 for r in got)
    da = abs(got[0]["agreement_min"] - want[0]["agreement_min"])
    assert da <= 4 * math.sqrt(2 / 256)
    l1 = sum(abs(a - b) for a, b in zip(got[0]["weights"], want[0]["weights"]))
    assert l1 <= 0.5
    assert got[0]["workers"] == 2 and got[0]["collective_s"] >= 0


@pytest.mark.ray
@pytest.mark.slow
def test_collective_survives_killed_and_hung_workers(ray_session, reference, tmp_path):
    """A rank kills itself drawing step 3's tasks (mid-step) and one hangs drawing step 4's:
    the peers' collective calls fail (at once, or after dist.timeout_s), Ray Train restarts
    the group from its last checkpoint, the steps since are recomputed, and the run ends
    with the uninterrupted run's parameters and each step logged once."""
    cfg = cfg_of("dist.workers=2", *COLLECTIVE[:2], "dist.timeout_s=8")
    once = tmp_path / "once"
    once.mkdir()
    lifecycle.train(cfg, tmp_path / "run", progress=False, source_factory=faulty_source_factory(
        kill_steps=[3], hang_steps=[4], once_dir=str(once)))
    assert (once / "kill-step3").exists() and (once / "hang-step4").exists()
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, cfg.train.steps + 1))
    assert_same_params(model_state(tmp_path / "run"), reference, atol=ATOL)


@pytest.mark.ray
@pytest.mark.slow
def test_collective_worker_that_keeps_failing_stops_with_a_checkpoint(ray_session, tmp_path):
    cfg = cfg_of("dist.workers=2", *COLLECTIVE, "dist.max_worker_restarts=1", "train.steps=6")
    with pytest.raises(WorkerFailedError, match=r"max_worker_restarts=1"):
        lifecycle.train(cfg, tmp_path, progress=False,
                        source_factory=faulty_source_factory(kill_steps=[3]))
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    # the last checkpoint the ranks reported: step 2 (train.checkpoint_every=2)
    assert state["step"] == 2 and [r["step"] for r in metrics(tmp_path)][:2] == [1, 2]


@pytest.mark.ray
@pytest.mark.slow
def test_deterministic_is_bitwise_the_same_for_any_worker_count_and_exchange(ray_session,
                                                                            tmp_path):
    """train.deterministic=true, 12 steps: in-process, 2 workers exact and 2 workers
    collective (exact weights) give bitwise the same parameters."""
    steps = ["train.steps=12", "train.deterministic=true", "dist.block_size=512"]
    runs = {"in-process": cfg_of(*steps), "exact W=2": cfg_of(*steps, "dist.workers=2"),
            "collective W=2": cfg_of(*steps, "dist.workers=2", *COLLECTIVE)}
    params = {name: fit(cfg, tmp_path / str(i)).params for i, (name, cfg) in enumerate(runs.items())}
    base = params.pop("in-process")
    for name, other in params.items():
        for key, value in base.items():
            assert torch.equal(value, other[key]), f"{name}: {key} differs"
    initial = fit(cfg_of("train.steps=0"), tmp_path / "init").params
    assert not torch.equal(base["head.scale"], initial["head.scale"])  # it did train


@pytest.mark.ray
def test_collective_run_without_finite_gradients_stops_once_with_a_checkpoint(ray_session,
                                                                             tmp_path):
    """Every task NaN from step 2 on, train.max_bad_steps=2: rank 0 says so once (Ray Train
    does not restart the group for it), the run stops with the checkpoint of step 3."""
    from amfs_dist.errors import TrainingError
    cfg = cfg_of("dist.workers=2", *COLLECTIVE, "train.max_bad_steps=2", "train.steps=6")
    with pytest.raises(TrainingError, match=r"2 consecutive steps without a finite task "
                                            r"gradient \(train.max_bad_steps\) at step 3"):
        lifecycle.train(cfg, tmp_path, progress=False,
                        source_factory=faulty_source_factory(nan_steps=range(1, 6)))
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    assert [r["skipped"] for r in metrics(tmp_path)] == [False, True, True]


@pytest.mark.ray
@pytest.mark.slow
def test_validation_and_test_run_on_the_workers_whatever_their_number(ray_session, tmp_path):
    """Validation and test episodes drawn in the `amfs train` process fail here: a run with
    workers evaluates on them, by episode batch; 1 or 2 shard workers and 2 Ray Train ranks
    give the same numbers (train.deterministic: the same parameters, too)."""
    import os
    factory = faulty_source_factory(no_episodes_in_pid=os.getpid())
    runs = {"exact W=1": ("dist.workers=1",), "exact W=2": ("dist.workers=2",),
            "collective W=2": ("dist.workers=2", "dist.exchange=collective")}
    results = {}
    for name, extra in runs.items():
        cfg = cfg_of(*extra, "train.val_every=2", "train.steps=4", "train.deterministic=true",
                     "dist.block_size=512")
        out = tmp_path / name.replace(" ", "-")
        result = lifecycle.train(cfg, out, progress=False, source_factory=factory)
        val = [r["val_accuracy"] for r in metrics(out) if "val_accuracy" in r]
        results[name] = (result["test_accuracy"], result["test_loss"], result["test_ci95"], val)
    with pytest.raises(RuntimeError, match="told to leave them to its workers"):
        lifecycle.train(cfg_of("train.val_every=2", "train.steps=4"), tmp_path / "0",
                        progress=False, source_factory=factory)
    first = results.pop("exact W=1")
    assert len(first[3]) == 2
    for name, numbers in results.items():
        assert numbers == first, name
