"""Embedded data sets: Omniglot-like procedural glyphs, and MAML's sinusoid regression tasks.

Glyphs: each class is a random set of 2-4 pen strokes (cubic Bezier curves); each instance is
the same strokes with control-point jitter, a stroke-width change and a small affine warp,
rasterised by distance to the stroke. Everything is deterministic from the data seed.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from amfs_dist.data.episodes import Episodes, ImageSet, task_rng
from amfs_dist.files import atomic_write, cache_dir

GLYPH_CLASSES = {"train": 480, "val": 80, "test": 160}
GLYPH_INSTANCES = 20  # as in Omniglot: 20 drawers per character
_POINTS_PER_STROKE = 24
_MAX_STROKES = 4


def _bezier(control: np.ndarray, n: int) -> np.ndarray:
    """Points on cubic Bezier curves; control [..., 4, 2] -> [..., n, 2]."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    c0, c1, c2, c3 = (control[..., i, None, :] for i in range(4))
    return ((1 - t) ** 3) * c0 + 3 * ((1 - t) ** 2) * t * c1 + 3 * (1 - t) * t * t * c2 + t ** 3 * c3


def _glyph_class(rng: np.random.Generator, instances: int) -> tuple[np.ndarray, np.ndarray]:
    """One class: the points of each instance's strokes [I, S*P, 2] and stroke widths [I].

    The prototype is 2-4 cubic Bezier strokes; each instance jitters the control points,
    changes the width and applies a small affine warp about the centre.
    """
    start = rng.uniform(0.2, 0.8, size=(_MAX_STROKES, 1, 2))
    control = np.clip(np.concatenate(
        [start, start + np.cumsum(rng.normal(0.0, 0.18, size=(_MAX_STROKES, 3, 2)), 1)], 1), 0.1, 0.9)
    used = np.arange(_MAX_STROKES) < rng.integers(2, _MAX_STROKES + 1)
    ctrl = control + rng.normal(0.0, 0.045, size=(instances,) + control.shape)
    angle = rng.uniform(-0.3, 0.3, size=instances)
    scale = rng.uniform(0.8, 1.2, size=(instances, 2))
    shear = rng.uniform(-0.25, 0.25, size=instances)
    shift = rng.uniform(-0.08, 0.08, size=(instances, 2))
    cos, sin = np.cos(angle), np.sin(angle)
    A = np.stack([np.stack([cos * scale[:, 0], -sin + shear], -1),
                  np.stack([sin, cos * scale[:, 1]], -1)], -2)  # [I, 2, 2]
    pts = _bezier(ctrl, _POINTS_PER_STROKE)  # [I, S, P, 2]
    pts = np.einsum("ixy,ispy->ispx", A, pts - 0.5) + 0.5 + shift[:, None, None, :]
    pts = np.where(used[None, :, None, None], pts, 100.0)  # unused strokes draw nothing
    width = 0.035 * rng.uniform(0.7, 1.4, size=instances)
    return pts.reshape(instances, -1, 2), width


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


_RENDER_VERSION = 2  # bump when rendering changes, so cached images are not reused


@functools.lru_cache(maxsize=4)
def glyph_images(seed: int = 0, size: int = 28, instances: int = GLYPH_INSTANCES,
                 classes: tuple[tuple[str, int], ...] = tuple(GLYPH_CLASSES.items())) -> ImageSet:
    """The synthetic glyph data set: class-disjoint splits, `instances` images per class.

    Rendering takes seconds, so the images are cached on disk (AMFS_CACHE, default
    ~/.cache/amfs-dist) under a name that holds every argument.
    """
    key = f"glyphs-v{_RENDER_VERSION}-s{seed}-{size}px-{instances}-" + "-".join(
        f"{name}{n}" for name, n in classes)
    n_classes = sum(n for _, n in classes)
    images = cached_images(key, (n_classes * instances, 1, size, size), instances,
                           functools.partial(render_glyphs, seed, size, instances))
    names = [f"glyph{c:04d}" for c in range(n_classes)]
    return ImageSet(images, np.repeat(np.arange(n_classes), instances), names,
                    contiguous_splits(classes))


def contiguous_splits(classes: tuple[tuple[str, int], ...]) -> dict[str, np.ndarray]:
    """Split name -> class ids, in the order given: ((train, 3), (val, 2)) -> 0-2, 3-4."""
    splits, first = {}, 0
    for name, count in classes:
        splits[name] = np.arange(first, first + count)
        first += count
    return splits


def cached_images(key: str, shape: tuple[int, ...], instances: int,
                  render: Callable[[list[int]], np.ndarray]) -> np.ndarray:
    """A rendered data set (uint8, class-major, `instances` images per class), from the disk
    cache (AMFS_CACHE, default ~/.cache/amfs-dist) when the file there is what `render` (of a
    list of class ids) would give, else rendered and saved."""
    path = cache_dir() / f"{key}.npy"
    images = _load_cached(path, shape, instances, render)
    if images is None:
        images = render(list(range(shape[0] // instances)))
        try:  # readers see the old file or the whole new one
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "wb") as f:
                np.save(f, images)
        except OSError:
            pass  # a read-only home is fine: rendered each time
    return images


def _load_cached(path: Path, shape: tuple[int, ...], instances: int,
                 render: Callable[[list[int]], np.ndarray]) -> np.ndarray | None:
    """The cached images if they are what render would give, else None (render again): the
    shape and dtype must match, and so must the first and last classes, rendered afresh (a
    pixel may differ by one level where float rounding lands on a half)."""
    if not path.is_file():
        return None
    try:
        images = np.load(path, allow_pickle=False)
    except Exception:  # truncated, not a .npy file, a damaged header: it is only a cache
        return None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape != shape:
        return None
    n_classes = shape[0] // instances
    for c in {0, n_classes - 1}:
        fresh = render([c]).astype(np.int16)
        if np.abs(images[c * instances:(c + 1) * instances] - fresh).max() > 1:
            return None
    return images


def render_glyphs(seed: int, size: int, instances: int, n_classes: int | list[int]
                  ) -> np.ndarray:
    """uint8 [classes * instances, 1, size, size], class-major, for classes 0..n_classes-1 (or
    the listed ones); class c depends on (seed, c) only."""
    wanted = range(n_classes) if isinstance(n_classes, int) else n_classes
    drawn = [_glyph_class(np.random.default_rng([seed, 0x61796C67, c]), instances)
             for c in wanted]
    points = torch.from_numpy(np.concatenate([p for p, _ in drawn])).float()
    width = torch.from_numpy(np.concatenate([w for _, w in drawn])).float()
    return (_render(points, width, size) * 255).round().to(torch.uint8).numpy()


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
            xs.append(x[:self.shots])
            ys.append(y[:self.shots])
            xq.append(x[self.shots:])
            yq.append(y[self.shots:])
        t = lambda a: torch.from_numpy(np.stack(a)).float()
        return Episodes(t(xs), t(ys), t(xq), t(yq), ways=1)
