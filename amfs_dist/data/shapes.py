"""Embedded RGB data set, different in kind from the glyphs: textured shapes (data.source=shapes).

A class is a shape family (8) x a texture family (6) x a colour scheme (15 schemes: two
foreground colours for the texture and a background), 720 classes; the class ids are a seeded
permutation of the combinations, so every split mixes all families. Each instance draws a
rotation, scale, position, texture frequency and phase, colour jitter and pixel noise. Shape and
texture live in the shape's own frame, so they rotate and scale together. Everything is
deterministic from the data seed; the images are cached on disk like the glyphs'.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from amfs_dist.data.episodes import ImageSet
from amfs_dist.data.synthetic import (
    GLYPH_CLASSES,
    GLYPH_INSTANCES,
    cached_images,
    contiguous_splits,
)

SHAPES = ("circle", "square", "diamond", "triangle", "hexagon", "star", "ring", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots", "rings", "waves")
SCHEMES = 15
SHAPE_CLASSES = GLYPH_CLASSES  # 480 / 80 / 160 of the 8 x 6 x 15 = 720 combinations
_RENDER_VERSION = 1  # bump when rendering changes, so cached images are not reused


def class_families(seed: int) -> np.ndarray:
    """[720, 3]: each class's (shape, texture, colour scheme) indices."""
    combos = np.stack(np.meshgrid(np.arange(len(SHAPES)), np.arange(len(TEXTURES)),
                                  np.arange(SCHEMES), indexing="ij"), -1).reshape(-1, 3)
    return combos[np.random.default_rng([seed, 0x73686170]).permutation(len(combos))]


