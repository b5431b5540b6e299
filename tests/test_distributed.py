"""Distributed meta-training on Ray: sharding, worker-count invariance, sketch exchange, faults.

Tests marked `ray` share the session's local cluster (conftest.ray_session: 2 CPUs, 2 logical
GPUs). Workers ask for half a CPU so that three fit; with no CUDA they compute on the CPU.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from amfs_dist import lifecycle
from amfs_dist.algorithms.outer import task_weights
from amfs_dist.backend import InProcessBackend, weighted_direction
from amfs_dist.config import load_config
from amfs_dist.distributed.faults import faulty_source_factory
from amfs_dist.distributed.sketch import CountSketch
from amfs_dist.distributed.worker import ShardWorker, pick_device
from amfs_dist.train import CHECKPOINT, Trainer, TrainingError
from conftest import TINY
from helpers import (
    assert_same_params,
    cfg_of,
    kill_worker_after,
    metrics,
    model_state,
    resume_to_the_end,
    train_in_process,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Parameters after STEPS in-process steps (dist.workers=0)."""
    return train_in_process(cfg_of(), tmp_path_factory.mktemp("reference"))


# -- pure pieces ------------------------------------------------------------------------------------
def test_shard_is_round_robin():
    from amfs_dist.distributed import shard
    assert shard(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard([10, 11], 3) == [[10], [11], []]


def test_pick_device(monkeypatch):
    cfg = cfg_of()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match=r"given GPU\(s\) \['0'\] but CUDA does not work.*"
                                            r"NVIDIA driver 580"):
        pick_device(cfg, assigned_gpus=["0"])  # never a silent fall back to the CPU
    assert pick_device(cfg.replace(**{"train.device": "cpu"}), assigned_gpus=["0"]).type == "cpu"
    assert pick_device(cfg, assigned_gpus=[]).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(cfg, assigned_gpus=["3"]) == torch.device("cuda", 0)  # Ray remaps to 0
    assert pick_device(cfg, assigned_gpus=[]).type == "cpu"
    assert pick_device(cfg.replace(**{"train.device": "cpu"}), assigned_gpus=["0"]).type == "cpu"


def test_count_sketch_is_seeded_and_unbiased():
    """E<Sx,Sy> = <x,y>, Var <= 2|x|^2|y|^2/d: checked over 400 independent sketches."""
    P, d = 3000, 64
    a = CountSketch(P, d, seed=7)
    b = CountSketch(P, d, seed=7)
    assert torch.equal(a.buckets, b.buckets) and torch.equal(a.signs, b.signs)
    assert a.buckets.shape == (P,)  # h and s only: no P x d matrix
    assert not torch.equal(a.buckets, CountSketch(P, d, seed=8).buckets)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(P, generator=gen)
    y = 0.6 * x + 0.8 * torch.randn(P, generator=gen)
    exact = float(x @ y)
    est = np.array([float(torch.prod(CountSketch(P, d, seed=s)(torch.stack([x, y])), 0).sum())
                    for s in range(400)])
    bound = 2 * float(x @ x) * float(y @ y) / d
    assert abs(est.mean() - exact) < 4 * math.sqrt(bound / len(est))
    assert est.var() < 1.25 * bound


def tiny_task_gradients(tasks=8, source=None):
    cfg = load_config(None, TINY + [f"train.meta_batch={tasks}"])
    backend = InProcessBackend(cfg, source=source)
    torch.manual_seed(0)
    tg, _ = backend.task_gradients(backend.learner.flat_params(), 0, list(range(tasks)))
    return cfg, tg


