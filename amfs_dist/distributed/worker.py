"""A shard worker: one Ray actor holding a model replica and the task source on its device.

It runs an InProcessBackend's `task_gradients` (one batched pass over its tasks) and ships
flat numbers only: the [tasks, P] gradient matrix (exact exchange), or their sketches and
then one weighted sum [P] (sketch exchange), with per-task loss/acc and its own timings.
Arrays go out as numpy, which Ray's object store moves without pickling copies; everything
per task stays on the worker's device until that one device-to-host copy.

The class is plain Python (RayBackend wraps it with ray.remote), so it is testable alone.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from amfs_dist.algorithms.outer import combine
from amfs_dist.backend import InProcessBackend, finite_part, finite_rows, set_deterministic
from amfs_dist.config import Config, resolve
from amfs_dist.distributed.sketch import CountSketch
from amfs_dist.errors import TrainingError, UserError

log = logging.getLogger("amfs_dist.distributed")
# the oldest Linux driver that runs the CUDA 13.0 wheels of the pinned torch
CUDA_DRIVER_NEEDED = "580"


def _assigned_gpus() -> list:
    try:
        import ray
        if ray.is_initialized():
            return list(ray.get_gpu_ids())
    except Exception:  # not inside Ray: no GPU was assigned by it
        pass
    return []


def pick_device(cfg: Config, assigned_gpus: Sequence | None = None) -> torch.device:
    """cuda if Ray gave this worker a GPU (and train.device allows it), else cpu; a GPU that
    CUDA cannot use fails the worker (TrainingError) rather than leave it computing on the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the worker's GPU(s), so its first GPU is cuda:0; with a
    fractional dist.gpus_per_worker, workers share that GPU. A worker uses one device: given
    several GPUs it refuses (they would sit idle) rather than use cuda:0 alone.
    """
    gpus = _assigned_gpus() if assigned_gpus is None else list(assigned_gpus)
    if len(gpus) > 1 and cfg.train.device != "cpu":
        raise UserError(f"dist.gpus_per_worker: a shard worker was given {len(gpus)} GPUs "
                        f"({gpus}) but computes on one; use one worker per GPU (dist.workers)")
    if cfg.train.device == "cpu" or not gpus:
        if cfg.train.device == "cuda" and not gpus:
            log.warning("train.device=cuda but this shard worker has no GPU "
                        "(dist.gpus_per_worker=0): computing on the CPU")
        return torch.device("cpu")
    if not torch.cuda.is_available():  # computing on the CPU would be ~100x slower, silently
        import socket
        raise TrainingError(
            f"shard worker on {socket.gethostname()} was given GPU(s) {gpus} but CUDA does not "
            f"work there (torch {torch.__version__}, built for CUDA {torch.version.cuda}: it "
            f"needs NVIDIA driver {CUDA_DRIVER_NEEDED} or newer; check `nvidia-smi` on that "
            f"node), or set train.device=cpu to compute on its CPUs")
    return torch.device("cuda", 0)


def _as_tensor(array) -> torch.Tensor:
    """A read-only numpy array from the object store as a tensor, without a copy."""
    array = np.asarray(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": it is never written
        return torch.from_numpy(array)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


class ShardWorker:
    """The actor body. Methods take flat parameters (a numpy array), a step and task ids."""

    def __init__(self, cfg_values: dict, index: int,
                 source_factory: Callable[[Config], object] | None = None):
        self.cfg = resolve(cfg_values, {})
        set_deterministic(self.cfg)
        self.index = index
        self.device = pick_device(self.cfg)
        if self.device.type == "cpu" and not self.cfg.train.deterministic:
            torch.set_num_threads(max(1, int(self.cfg.dist.cpus_per_worker)))
        source = source_factory(self.cfg) if source_factory is not None else None
        self.backend = InProcessBackend(self.cfg, source=source, device=self.device)
        self.num_params = self.backend.learner.layout.size
        self._sketch: CountSketch | None = None
        self._cache: tuple | None = None  # (round, step, task ids) -> grads kept for phase 2

    # -- introspection -------------------------------------------------------------------------
    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {"index": self.index, "pid": os.getpid(), "device": str(self.device),
                "gpu_ids": [str(g) for g in _assigned_gpus()], "num_params": self.num_params,
                "node_id": ctx.get_node_id() if ctx else None,
                "ip": ray.util.get_node_ip_address() if ctx else None}

    def evaluate(self, flat_params, split: str, batches: list[list[int]], queries: int) -> dict:
        """evaluate.score_batches of these episode batches, with the given parameters."""
        from amfs_dist.evaluate import score_batches
        learner = self.backend.learner
        return score_batches(learner, self.backend.source, split, batches, queries,
                             params=learner.load_flat(_as_tensor(flat_params)))

    # -- exact exchange ------------------------------------------------------------------------
    def gradients(self, flat_params, step: int, task_ids: list[int]):
        """(grads [t, P] float32, loss [t], acc [t], timings) for this shard's tasks."""
        tg, timings = self.backend.task_gradients(_as_tensor(flat_params), step, task_ids)
        return _to_numpy(tg.grads), _to_numpy(tg.loss), _to_numpy(tg.acc), timings

    # -- sketch exchange -----------------------------------------------------------------------
    def _sketcher(self) -> CountSketch:
        if self._sketch is None:
            self._sketch = CountSketch(self.num_params, self.cfg.dist.sketch_dim, self.cfg.seed,
                                       self.device)
        return self._sketch

    def _compute(self, flat_params, step, task_ids, round_id):
        tg, timings = self.backend.task_gradients(_as_tensor(flat_params), step, task_ids)
        finite = finite_rows(tg)
        self._cache = (round_id, step, tuple(task_ids), tg.grads, finite)
        return tg, finite, timings

    def sketches(self, flat_params, step: int, task_ids: list[int], round_id: int):
        """Phase 1: (sketches [t, d], loss [t], acc [t], finite [t] bool, timings); the
        gradients stay here for phase 2."""
        tg, finite, timings = self._compute(flat_params, step, task_ids, round_id)
        t0 = time.perf_counter()
        sk = self._sketcher()(tg.grads)  # chunked: no [t, P] temporary
        sk[~finite] = 0.0
        out = _to_numpy(sk), _to_numpy(tg.loss), _to_numpy(tg.acc), _to_numpy(finite)
        timings["compute_s"] += time.perf_counter() - t0
        return (*out, timings)

    def weighted_sum(self, params_box: list, step: int, task_ids: list[int], round_id: int,
                     weights) -> tuple[np.ndarray, dict]:
        """Phase 2: sum_i w_i g_i over this shard's finite tasks, [P] float32.

        params_box holds the step's ObjectRef, fetched only if this worker lacks the phase-1
        gradients (it replaced one that died in between): then it recomputes them.
        """
        timings = {"sampling_s": 0.0, "compute_s": 0.0}
        key = (round_id, step, tuple(task_ids))
        if self._cache is None or self._cache[:3] != key:
            import ray
            _, finite, timings = self._compute(ray.get(params_box[0]), step, task_ids, round_id)
        _, _, _, grads, finite = self._cache
        t0 = time.perf_counter()
        w = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=grads.device)
        # 0 * NaN is NaN: the bad rows are left out, not weighted by 0
        total = _to_numpy(combine(finite_part(grads, finite), finite_part(w, finite)))
        self._cache = None
        timings["compute_s"] += time.perf_counter() - t0
        return total, timings
