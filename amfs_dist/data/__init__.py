"""Task sources: what `data.source` names, as an object that draws seeded episodes."""
from __future__ import annotations

import math
import os

import numpy as np

from amfs_dist.config import Config
from amfs_dist.data.episodes import Episodes, ImageEpisodeSampler, ImageSet, TaskSource
from amfs_dist.errors import UserError

# the embedded data sets are fixed benchmarks: the same images whatever the run's seed
GLYPH_DATA_SEED = 0


# the embedded image sources, rendered at data.image_size (default 28); any other name is a store
RENDERED_SOURCES = ("synthetic", "shapes")


def load_images(source: str, image_size: int | None = None) -> ImageSet:
    if source == "synthetic":
        from amfs_dist.data.synthetic import glyph_images
        return glyph_images(GLYPH_DATA_SEED, image_size or 28)
    if source == "shapes":
        from amfs_dist.data.shapes import shape_images
        return shape_images(GLYPH_DATA_SEED, image_size or 28)
    from amfs_dist.data.store import open_store
    from amfs_dist.storage import cached_store, is_uri
    return open_store(cached_store(source) if is_uri(source) else source)


def make_task_source(cfg: Config, input_shape: tuple[int, ...] | None = None,
                     training: bool = True) -> TaskSource:
    """The episode source for cfg; images are converted to `input_shape` when it is given
    (a trained model's input), else to data.channels / data.image_size where those are set.

    Settings that would fail only later (at step 1, at validation, at the final test) are
    refused here, before a run writes anything: see check_episodes. training=False (an
    evaluation) checks only what the test split needs."""
    d = cfg.data
    if d.source == "sinusoid":
        from amfs_dist.data.synthetic import SinusoidTasks
        source = SinusoidTasks(d.shots, d.queries, cfg.seed)
        check_episodes(cfg, source, training)
        return source
    images = load_images(d.source, d.image_size if d.source in RENDERED_SOURCES else None)
    native = images.image_shape
    target = tuple(input_shape) if input_shape else (
        d.channels or native[0], d.image_size or native[1], d.image_size or native[2])
    transform = None
    if target != native:
        if target[1] != target[2]:
            raise UserError(f"data.image_size: only square inputs are supported, got {target}")
        from amfs_dist.data.convert import image_converter
        transform = image_converter(target[0], target[1])
    try:
        source = ImageEpisodeSampler(images, d.ways, d.shots, d.queries, cfg.seed, transform,
                                     target)
    except ValueError as e:
        raise UserError(f"data.source={d.source}: {e}") from None
    check_episodes(cfg, source, training)
    if d.conflict_fraction > 0:
        from amfs_dist.data.conflict import ConflictingTasks
        source = ConflictingTasks(source, d.conflict_fraction, d.conflict, cfg.seed,
                                  cfg.train.meta_batch)
    return source


def check_episodes(cfg: Config, source: TaskSource, training: bool = True) -> None:
    """Refuse, with one line naming the key, what the sampler would fail on mid-run: a split
    the run draws from that is empty, classes with fewer images than shots + queries, and a
    train.meta_batch whose episodes alone cannot fit in this machine's memory."""
    d, t = cfg.data, cfg.train
    if isinstance(source, ImageEpisodeSampler):
        uses = []  # (split, query key, its value, why the run draws from the split)
        if training and t.steps > 0:
            uses.append(("train", "data.queries", d.queries, f"train.steps={t.steps}"))
            if t.val_every and t.steps >= t.val_every:
                uses.append(("val", "eval.queries", cfg.eval.queries,
                             f"train.val_every={t.val_every} (0 skips validation)"))
        uses.append(("test", "eval.queries", cfg.eval.queries, "the test evaluation"))
        data = source.data
        counts = np.bincount(data.labels, minlength=len(data.class_names))
        for split, key, queries, why in uses:
            classes = data.splits.get(split, np.zeros(0, np.int64))
            if len(classes) == 0:
                raise UserError(f"data.source={d.source}: split '{split}' has no classes, but "
                                f"{why} draws episodes from it")
            smallest = int(classes[np.argmin(counts[classes])])
            have = int(counts[smallest])
            if d.shots + queries > have:
                fix = (f"at most {key}={have - d.shots}" if have > d.shots
                       else "lower data.shots")
                raise UserError(f"{key}={queries}: with data.shots={d.shots} every '{split}' "
                                f"class needs {d.shots + queries} images, but "
                                f"'{data.class_names[smallest]}' of data.source={d.source} has "
                                f"{have}; {fix}")
    if training and t.steps > 0:
        check_step_memory(cfg, source)


def available_memory() -> int | None:
    """Bytes of memory this machine can still hand out (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_step_memory(cfg: Config, source: TaskSource) -> None:
    """One step's episodes: T tasks x ways x (shots + queries) images, sampled as uint8 and
    made float32 for the model. When even that (one process's share of the tasks) exceeds the
    memory left on this machine, the step would die with a MemoryError: refuse it now."""
    d, t = cfg.data, cfg.train
    tasks = math.ceil(t.meta_batch / max(1, cfg.dist.workers))
    if isinstance(source, ImageEpisodeSampler):
        images = tasks * d.ways * (d.shots + d.queries)
        stored = images * math.prod(source.data.image_shape)  # uint8
        as_float = images * math.prod(source.input_shape) * 4  # float32
        what = (f"{images:,} images ({tasks} tasks x {d.ways} ways x ({d.shots}+{d.queries})) "
                f"of {'x'.join(map(str, source.data.image_shape))}")
    else:  # regression: (x, y) pairs, float64 while drawn, float32 for the model
        points = tasks * (d.shots + d.queries) * 2
        stored, as_float = points * 8, points * 4
        what = f"{points // 2:,} points ({tasks} tasks x ({d.shots}+{d.queries}))"
    need, free = stored + as_float, available_memory()
    if free is not None and need > free:
        raise UserError(f"train.meta_batch={t.meta_batch}: one step's episodes need "
                        f"{_gib(need)} ({what}: {_gib(stored)} as sampled + {_gib(as_float)} as "
                        f"float32), more than the {_gib(free)} of memory available; lower "
                        f"train.meta_batch")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


__all__ = ["Episodes", "ImageSet", "TaskSource", "check_episodes", "load_images",
           "make_task_source"]
