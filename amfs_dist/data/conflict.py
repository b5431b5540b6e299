"""Conflicting tasks (data.conflict_fraction): training tasks that teach the wrong mapping.

At every step a seeded choice of round(fraction * meta_batch) of the task ids 0..meta_batch-1 is
conflicting; which ones depends on (seed, step) alone, and how each is corrupted on
(seed, step, task id) alone, so every worker count gives the same tasks and the driver can name
them without asking the workers. Only the query labels of training episodes change:

- permute: the query labels go through a derangement of the classes drawn for the task, so the
  query set says class pi(k) where the support set says k;
- noise: half of the query labels (a seeded choice) are moved to another class drawn uniformly.

Validation and test episodes are never corrupted.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from amfs_dist.data.episodes import Episodes, task_rng

NOISE_SHARE = 0.5  # share of a noise task's query labels that are replaced


def corrupted_tasks(seed: int, step: int, meta_batch: int, fraction: float) -> list[int]:
    """The conflicting task ids of `step`, sorted: round(fraction * meta_batch) of 0..meta_batch-1."""
    count = int(round(fraction * meta_batch))
    if count == 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"conflict"), step]))
    return sorted(int(t) for t in rng.choice(meta_batch, size=count, replace=False))


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly drawn permutation of 0..n-1 without a fixed point (n >= 2), by rejection."""
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def corrupt_labels(y: np.ndarray, ways: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """One task's query labels, corrupted by `mode` (permute or noise)."""
    if mode == "permute":
        return derangement(rng, ways)[y]
    if mode == "noise":
        out = y.copy()
        rows = rng.choice(len(y), size=int(round(NOISE_SHARE * len(y))), replace=False)
        out[rows] = (y[rows] + rng.integers(1, ways, size=len(rows))) % ways  # never the same class
        return out
    raise ValueError(f"data.conflict: unknown mode {mode!r}")


class ConflictingTasks:
    """Wraps a task source: its training episodes carry conflicting tasks and `corrupted` flags."""

    def __init__(self, source, fraction: float, mode: str, seed: int, meta_batch: int):
        self.source = source
        self.fraction, self.mode, self.seed, self.meta_batch = fraction, mode, seed, meta_batch

    def __getattr__(self, name):  # input_shape, ways, ... of the wrapped source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def sample(self, split: str, step: int, task_ids: Sequence[int], *args, **kwargs) -> Episodes:
        ep = self.source.sample(split, step, task_ids, *args, **kwargs)
        if split != "train":
            return ep
        chosen = set(corrupted_tasks(self.seed, step, self.meta_batch, self.fraction))
        flags = torch.tensor([int(t) in chosen for t in task_ids], dtype=torch.bool)
        yq = ep.yq.clone()
        for row in np.flatnonzero(flags.numpy()):
            rng = task_rng(self.seed, "train-conflict", step, int(task_ids[row]))
            yq[row] = torch.from_numpy(corrupt_labels(yq[row].numpy(), ep.ways, self.mode, rng))
        return dataclasses.replace(ep, yq=yq, corrupted=flags)