def test_sketch_weights_approximate_exact_weights():
    """The stated bound. For unit-norm gradients each sketched cosine has standard deviation
    <= sqrt(2/d) (module docstring of distributed.sketch); a_i averages T-1 of them, so
    |a'_i - a_i| <= max_j |cos'_ij - cos_ij|, and we require that to be within 4 sqrt(2/d)
    (0.18 at d=1024). Clipped weights then move by at most
    ||w' - w||_1 <= 2 T max_i |a'_i - a_i| / sum_k max(a'_k, 0) (clipping is 1-Lipschitz), so
    they are only as good as the agreement signal is large against sqrt(2/d): at initialisation
    the a_i are ~0.05, which is why dist.sketch_dim defaults to 8192 (sqrt(2/d) = 0.016).
    With real task gradients the RMS cosine error must be within 1.5 sqrt(2/d)."""
    cfg, tg = tiny_task_gradients(8)
    d = 1024
    sk = CountSketch(tg.grads.shape[1], d, cfg.seed)(tg.grads)
    unit = lambda m: m.double() / m.double().norm(dim=1, keepdim=True)
    cos, cos_sk = unit(tg.grads) @ unit(tg.grads).T, unit(sk) @ unit(sk).T
    err = (cos_sk - cos)[~torch.eye(8, dtype=torch.bool)]
    sigma = math.sqrt(2 / d)
    assert err.abs().max() <= 4 * sigma
    assert err.pow(2).mean().sqrt() <= 1.5 * sigma
    exact, approx = task_weights(tg.grads), task_weights(sk)
    da = (approx.agreement - exact.agreement).abs().max()
    assert da <= 4 * sigma
    l1 = (approx.weights - exact.weights).abs().sum()
    assert l1 <= 2 * 8 * da / approx.agreement.clamp_min(0).sum() + 1e-12


def test_worker_phase_two_recomputes_when_its_gradients_are_gone(monkeypatch):
    """A replacement worker gets phase 2 without phase 1: it recomputes the same gradients."""
    import ray

    cfg = cfg_of("dist.exchange=sketch", "dist.sketch_dim=32")
    factory = faulty_source_factory(nan_tasks=[(3, 2)])
    worker = ShardWorker(cfg.to_flat(), 0, factory)
    flat = worker.backend.learner.flat_params().numpy()
    ids, weights = [0, 2, 4], np.array([0.5, 0.3, 0.2])
    sk, loss, acc, finite, _ = worker.sketches(flat, 3, ids, round_id=1)
    assert sk.shape == (3, 32) and finite.tolist() == [True, False, True]
    cached, _ = worker.weighted_sum([None], 3, ids, 1, weights)  # phase 1's gradients

    fresh = ShardWorker(cfg.to_flat(), 0, factory)
    monkeypatch.setattr(ray, "get", lambda ref, *a, **k: flat if ref == "params-ref" else None)
    recomputed, _ = fresh.weighted_sum(["params-ref"], 3, ids, 1, weights)

    tg, _ = InProcessBackend(cfg, source=factory(cfg)).task_gradients(torch.from_numpy(flat), 3, ids)
    expected = 0.5 * tg.grads[0] + 0.2 * tg.grads[2]  # the NaN task is left out
    torch.testing.assert_close(torch.from_numpy(cached), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(recomputed), expected, atol=1e-6, rtol=1e-5)


def test_nan_tasks_are_dropped_and_bad_steps_stop_the_run_in_process(tmp_path):
    """Task 0 and 2 of step 1 are NaN (dropped, counted); steps 3 and 4 are all NaN (skipped);
    with train.max_bad_steps=2 the run stops after step 4 with an error and a checkpoint."""
    cfg = cfg_of("train.steps=8", "train.max_bad_steps=2")
    source = faulty_source_factory(nan_tasks=[(1, 0), (1, 2)], nan_steps=[3, 4])(cfg)
    with pytest.raises(TrainingError, match="max_bad_steps"):
        lifecycle.train(cfg, tmp_path, progress=False, backend=InProcessBackend(cfg, source=source))
    rows = metrics(tmp_path)
    assert [r["bad_tasks"] for r in rows] == [0, 2, 0, 4, 4]
    assert [r["skipped"] for r in rows] == [False, False, False, True, True]
    assert len(rows[1]["weights"]) == 4 and rows[1]["weights"][0] == rows[1]["weights"][2] == 0
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 5 and state["bad_streak"] == 2


