"""RayBackend: the step's tasks sharded over Ray actors, weighted over all of them (docs/scaling.md).

Each step the driver puts the flat meta-parameters in the object store once, gives worker w
the task ids w, w+W, w+2W, ... (round robin), and gathers:

- exchange=exact: each worker's [tasks, P] gradient matrix; the driver reassembles the rows in
  task order (one copy, into a preallocated [T, P] tensor) and calls `weighted_direction`, so
  the O-AMFS weights are over all T tasks of the step, exactly as in-process.
- exchange=sketch: each worker's count sketches [tasks, d] (distributed.sketch); the driver
  computes the weights from them with the same `weigh`, sends each worker its tasks' weights,
  and adds the workers' weighted local sums [P]. T x P never crosses the network.

Faults: a worker that dies (or does not answer within dist.timeout_s) is killed, replaced and
its shard recomputed from (params, step, task ids), which gives the same numbers, so the run
goes on as if nothing happened. After dist.max_worker_restarts replacements of one worker the
step raises WorkerFailedError (the trainer then checkpoints and stops). An exception raised by
the worker's own code (a bug, a bad data path) is not retried: it is raised at once.

A replacement waits for a node with room for it at most dist.replace_timeout_s (a lost node's
workers may find none). Past that, an elastic run (dist.min_workers below dist.workers) goes
on with the workers left, at least dist.min_workers: the step is recomputed with the task ids
sharded over them, and the replacement, still pending in Ray, rejoins between steps once a node
takes it. Otherwise the run stops with WorkerFailedError.

Actors are created with default scheduling, so inside a Ray Tune trial they land in the
trial's placement group (the group's bundles must hold dist.workers x {CPU, GPU} per worker).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from amfs_dist.algorithms.learner import TaskGradients
from amfs_dist.backend import (
    StepResult,
    Weigh,
    deterministic_block,
    finite_weights,
    in_task_order,
    weighted_direction,
)
from amfs_dist.config import Config
from amfs_dist.distributed.raycompat import actor_placed
from amfs_dist.distributed.worker import ShardWorker, _as_tensor
from amfs_dist.errors import UserError, WorkerFailedError

log = logging.getLogger("amfs_dist.distributed")

START_GRACE_S = 300.0  # added to dist.timeout_s for a worker's first answer (its start-up)
PLACEMENT_POLL_S = 0.5  # how often a replacement's placement is looked up


def shard(task_ids: Sequence[int], workers: int) -> list[list[int]]:
    """Round robin: worker w gets task_ids[w], task_ids[w + W], ..."""
    return [list(task_ids[w::workers]) for w in range(workers)]


def _init_ray() -> bool:
    """Join RAY_ADDRESS's cluster or start a private loopback-only one (distributed.cluster);
    True when this process connected here (close() then shuts Ray down)."""
    from amfs_dist.distributed.cluster import init_ray
    return init_ray(log_to_driver=True)


def _check_workers_fit(cfg: Config) -> None:
    """Refuse at once shard workers the cluster can never place. Inside a placement group (a
    Tune trial) the group was checked when the sweep started and holds the workers' bundles."""
    import ray
    if ray.util.get_current_placement_group() is not None:
        return
    from amfs_dist.distributed.cluster import check_resources
    d = cfg.dist
    worker = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker else {})}
    needed = min_workers(cfg)
    asked = f"dist.workers={d.workers}" if needed == d.workers else f"dist.min_workers={needed}"
    check_resources([worker] * needed,
                    f"{asked} x (dist.cpus_per_worker={d.cpus_per_worker:g}, "
                    f"dist.gpus_per_worker={d.gpus_per_worker:g})")


def check_settings(cfg: Config) -> None:
    """What no cluster could run, refused before Ray is joined (every exchange on Ray)."""
    if cfg.dist.gpus_per_worker > 1:
        raise UserError(f"dist.gpus_per_worker={cfg.dist.gpus_per_worker:g}: a worker computes "
                        f"on one GPU; use one worker per GPU (dist.workers)")
    min_workers(cfg)


