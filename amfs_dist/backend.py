"""The exchange: where a step's per-task meta-gradients are computed, and how they become one
update direction (docs/scaling.md).

Every exchange answers the same two calls, so the trainer has one step code path:

- `direction(flat_params, step, task_ids, weigh)`: compute the tasks' meta-gradients, drop
  the tasks whose gradient is not finite, ask `weigh` for the weights of the rest (O-AMFS or
  the mean: the exchange does not know which) and return G = sum_i w_i g_i;
- `evaluate(learner, split, episodes, queries, batch)`: validation or test episodes, on the
  devices the exchange computes on.

InProcessBackend is dist.workers=0. amfs_dist.distributed has the others: exact and sketch
on Ray actors with the trainer as the driver, and collective on Ray Train's worker group,
where every rank runs the trainer and the exchange is torch.distributed calls among them.
The pieces every exchange shares are here: the finite mask, the weights over the finite
tasks as a full [T] vector, and putting round-robin shards back in task order.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from amfs_dist.algorithms.learner import MetaLearner, TaskGradients
from amfs_dist.algorithms.outer import TaskWeights, block_gram, combine
from amfs_dist.config import Config
from amfs_dist.data.episodes import Episodes

Weigh = Callable[[torch.Tensor], TaskWeights]


@dataclass
class StepResult:
    direction: torch.Tensor | None  # [P]; None when no task was finite (the step is skipped)
    loss: torch.Tensor              # [T]
    acc: torch.Tensor               # [T]
    finite: torch.Tensor            # [T] bool
    weights: TaskWeights | None     # over the finite tasks
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bad_tasks(self) -> int:
        return int((~self.finite).sum())

    @property
    def skipped(self) -> bool:
        return self.direction is None


class Exchange(Protocol):
    def direction(self, flat_params: torch.Tensor, step: int, task_ids: Sequence[int],
                  weigh: Weigh) -> StepResult: ...

    def evaluate(self, learner: MetaLearner, split: str, episodes: int, queries: int,
                 batch: int, progress: bool = False) -> dict: ...

    def close(self) -> None: ...


def apply_direction(learner: MetaLearner, optimizer: torch.optim.Optimizer,
                    direction: torch.Tensor) -> None:
    """One optimiser step along `direction` [P] (the trainer's and every replica's update)."""
    grads = learner.layout.unflatten(direction.to(learner.device))
    for name, p in learner.params().items():
        p.grad = grads[name].to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def deterministic_block(cfg: Config) -> int:
    """train.deterministic: the Gram block size (dist.block_size), else 0 (off)."""
    return cfg.dist.block_size if cfg.train.deterministic else 0


def resolve_device(cfg: Config) -> str:
    """train.device, with auto meaning CUDA where there is one."""
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def set_deterministic(cfg: Config) -> None:
    """train.deterministic: deterministic kernels and one intra-op thread in this process
    (CPU reductions split over threads round differently with another thread count)."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)


def finite_rows(tg: TaskGradients) -> torch.Tensor:
    return torch.isfinite(tg.grads).all(1) & torch.isfinite(tg.loss)


