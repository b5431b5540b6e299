"""Where a step's per-task meta-gradients are computed, and how they become one update direction.

A backend answers `direction(flat_params, step, task_ids, weigh)`: it computes the tasks'
meta-gradients, drops tasks whose gradient is not finite, asks `weigh` for the weights of the
rest (O-AMFS or the mean: the backend does not know which), and returns G = sum_i w_i g_i.
InProcessBackend is dist.workers=0; the Ray backend (amfs_dist.distributed) spreads the same
work over shard workers, each of which runs an InProcessBackend's `task_gradients`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from amfs_dist.algorithms.learner import MetaLearner, TaskGradients
from amfs_dist.algorithms.outer import TaskWeights, combine
from amfs_dist.config import Config

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


class GradientBackend(Protocol):
    def direction(self, flat_params: torch.Tensor, step: int, task_ids: Sequence[int],
                  weigh: Weigh) -> StepResult: ...

    def close(self) -> None: ...


def finite_rows(tg: TaskGradients) -> torch.Tensor:
    return torch.isfinite(tg.grads).all(1) & torch.isfinite(tg.loss)


def finite_part(rows: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """The rows of the finite tasks; no copy when every task is finite."""
    return rows if bool(finite.all()) else rows[finite]


def weighted_direction(tg: TaskGradients, weigh: Weigh, timings: dict[str, float]) -> StepResult:
    """The exact exchange: weights from the full gradients of the finite tasks, then G."""
    t0 = time.perf_counter()
    finite = finite_rows(tg)
    weights = direction = None
    if bool(finite.any()):
        good = finite_part(tg.grads, finite)
        weights = weigh(good)
        direction = combine(good, weights.weights.to(good.device))
    timings["weighting_s"] = timings.get("weighting_s", 0.0) + time.perf_counter() - t0
    return StepResult(direction, tg.loss, tg.acc, finite, weights, timings)


class InProcessBackend:
    """Computes meta-gradients in this process with one vmapped pass over the step's tasks."""

    def __init__(self, cfg: Config, learner: MetaLearner | None = None, source=None,
                 device: str | torch.device | None = None):
        if source is None:
            from amfs_dist.data import make_task_source
            source = make_task_source(cfg)
        self.source = source
        self.learner = learner or MetaLearner(cfg, source.input_shape, device or "cpu")

    def task_gradients(self, flat_params: torch.Tensor, step: int, task_ids: Sequence[int]
                       ) -> tuple[TaskGradients, dict[str, float]]:
        t0 = time.perf_counter()
        episodes = self.source.sample("train", step, task_ids)
        t1 = time.perf_counter()
        tg = self.learner.meta_gradients(self.learner.load_flat(flat_params), episodes)
        if tg.grads.device.type == "cuda":
            torch.cuda.synchronize(tg.grads.device)
        t2 = time.perf_counter()
        return tg, {"sampling_s": t1 - t0, "compute_s": t2 - t1}

    def direction(self, flat_params, step, task_ids, weigh) -> StepResult:
        tg, timings = self.task_gradients(flat_params, step, task_ids)
        timings["transfer_s"] = 0.0
        return weighted_direction(tg, weigh, timings)

    def close(self) -> None:
        pass