# -- on the Ray cluster -----------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_same_parameters_whatever_the_worker_count(ray_session, reference, tmp_path, workers):
    # the session cluster's GPUs are for placement only where CUDA is absent: a worker given
    # one computes on the CPU only when told to (else it fails: test_pick_device)
    cpu = [] if torch.cuda.is_available() else ["train.device=cpu"]
    cfg = cfg_of(f"dist.workers={workers}", "dist.gpus_per_worker=0.5", *cpu)
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.fit(progress=False)
        info = trainer.backend.info
    finally:
        trainer.close()
    assert_same_params(trainer.learner.module.state_dict(), reference)
    # placement: each worker got half a logical GPU; with no CUDA it computes on the CPU, as told
    assert len(info) == workers and all(i["gpu_ids"] for i in info.values())
    assert all(i["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") for i in info.values())
    row = metrics(tmp_path)[-1]
    for key in ("sampling_s", "compute_s", "transfer_s", "weighting_s", "update_s", "step_s"):
        assert row[key] >= 0
    assert row["exchange_bytes"] > 0 and row["worker_restarts"] == 0


@pytest.mark.ray
def test_sketch_exchange(ray_session):
    """With NaN in task 1 of every step: mean weighting gives exactly the in-process direction
    (the weights do not depend on the sketch); cosine weighting gives weights within the
    stated bound of the exact ones; both move far fewer bytes than the exact exchange would."""
    from amfs_dist.distributed import RayBackend

    cfg = cfg_of("dist.workers=2", "dist.exchange=sketch", "dist.sketch_dim=256")
    factory = faulty_source_factory(nan_tasks=[(s, 1) for s in range(3)])
    local = InProcessBackend(cfg, source=factory(cfg))
    flat = local.learner.flat_params()
    ids = list(range(4))
    mean = lambda v: task_weights(v, "mean")
    cosine = lambda v: task_weights(v, "cosine")
    backend = RayBackend(cfg, source_factory=factory)
    try:
        for step, weigh in [(0, mean), (1, cosine)]:
            res = backend.direction(flat, step, ids, weigh)
            tg, timings = local.task_gradients(flat, step, ids)
            exact = weighted_direction(tg, weigh, timings)
            assert res.finite.tolist() == [True, False, True, True] and res.bad_tasks == 1
            torch.testing.assert_close(res.loss[res.finite], exact.loss[exact.finite])
            if weigh is mean:
                torch.testing.assert_close(res.direction, exact.direction, atol=1e-6, rtol=1e-5)
            else:  # the bounds of test_sketch_weights_approximate_exact_weights
                da = (res.weights.agreement - exact.weights.agreement).abs().max()
                assert da <= 4 * math.sqrt(2 / 256)
                l1 = (res.weights.weights - exact.weights.weights).abs().sum()
                assert l1 <= 2 * 3 * da / res.weights.agreement.clamp_min(0).sum() + 1e-9
                # G' - G = sum_i (w'_i - w_i) g_i over the good tasks
                largest = tg.grads[exact.finite].norm(dim=1).max()
                assert (res.direction - exact.direction).norm() <= l1 * largest * 1.001 + 1e-6
            # params to 2 workers, [T, d] sketches + loss/acc/finite back, weights out, 2 sums [P]
            P, T = flat.numel(), len(ids)
            assert res.timings["exchange_bytes"] == 2 * 4 * P + T * (256 * 4 + 9) + T * 4 + 2 * 4 * P  # float32 weights out
    finally:
        backend.close()


