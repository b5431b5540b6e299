"""Episodes: the unit every algorithm consumes, and the deterministic sampler behind them.

Every task's episode is drawn from a generator seeded by (seed, split, step, task id) alone,
so a step's tasks are the same whichever worker draws them, and a lost shard can be redrawn.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def task_rng(seed: int, split: str, step: int, task_id: int) -> np.random.Generator:
    """The generator of one task's episode; split is hashed so train/val/test never share draws."""
    split_code = zlib.crc32(split.encode())
    return np.random.default_rng(np.random.SeedSequence([seed, split_code, step, task_id]))


@dataclass
class Episodes:
    """A batch of T tasks: support (xs, ys) and query (xq, yq), task-major.

    Classification: xs [T, n_s, C, H, W], ys [T, n_s] int64 in [0, ways). Images stay uint8
    (0-255) from the store to the device, a quarter of the bytes of float32; `to` makes them
    floats in [0, 1] there. Regression: xs [T, n_s, D], ys [T, n_s, 1] float32.
    corrupted: [T] bool, the conflicting tasks of a training batch (data.conflict_fraction);
    None where no task is corrupted.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    ways: int
    corrupted: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.xs.shape[0]

    def to(self, device, dtype: torch.dtype | None = None) -> Episodes:
        """Moved to `device`, uint8 images turned into floats in [0, 1] (`dtype`, default float32)
        on arrival; floating tensors are cast to `dtype` when it is given."""
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, non_blocking=True)
            if t.dtype == torch.uint8:
                return t.to(dtype or torch.float32).div_(255.0)
            return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
        return Episodes(move(self.xs), self.ys.to(device), move(self.xq), self.yq.to(device),
                        self.ways, self.corrupted)

    def index(self, rows) -> Episodes:
        return Episodes(self.xs[rows], self.ys[rows], self.xq[rows], self.yq[rows], self.ways,
                        None if self.corrupted is None else self.corrupted[rows])


class TaskSource(Protocol):
    """Anything that draws a batch of episodes deterministically."""

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> Episodes: ...


@dataclass
class ImageSet:
    """Labelled images of all splits: the in-memory (or memory-mapped) form of a data set.

    images: uint8 [N, C, H, W] (a numpy array, possibly a view of a memory-mapped file);
    labels: int64 [N], a global class index into class_names;
    splits: split name -> int64 array of the class indices in that split (disjoint).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray]
    groups: list[str] = field(default_factory=list)
    _members: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def members(self, cls: int) -> np.ndarray:
        """Row indices of class `cls` (computed once)."""
        if not self._members:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(len(self.class_names) + 1))
            for c in range(len(self.class_names)):
                self._members[c] = order[bounds[c]:bounds[c + 1]]
        return self._members[cls]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class ImageEpisodeSampler:
    """Draws N-way K-shot episodes from an ImageSet; each task from its own seeded generator."""

    def __init__(self, images: ImageSet, ways: int, shots: int, queries: int, seed: int,
                 image_transform=None, input_shape: tuple[int, ...] | None = None):
        """image_transform maps a float batch [N, C, H, W] to `input_shape` (the model's input)."""
        self.data = images
        self.input_shape = tuple(input_shape or images.image_shape)
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        self.image_transform = image_transform
        for split, classes in images.splits.items():
            if len(classes) and len(classes) < ways:
                raise ValueError(f"split '{split}' has {len(classes)} classes, fewer than "
                                 f"data.ways={ways}")

    def sample(self, split: str, step: int, task_ids: Sequence[int], queries: int | None = None
               ) -> Episodes:
        q = self.queries if queries is None else queries
        classes = self.data.splits[split]
        if len(classes) < self.ways:
            raise ValueError(f"split '{split}' has {len(classes)} classes, fewer than "
                             f"data.ways={self.ways}")
        per_class = self.shots + q
        rows = np.empty((len(task_ids), self.ways, per_class), dtype=np.int64)
        for t, task_id in enumerate(task_ids):
            rng = task_rng(self.seed, split, step, int(task_id))
            chosen = rng.choice(classes, size=self.ways, replace=False)
            for w, c in enumerate(chosen):
                members = self.data.members(int(c))
                if len(members) < per_class:
                    raise ValueError(
                        f"class '{self.data.class_names[int(c)]}' has {len(members)} images, "
                        f"fewer than shots + queries = {per_class}")
                rows[t, w] = rng.choice(members, size=per_class, replace=False)
        # gather in sorted order (friendly to memory-mapped files), then restore episode order
        flat = rows.reshape(-1)
        order = np.argsort(flat, kind="stable")
        gathered = np.empty((flat.size,) + self.data.image_shape, dtype=np.uint8)
        gathered[order] = self.data.images[flat[order]]
        x = torch.from_numpy(gathered)
        if self.image_transform is not None:
            x = self.image_transform(x.float().div_(255.0))
        x = x.view(len(task_ids), self.ways, per_class, *x.shape[1:])
        labels = torch.arange(self.ways).view(1, self.ways, 1)
        xs = x[:, :, :self.shots].flatten(1, 2)
        xq = x[:, :, self.shots:].flatten(1, 2)
        ys = labels.expand(len(task_ids), self.ways, self.shots).flatten(1)
        yq = labels.expand(len(task_ids), self.ways, q).flatten(1)
        return Episodes(xs.contiguous(), ys.contiguous(), xq.contiguous(), yq.contiguous(),
                        self.ways)