def finite_part(rows: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """The rows of the finite tasks; no copy when every task is finite."""
    return rows if bool(finite.all()) else rows[finite]


def zero_bad_rows(rows: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """The rows with the non-finite ones zeroed (a copy only if there are any)."""
    return rows if bool(finite.all()) else torch.where(finite[:, None], rows, 0.0)


def in_task_order(parts: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Round-robin shards back in task order: parts[k] holds tasks k, k + n, k + 2n, ... of n
    shards (distributed.backend.shard); one copy into a [total, ...] tensor."""
    n, like = len(parts), parts[0]
    out = torch.empty((total, *like.shape[1:]), dtype=like.dtype, device=like.device)
    for k, part in enumerate(parts):
        out[k::n] = part
    return out


def finite_weights(finite: torch.Tensor, weigh: Weigh, vectors: torch.Tensor | None = None,
                   gram: torch.Tensor | None = None) -> tuple[TaskWeights | None, torch.Tensor]:
    """The weights of the finite tasks from their vectors (rows or sketches, [T, ...]) or from
    the Gram matrix of all T rows, and the same weights as a full float32 [T] vector (0 for
    the others); (None, zeros) when no task is finite (the step is skipped)."""
    full = torch.zeros(len(finite), dtype=torch.float32)
    if not bool(finite.any()):
        return None, full
    keep = finite.cpu()
    if gram is not None:
        weights = weigh(None, gram=finite_part(finite_part(gram, keep).T, keep))
    else:
        weights = weigh(finite_part(vectors, finite.to(vectors.device)))
    full[keep] = weights.weights.detach().cpu().float()
    return weights, full


def weighted_direction(tg: TaskGradients, weigh: Weigh, timings: dict[str, float],
                       block: int = 0) -> StepResult:
    """The exact exchange: weights from the full gradients of the finite tasks, then G.

    block > 0 (train.deterministic): the Gram matrix of all T rows (bad ones zeroed) summed
    over fixed blocks (block_gram) and G added in task order, as the collective exchange's
    workers do, so that both give the same bits whatever the worker count."""
    t0 = time.perf_counter()
    finite = finite_rows(tg)
    gram = block_gram(zero_bad_rows(tg.grads, finite), block) if block else None
    weights, _ = finite_weights(finite, weigh, tg.grads, gram)
    direction = None
    if weights is not None:
        good = finite_part(tg.grads, finite)
        direction = combine(good, weights.weights.to(good.device), ordered=bool(block))
    timings["weighting_s"] = timings.get("weighting_s", 0.0) + time.perf_counter() - t0
    return StepResult(direction, tg.loss, tg.acc, finite, weights, timings)


class Prefetcher:
    """Draws the next step's episodes (same task ids, step + 1) and moves them to the device in
    a background thread while this step computes: sampling leaves the critical path (numpy's
    large copies and torch's conversions release the GIL). Episodes depend on (seed, step,
    task id) only, so a prefetched batch is the one the step would draw itself."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="amfs-prefetch")
        self._next = None  # ((step, task ids), future of (episodes, seconds))

    def _draw(self, step: int, task_ids: tuple) -> tuple[Episodes, float]:
        t0 = time.perf_counter()
        ep = self.source.sample("train", step, list(task_ids)).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return ep, time.perf_counter() - t0

    def episodes(self, step: int, task_ids: Sequence[int]) -> tuple[Episodes, dict[str, float]]:
        """This step's episodes, and {"sampling_s": time to draw them, "sampling_wait_s": time
        this call waited for them (the part on the critical path)}."""
        ids = tuple(int(t) for t in task_ids)
        t0 = time.perf_counter()
        if self._next is not None and self._next[0] == (step, ids):
            ep, sampling = self._next[1].result()
        else:
            ep, sampling = self._draw(step, ids)
        wait = time.perf_counter() - t0
        self._next = ((step + 1, ids), self._pool.submit(self._draw, step + 1, ids))
        return ep, {"sampling_s": sampling, "sampling_wait_s": wait}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._next = None


class InProcessBackend:
    """Computes meta-gradients in this process with one vmapped pass over the step's tasks."""

    def __init__(self, cfg: Config, learner: MetaLearner | None = None, source=None,
                 device: str | torch.device | None = None):
        if source is None:
            from amfs_dist.data import make_task_source
            source = make_task_source(cfg)
        self.source = source
        self.learner = learner or MetaLearner(cfg, source.input_shape, device or "cpu")
        self.prefetcher = Prefetcher(source, self.learner.device)
        self.block = deterministic_block(cfg)

    def task_gradients(self, flat_params: torch.Tensor, step: int, task_ids: Sequence[int]
                       ) -> tuple[TaskGradients, dict[str, float]]:
        episodes, timings = self.prefetcher.episodes(step, task_ids)
        t1 = time.perf_counter()
        tg = self.learner.meta_gradients(self.learner.load_flat(flat_params), episodes)
        if tg.grads.device.type == "cuda":
            torch.cuda.synchronize(tg.grads.device)
        timings["compute_s"] = time.perf_counter() - t1
        return tg, timings

    def direction(self, flat_params, step, task_ids, weigh) -> StepResult:
        tg, timings = self.task_gradients(flat_params, step, task_ids)
        timings["transfer_s"] = 0.0
        return weighted_direction(tg, weigh, timings, self.block)

    def evaluate(self, learner, split, episodes, queries, batch, progress=False) -> dict:
        from amfs_dist.evaluate import evaluate_episodes
        return evaluate_episodes(learner, self.source, split, episodes, queries, batch,
                                 progress=progress)

    def close(self) -> None:
        self.prefetcher.close()
