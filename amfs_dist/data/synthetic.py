"""Embedded data sets: Omniglot-like procedural glyphs, and MAML's sinusoid regression tasks.

Glyphs: each class is a random set of 2-4 pen strokes (cubic Bezier curves); each instance is
the same strokes with control-point jitter, a stroke-width change and a small affine warp,
rasterised by distance to the stroke. Everything is deterministic from the data seed.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from amfs_dist.data.episodes import Episodes, ImageSet, task_rng

GLYPH_CLASSES = {"train": 480, "val": 80, "test": 160}
GLYPH_INSTANCES = 20  # as in Omniglot: 20 drawers per character
_POINTS_PER_STROKE = 24
_MAX_STROKES = 4


def _bezier(control: np.ndarray, n: int) -> np.ndarray:
    """Points on cubic Bezier curves; control [..., 4, 2] -> [..., n, 2]."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    c0, c1, c2, c3 = (control[..., i, None, :] for i in range(4))
    return ((1 - t) ** 3) * c0 + 3 * ((1 - t) ** 2) * t * c1 + 3 * (1 - t) * t * t * c2 + t ** 3 * c3


def _glyph_strokes(rng: np.random.Generator, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class prototypes: control points [C, 4, 4, 2] in the unit square, stroke mask [C, 4]."""
    control = np.empty((n_classes, _MAX_STROKES, 4, 2))
    start = rng.uniform(0.2, 0.8, size=(n_classes, _MAX_STROKES, 1, 2))
    steps = rng.normal(0.0, 0.18, size=(n_classes, _MAX_STROKES, 3, 2))
    control[:, :, :1] = start
    control[:, :, 1:] = start + np.cumsum(steps, axis=2)
    control = np.clip(control, 0.1, 0.9)
    n_strokes = rng.integers(2, _MAX_STROKES + 1, size=n_classes)
    mask = np.arange(_MAX_STROKES)[None, :] < n_strokes[:, None]
    return control, mask


def _render(points: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Rasterise point sets [N, P, 2] (unit square; far-away points for unused strokes)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(1, -1, 2)
    out = []
    for chunk, w in zip(points.split(512), width.split(512)):
        d = torch.cdist(grid.expand(len(chunk), -1, -1), chunk).amin(-1)  # [n, size*size]
        ink = torch.clamp((w[:, None] - d) * size + 0.5, 0.0, 1.0)
        out.append(ink.view(-1, 1, size, size))
    return torch.cat(out)


@functools.lru_cache(maxsize=4)
def glyph_images(seed: int = 0, size: int = 28, instances: int = GLYPH_INSTANCES,
                 classes: tuple[tuple[str, int], ...] = tuple(GLYPH_CLASSES.items())) -> ImageSet:
    """The synthetic glyph data set: class-disjoint splits, `instances` images per class."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x61796C67]))
    n_classes = sum(n for _, n in classes)
    control, mask = _glyph_strokes(rng, n_classes)
    # per instance: jittered control points, a width change and an affine warp about the centre
    ctrl = control[:, None] + rng.normal(0.0, 0.045, size=(n_classes, instances) + control.shape[1:])
    angle = rng.uniform(-0.3, 0.3, size=(n_classes, instances))
    scale = rng.uniform(0.8, 1.2, size=(n_classes, instances, 2))
    shear = rng.uniform(-0.25, 0.25, size=(n_classes, instances))
    shift = rng.uniform(-0.08, 0.08, size=(n_classes, instances, 2))
    cos, sin = np.cos(angle), np.sin(angle)
    A = np.stack([np.stack([cos * scale[..., 0], -sin + shear], -1),
                  np.stack([sin, cos * scale[..., 1]], -1)], -2)  # [C, I, 2, 2]
    pts = _bezier(ctrl, _POINTS_PER_STROKE)  # [C, I, S, P, 2]
    pts = np.einsum("cixy,cispy->cispx", A, pts - 0.5) + 0.5 + shift[:, :, None, None, :]
    pts = np.where(mask[:, None, :, None, None], pts, 100.0)  # unused strokes draw nothing
    width = 0.035 * rng.uniform(0.7, 1.4, size=(n_classes, instances))
    images = _render(torch.from_numpy(pts.reshape(n_classes * instances, -1, 2)).float(),
                     torch.from_numpy(width.reshape(-1)).float(), size)
    images = (images * 255).round().to(torch.uint8).numpy()
    labels = np.repeat(np.arange(n_classes), instances)
    splits, first = {}, 0
    for name, count in classes:
        splits[name] = np.arange(first, first + count)
        first += count
    names = [f"glyph{c:04d}" for c in range(n_classes)]
    return ImageSet(images, labels, names, splits)


class SinusoidTasks:
    """MAML's regression tasks: y = A sin(x - phase), A in [0.1, 5], phase in [0, pi], x in [-5, 5]."""

    input_shape = (1,)

    def __init__(self, shots: int, queries: int, seed: int):
        self.shots, self.queries, self.seed = shots, queries, seed

    def sample(self, split: str, step: int, task_ids: Sequence[int], queries: int | None = None
               ) -> Episodes:
        q = self.queries if queries is None else queries
        xs, ys, xq, yq = [], [], [], []
        for task_id in task_ids:
            rng = task_rng(self.seed, split, step, int(task_id))
            amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, math.pi)
            x = rng.uniform(-5.0, 5.0, size=(self.shots + q, 1))
            y = amplitude * np.sin(x - phase)
            xs.append(x[:self.shots]); ys.append(y[:self.shots])
            xq.append(x[self.shots:]); yq.append(y[self.shots:])
        t = lambda a: torch.from_numpy(np.stack(a)).float()
        return Episodes(t(xs), t(ys), t(xq), t(yq), ways=1)