def min_workers(cfg: Config) -> int:
    """dist.min_workers, where 0 means dist.workers (not elastic)."""
    if cfg.dist.min_workers > cfg.dist.workers:
        raise UserError(f"dist.min_workers={cfg.dist.min_workers} is more than "
                        f"dist.workers={cfg.dist.workers}")
    return cfg.dist.min_workers or cfg.dist.workers


class _Shrunk(Exception):
    """A worker was lost and no node had room for its replacement: the step is recomputed with
    the workers left."""


class RayBackend:
    worker_class = ShardWorker
    waiting_for_workers = False

    def __init__(self, cfg: Config, source_factory: Callable | None = None):
        import ray
        from ray import exceptions as rex

        if cfg.dist.workers < 1:
            raise ValueError("RayBackend needs dist.workers >= 1 (0 runs in-process)")
        check_settings(cfg)
        self.cfg = cfg
        self.num_workers = cfg.dist.workers
        self.min_workers = min_workers(cfg)
        self._waiting: set[int] = set()  # slots whose replacement no node had room for yet
        self.exchange = cfg.dist.exchange
        self.timeout = cfg.dist.timeout_s
        self.max_restarts = cfg.dist.max_worker_restarts
        self._ray, self._rex = ray, rex
        self._owns_ray = _init_ray()
        self._actor = ray.remote(self.worker_class).options(
            num_cpus=cfg.dist.cpus_per_worker, num_gpus=cfg.dist.gpus_per_worker,
            max_restarts=0, max_task_retries=0)
        self._cfg_values = cfg.to_flat()
        self._source_factory = source_factory
        self.restarts = [0] * self.num_workers
        self._fresh = [True] * self.num_workers
        self._round = 0
        try:
            _check_workers_fit(cfg)  # before any actor: they would wait for dist.timeout_s
            self.workers = [self._new_actor(w) for w in range(self.num_workers)]
            if self.min_workers < self.num_workers:
                self._await_placement(list(range(self.num_workers)), "its workers")
            self.info = self._gather({w: (lambda w=w: self.workers[w].info.remote())
                                      for w in self.live()}, what="start", work=False)
        except BaseException:
            self.close()
            raise
        self.num_params = next(iter(self.info.values()))["num_params"]
        log.info("RayBackend: %d shard workers on %s, exchange=%s", self.num_workers,
                 [i["device"] for i in self.info.values()], self.exchange)

    # -- workers ----------------------------------------------------------------------------------
    def _new_actor(self, w: int):
        return self._actor.remote(self._cfg_values, w, self._source_factory)

    def live(self) -> list[int]:
        """The slots with a worker (all of them unless an elastic run lost some)."""
        return [w for w in range(self.num_workers) if w not in self._waiting]

    def worker_pids(self) -> list[int]:
        """The current workers' process ids (after any replacement)."""
        info = self._gather({w: (lambda w=w: self.workers[w].info.remote())
                             for w in self.live()}, what="info", work=False)
        self.info.update(info)
        return [info[w]["pid"] for w in self.live()]

    def _replace(self, w: int, why: str) -> None:
        self.restarts[w] += 1
        if self.restarts[w] > self.max_restarts:
            raise WorkerFailedError(
                f"shard worker {w} failed {self.restarts[w]} times, more than "
                f"dist.max_worker_restarts={self.max_restarts}; last failure: {why}. The run "
                f"stops here; its checkpoint is kept (resume with `amfs train --resume RUN_DIR`)")
        log.warning("shard worker %d failed (%s); replacing it (restart %d of at most %d) and "
                    "recomputing its shard", w, why, self.restarts[w], self.max_restarts)
        try:
            self._ray.kill(self.workers[w], no_restart=True)
        except Exception:
            pass
        self.workers[w] = self._new_actor(w)
        self._fresh[w] = True
        self._await_placement([w], f"shard worker {w}'s replacement")
        if w in self._waiting:
            raise _Shrunk()

    def _await_placement(self, slots: list[int], what: str) -> None:
        """Until a node has taken the actors of `slots`. With no room anywhere (a node was lost
        and the others are full) Ray would keep one pending for ever: the wait is bounded by
        dist.replace_timeout_s, said when it starts. Past it, an elastic run goes on without
        the slots still pending if dist.min_workers are left (they rejoin between steps once
        placed, `grow`); otherwise the run stops. `waiting_for_workers` is set meanwhile (the
        trainer stops at once on a stop signal then: no step ends soon)."""
        bound = self.cfg.dist.replace_timeout_s
        deadline = time.monotonic() + bound
        pending = [w for w in slots if not actor_placed(self.workers[w])]
        if not pending:
            return
        d = self.cfg.dist
        log.warning("waiting up to %g s (dist.replace_timeout_s) for a node with room for %s "
                    "(%g CPU, %g GPU each)", bound, what, d.cpus_per_worker, d.gpus_per_worker)
        self.waiting_for_workers = True
        try:
            while pending and time.monotonic() < deadline:
                time.sleep(PLACEMENT_POLL_S)
                pending = [w for w in pending if not actor_placed(self.workers[w])]
        finally:
            self.waiting_for_workers = False
        if not pending:
            log.warning("%s placed after %.1f s", what, bound - (deadline - time.monotonic()))
            return
        left = len([w for w in self.live() if w not in pending])
        if left < self.min_workers:
            raise WorkerFailedError(
                f"no node had room for {what} within dist.replace_timeout_s={bound:g} s "
                f"({left} of dist.min_workers={self.min_workers} workers left). The run stops "
                f"here; its checkpoint is kept (resume with `amfs train --resume RUN_DIR`)")
        self._waiting.update(pending)
        log.warning("no node had room for %s within dist.replace_timeout_s=%g s: going on with "
                    "%d workers (dist.min_workers=%d); shard worker(s) %s rejoin once placed",
                    what, bound, left, self.min_workers, pending)

    def grow(self) -> None:
        """Between steps: the waiting slots whose actor a node has taken rejoin the run."""
        for w in [w for w in self._waiting if actor_placed(self.workers[w])]:
            self._waiting.discard(w)
            self._fresh[w] = True
            log.warning("shard worker %d placed: %d workers from this step on", w,
                        len(self.live()))

    def _classify(self, err: BaseException) -> str | None:
        """A one-line reason if `err` is a recoverable worker loss, None if it must be raised."""
        rex = self._rex
        if isinstance(err, rex.RayActorError):
            if err.actor_init_failed:
                return None
            return f"{type(err).__name__}: {str(err).splitlines()[0]}"
        if isinstance(err, (rex.WorkerCrashedError, rex.ObjectLostError, rex.NodeDiedError,
                            rex.OutOfMemoryError, rex.LocalRayletDiedError)):
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return None

    def _deadline(self, w: int) -> float:
        """A fresh worker also gets START_GRACE_S to start (import torch, load data, init CUDA,
        warm up)."""
        return time.monotonic() + self.timeout + (START_GRACE_S if self._fresh[w] else 0.0)

    def _answers(self, pending: dict, what: str):
        """For each call in pending {ref: (w, deadline)} (which may grow meanwhile), in the order
        they end: (w, result, None), or (w, None, why) for a worker lost (dead, or silent past
        its deadline). An exception raised by the worker's own code is raised here."""
        ray = self._ray
        while pending:
            soonest = min(deadline for _, deadline in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, soonest - time.monotonic()))
            if not ready:
                now = time.monotonic()
                for ref in [r for r, (_, d) in pending.items() if d <= now]:
                    w, _ = pending.pop(ref)
                    yield w, None, f"no answer to '{what}' within dist.timeout_s={self.timeout:g} s"
                continue
            w, _ = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except self._rex.RayError as err:
                why = self._classify(err)
                if why is None:
                    raise WorkerFailedError(f"shard worker {w} raised during '{what}': "
                                            f"{_first_lines(err)}") from err
                yield w, None, why
            else:
                yield w, result, None

    def _gather(self, calls: dict[int, Callable], what: str, work: bool = True) -> dict[int, object]:
        """Run calls[w]() on each worker and collect the results; replace lost workers and
        resubmit their call until it succeeds or the worker's restarts run out. A worker's
        first answer to real work (work=True) ends its start-up grace: that one includes the
        first pass's warm-up."""
        pending: dict = {call(): (w, self._deadline(w)) for w, call in calls.items()}
        results: dict[int, object] = {}
        for w, result, lost in self._answers(pending, what):
            if lost:
                self._replace(w, lost)  # raises _Shrunk when the run goes on without w
                pending[calls[w]()] = (w, self._deadline(w))
                continue
            results[w] = result
            if work:
                self._fresh[w] = False
        return results

    # -- one step ---------------------------------------------------------------------------------
    def direction(self, flat_params: torch.Tensor, step: int, task_ids: Sequence[int],
                  weigh: Weigh) -> StepResult:
        """One step's direction, by the workers there are: a worker lost without room for its
        replacement in an elastic run makes the step start again with the others (sharding by
        task id gives the same numbers for any worker count)."""
        compute = self._sketch_direction if self.exchange == "sketch" else self._exact_direction
        while True:
            self.grow()
            try:
                result = compute(flat_params, step, task_ids, weigh)
            except _Shrunk:
                continue
            result.timings["workers"] = len(self.live())
            return result

    def _put_params(self, flat_params: torch.Tensor):
        array = flat_params.detach().to("cpu", torch.float32).contiguous().numpy()
        return self._ray.put(array), array.nbytes

    def _active(self, task_ids) -> dict[int, tuple[int, list[int]]]:
        """worker -> (its shard's index k, the task ids k, k + n, ... of n live workers), for
        the workers with tasks."""
        live = self.live()
        return {w: (k, ids) for k, (w, ids) in enumerate(zip(live, shard(task_ids, len(live))))
                if ids}

    def _in_order(self, out: dict, field: int, total: int) -> torch.Tensor:
        """Field `field` of the live workers' answers, back in task order (a worker without
        tasks, when there are more workers than tasks, holds an empty shard)."""
        answers = [out.get(w) for w in self.live()]
        like = _as_tensor(next(a for a in answers if a is not None)[field])
        return in_task_order([like[:0] if a is None else _as_tensor(a[field]) for a in answers],
                             total)

    def _exact_direction(self, flat_params, step, task_ids, weigh) -> StepResult:
        t0 = time.perf_counter()
        params_ref, params_bytes = self._put_params(flat_params)
        active = self._active(task_ids)
        out = self._gather({w: (lambda w=w, ids=ids, p=params_ref: self.workers[w].gradients.remote(
            p, step, ids)) for w, (_, ids) in active.items()},
            what=f"gradients step {step}")
        T = len(task_ids)
        grads, loss, acc = (self._in_order(out, f, T) for f in range(3))
        shipped = [sum(a.nbytes for a in o[:3]) for o in out.values()]
        worker_timings = [o[3] for o in out.values()]
        del out, params_ref
        timings = self._timings(time.perf_counter() - t0, [worker_timings])
        timings["exchange_bytes"] = params_bytes * len(active) + sum(shipped)
        timings["worker_bytes"] = params_bytes + max(shipped)
        return weighted_direction(TaskGradients(grads, loss, acc), weigh, timings,
                                  deterministic_block(self.cfg))

    def _sketch_direction(self, flat_params, step, task_ids, weigh) -> StepResult:
        self._round += 1
        round_id = self._round
        t0 = time.perf_counter()
        params_ref, params_bytes = self._put_params(flat_params)
        active = self._active(task_ids)
        out = self._gather({w: (lambda w=w, ids=ids, p=params_ref: self.workers[w].sketches.remote(
            p, step, ids, round_id)) for w, (_, ids) in active.items()},
            what=f"sketches step {step}")
        T, W, d = len(task_ids), len(self.live()), self.cfg.dist.sketch_dim
        sketches, loss, acc, finite = (self._in_order(out, f, T) for f in range(4))
        moved = params_bytes * len(active) + sum(sum(a.nbytes for a in o[:4]) for o in out.values())
        phase1 = [o[4] for o in out.values()]
        del out
        gather1 = time.perf_counter() - t0

        t1 = time.perf_counter()
        finite = finite & torch.isfinite(sketches).all(1)
        weights, full = finite_weights(finite, weigh, sketches)
        full_np = full.numpy()
        weighting = time.perf_counter() - t1

        direction = None
        phase2: list = []
        t2 = time.perf_counter()
        if weights is not None:
            sums = self._gather({w: (lambda w=w, k=k, ids=ids, p=params_ref: self.workers[w].weighted_sum.remote(
                [p], step, ids, round_id, full_np[k::W])) for w, (k, ids) in active.items()},
                what=f"weighted sums step {step}")
            direction = torch.zeros(self.num_params, dtype=torch.float32)
            for w in sorted(sums):  # a fixed order: the same sum whatever finishes first
                total, t = sums[w]
                direction += _as_tensor(total)
                moved += full_np[active[w][0]::W].nbytes + total.nbytes
                phase2.append(t)
            del sums
        gather2 = time.perf_counter() - t2
        del params_ref
        timings = self._timings(gather1 + gather2, [phase1, phase2])
        timings["weighting_s"] = weighting
        timings["exchange_bytes"] = moved
        # a worker: the parameters in, its sketches out, then its weights in and one sum out
        timings["worker_bytes"] = (params_bytes + max(len(ids) for _, ids in active.values())
                                   * (4 * d + 17) + (4 * self.num_params if weights is not None else 0))
        return StepResult(direction, loss, acc, finite, weights, timings)

    def evaluate(self, learner, split, episodes, queries, batch, progress=False) -> dict:
        """Validation or test episodes on the workers' devices: their batches round robin over
        the live workers (evaluate.episode_batches: the numbers do not depend on how many)."""
        from amfs_dist.evaluate import episode_batches, summarize
        params_ref, _ = self._put_params(learner.flat_params())
        batches = episode_batches(episodes, batch)
        while True:
            live = self.live()
            shards = {w: batches[k::len(live)] for k, w in enumerate(live)}
            calls = {w: (lambda w=w, b=b: self.workers[w].evaluate.remote(
                params_ref, split, b, queries)) for w, b in shards.items()}
            try:
                out = self._gather(calls, what=f"{split} episodes", work=False)
            except _Shrunk:
                continue
            return summarize([out[w] for w in live], episodes, learner.regression)

    def _timings(self, gather_s: float, rounds: list[list[dict]]) -> dict[str, float]:
        """sampling (drawing the episodes, in the background), sampling_wait (the part the step
        waited for) and compute: the slowest worker's (the critical path), summed over rounds;
        transfer: the rest of the gather wall time (put, scheduling, moving results, reassembly)."""
        sampling = wait = compute = 0.0
        for worker_timings in rounds:
            if not worker_timings:
                continue
            slowest = max(worker_timings, key=lambda t: t.get("sampling_wait_s", 0.0) + t["compute_s"])
            sampling += slowest.get("sampling_s", 0.0)
            wait += slowest.get("sampling_wait_s", 0.0)
            compute += slowest["compute_s"]
        return {"sampling_s": sampling, "sampling_wait_s": wait, "compute_s": compute,
                "transfer_s": max(0.0, gather_s - wait - compute),
                "worker_restarts": sum(self.restarts)}

    def close(self) -> None:
        for actor in getattr(self, "workers", []):
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.workers = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_ray = False


def _first_lines(err: BaseException, n: int = 6) -> str:
    text = str(err).strip().splitlines()
    # a RayTaskError's text is the worker's traceback: keep its head and the final line
    if len(text) > n:
        text = text[:2] + ["..."] + text[-(n - 3):]
    return " | ".join(line.strip() for line in text if line.strip())