@pytest.mark.ray
def test_nan_tasks_and_bad_steps_with_workers(ray_session, tmp_path):
    """The in-process NaN scenario on 2 workers: same metrics, same checkpointed parameters."""
    from amfs_dist.distributed import RayBackend

    cfg = cfg_of("train.steps=8", "train.max_bad_steps=2", "dist.workers=2")
    options = dict(nan_tasks=[(1, 0), (1, 2)], nan_steps=[3, 4])
    with pytest.raises(TrainingError, match="max_bad_steps"):
        lifecycle.train(cfg, tmp_path / "ray", progress=False,
                     backend=RayBackend(cfg, source_factory=faulty_source_factory(**options)))
    in_process = cfg.replace(**{"dist.workers": 0})
    with pytest.raises(TrainingError):
        lifecycle.train(in_process, tmp_path / "local", progress=False,
                     backend=InProcessBackend(in_process,
                                              source=faulty_source_factory(**options)(in_process)))
    rows = metrics(tmp_path / "ray")
    assert [r["bad_tasks"] for r in rows] == [0, 2, 0, 4, 4]
    assert [r["skipped"] for r in rows] == [False, False, False, True, True]
    a = torch.load(tmp_path / "ray" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "local" / CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == 5
    assert_same_params(a["model"], b["model"])


@pytest.mark.ray
def test_killed_workers_are_replaced_and_the_run_is_unchanged(ray_session, reference, tmp_path):
    """Worker 1 is SIGKILLed between steps 1 and 2 (pid from the actor), and a worker kills
    itself while drawing step 3's tasks (mid-step: they are drawn while step 2 computes): both
    are replaced, their shards recomputed, and the run ends with the uninterrupted run's
    parameters."""
    from amfs_dist.distributed import RayBackend

    cfg = cfg_of("dist.workers=2")
    once = tmp_path / "once"
    once.mkdir()
    backend = RayBackend(cfg, source_factory=faulty_source_factory(kill_steps=[3], once_dir=str(once)))
    killed = []
    lifecycle.train(cfg, tmp_path / "run", progress=False, backend=backend,
                 on_step=kill_worker_after(backend, 2, 1, killed))
    assert killed and (once / "kill-step3").exists()
    rows = metrics(tmp_path / "run")
    restarts = [r["worker_restarts"] for r in rows]
    assert restarts[:2] == [0, 0] and restarts[2] >= 1 and restarts[3:] == [2, 2]
    assert_same_params(model_state(tmp_path / "run"), reference)


@pytest.mark.ray
def test_a_worker_that_keeps_failing_stops_the_run_with_a_checkpoint(ray_session, tmp_path):
    from amfs_dist.distributed import RayBackend, WorkerFailedError

    cfg = cfg_of("dist.workers=1", "dist.max_worker_restarts=1", "train.steps=6")
    backend = RayBackend(cfg, source_factory=faulty_source_factory(kill_steps=[2]))
    with pytest.raises(WorkerFailedError, match=r"failed 2 times.*max_worker_restarts=1"):
        lifecycle.train(cfg, tmp_path, progress=False, backend=backend)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    # step 2's tasks are drawn while step 1 computes: the run stops at step 1 (or 2)
    assert state["step"] in (1, 2) and len(metrics(tmp_path)) == state["step"]


@pytest.mark.ray
def test_a_hung_worker_times_out_instead_of_hanging(ray_session, tmp_path):
    from amfs_dist.distributed import RayBackend, WorkerFailedError

    cfg = cfg_of("dist.workers=1", "dist.max_worker_restarts=0", "dist.timeout_s=2")
    backend = RayBackend(cfg, source_factory=faulty_source_factory(hang_steps=[1]))
    with pytest.raises(WorkerFailedError, match="no answer .* within dist.timeout_s=2"):
        lifecycle.train(cfg, tmp_path, progress=False, backend=backend)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 1


@pytest.mark.ray
def test_killed_driver_resumes_exactly(ray_session, tmp_path):
    """SIGKILL an `amfs train dist.workers=1` process (the driver) mid-run; `amfs train
    --resume` finishes it with the parameters of an uninterrupted run."""
    steps = 20
    args = TINY + [f"train.steps={steps}", "train.checkpoint_every=3", "dist.workers=1",
                   "dist.cpus_per_worker=0.5"]
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "amfs_dist", "train", "--no-progress"]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(cmd + ["--out", str(run)] + args, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / CHECKPOINT).exists() and (run / "metrics.jsonl").exists() \
                    and len((run / "metrics.jsonl").read_text().splitlines()) >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, ("the run ended before it could be killed: "
                                     + (tmp_path / "killed.log").read_text()[-3000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (run / "result.json").exists()
    killed_at = torch.load(run / CHECKPOINT, weights_only=True)["step"]
    assert 3 <= killed_at < steps

    resume_to_the_end(cmd, run, env, steps, timeout=180)

    reference = train_in_process(load_config(None, args[:-2]), tmp_path / "reference")
    assert_same_params(model_state(run), reference)


@pytest.mark.ray
def test_a_worker_that_cannot_start_fails_at_once(ray_session):
    """A data path missing on the workers' nodes: a clear error naming it, no retries."""
    from amfs_dist.distributed import RayBackend, WorkerFailedError

    cfg = cfg_of("dist.workers=1", "data.source=/nonexistent/amfs-store")
    with pytest.raises(WorkerFailedError, match="raised during 'start'.*nonexistent/amfs-store"):
        RayBackend(cfg)