def _scheme_colours(seed: int, scheme: int) -> np.ndarray:
    """[3, 3] RGB in [0, 1]: two texture colours, then the background, hues well apart."""
    rng = np.random.default_rng([seed, 0x636F6C72, scheme])
    hues = (rng.uniform() + np.array([0.0, 1 / 3, 2 / 3]) + rng.uniform(-0.08, 0.08, 3)) % 1.0
    sat, val = rng.uniform(0.5, 1.0, 3), np.array([rng.uniform(0.7, 1.0), rng.uniform(0.4, 0.7),
                                                   rng.uniform(0.1, 0.5)])
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hues[:, None] * 6) % 6  # HSV -> RGB
    return val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A distance-like field per image, < 1 inside the shape: shape [N], u, v [N, S, S]."""
    r, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)

    def polygon(n):  # regular n-gon of circumradius 1
        sector = torch.remainder(theta, 2 * math.pi / n) - math.pi / n
        return r * torch.cos(sector) / math.cos(math.pi / n)

    fields = torch.stack([
        r,                                                        # circle
        torch.maximum(u.abs(), v.abs()) * 1.2,                    # square
        u.abs() + v.abs(),                                        # diamond
        polygon(3) * 1.1,                                         # triangle
        polygon(6),                                               # hexagon
        r / (0.7 + 0.3 * torch.cos(5 * theta)),                   # star
        (r - 0.65).abs() / 0.35,                                  # ring
        torch.minimum(torch.maximum(u.abs() / 0.35, v.abs()),     # cross
                      torch.maximum(u.abs(), v.abs() / 0.35)),
    ])
    return fields[shape, torch.arange(len(shape))]


def _texture(texture: torch.Tensor, u: torch.Tensor, v: torch.Tensor, freq: torch.Tensor,
             phase: torch.Tensor) -> torch.Tensor:
    """Mix weight in [0, 1] between the two texture colours: texture [N], u, v [N, S, S]."""
    f, ph = freq[:, None, None], phase[:, None, None]
    r = torch.sqrt(u * u + v * v)
    sharp = lambda w: torch.sigmoid(6.0 * w)
    fields = torch.stack([
        torch.ones_like(u),                                               # solid
        sharp(torch.sin(f * u + ph)),                                     # stripes
        sharp(torch.sin(f * u + ph) * torch.sin(f * v + ph)),             # checker
        sharp(torch.cos(f * u + ph) * torch.cos(f * v + ph) - 0.4),       # dots
        sharp(torch.sin(1.5 * f * r + ph)),                               # rings
        sharp(torch.sin(f * u + 2.0 * torch.sin(f * v) + ph)),            # waves
    ])
    return fields[texture, torch.arange(len(texture))]


def render_shapes(seed: int, size: int, instances: int, n_classes: int | list[int]
                  ) -> np.ndarray:
    """uint8 [classes * instances, 3, size, size], class-major, for classes 0..n_classes-1 (or
    the listed ones); an image depends on (seed, class, instance index) only."""
    wanted = list(range(n_classes) if isinstance(n_classes, int) else n_classes)
    families = class_families(seed)[wanted]
    colours = torch.from_numpy(np.stack([_scheme_colours(seed, s) for s in families[:, 2]])).float()
    draws, noise = [], []
    for c in wanted:
        rng = np.random.default_rng([seed, 0x73687073, c])
        draws.append(np.concatenate([
            rng.uniform(-math.pi, math.pi, (instances, 1)),       # rotation
            rng.uniform(0.55, 0.85, (instances, 1)),              # scale (radius / half-width)
            rng.uniform(-0.15, 0.15, (instances, 2)),             # centre shift
            rng.uniform(9.0, 14.0, (instances, 1)),               # texture frequency
            rng.uniform(0.0, 2 * math.pi, (instances, 1)),        # texture phase
            rng.normal(0.0, 0.06, (instances, 9)),                # colour jitter
        ], 1))
        noise.append(rng.standard_normal((instances, 3, size, size), dtype=np.float32))
    p = torch.from_numpy(np.concatenate(draws)).float()
    n = len(p)
    shape = torch.from_numpy(np.repeat(families[:, 0], instances))
    texture = torch.from_numpy(np.repeat(families[:, 1], instances))
    rgb = (colours.repeat_interleave(instances, 0) + p[:, 6:15].view(n, 3, 3)).clamp(0, 1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    cos, sin = torch.cos(p[:, 0])[:, None, None], torch.sin(p[:, 0])[:, None, None]
    dx, dy = x - p[:, 2, None, None], y - p[:, 3, None, None]
    scale = p[:, 1, None, None]
    u, v = (cos * dx + sin * dy) / scale, (-sin * dx + cos * dy) / scale
    inside = torch.clamp((1.0 - _shape_distance(shape, u, v)) * scale * size / 2 + 0.5, 0, 1)
    mix = _texture(texture, u, v, p[:, 4], p[:, 5])[:, None]
    fg = mix * rgb[:, 0, :, None, None] + (1 - mix) * rgb[:, 1, :, None, None]
    img = inside[:, None] * fg + (1 - inside[:, None]) * rgb[:, 2, :, None, None]
    img = img + 0.03 * torch.from_numpy(np.concatenate(noise))
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@functools.lru_cache(maxsize=4)
def shape_images(seed: int = 0, size: int = 28, instances: int = GLYPH_INSTANCES,
                 classes: tuple[tuple[str, int], ...] = tuple(SHAPE_CLASSES.items())) -> ImageSet:
    """The textured-shapes data set: class-disjoint splits, `instances` images per class,
    cached on disk (AMFS_CACHE) under a name that holds every argument."""
    n_classes = sum(n for _, n in classes)
    if n_classes > len(SHAPES) * len(TEXTURES) * SCHEMES:
        raise ValueError(f"at most {len(SHAPES) * len(TEXTURES) * SCHEMES} shape classes")
    key = f"shapes-v{_RENDER_VERSION}-s{seed}-{size}px-{instances}-" + "-".join(
        f"{name}{n}" for name, n in classes)
    images = cached_images(key, (n_classes * instances, 3, size, size), instances,
                           functools.partial(render_shapes, seed, size, instances))
    families = class_families(seed)
    names = [f"{SHAPES[s]}-{TEXTURES[t]}-scheme{k:02d}" for s, t, k in families[:n_classes]]
    return ImageSet(images, np.repeat(np.arange(n_classes), instances), names,
                    contiguous_splits(classes))
