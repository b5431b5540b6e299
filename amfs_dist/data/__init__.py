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
MAX_EPISODES = 10**6  # per evaluation (eval.episodes, train.val_episodes, amfs eval --episodes)
RENDER_CHUNK = 512  # glyphs rendered at once (data/synthetic.py _render)


# the embedded image sources, rendered at data.image_size (default 28); any other name is a store
RENDERED_SOURCES = ("synthetic", "shapes")


def load_images(source: str, image_size: int | None = None) -> ImageSet:
    if source == "synthetic":
        from amfs_dist.data.synthetic import glyph_images
        check_glyph_memory(image_size or 28)
        return glyph_images(GLYPH_DATA_SEED, image_size or 28)
    if source == "shapes":
        from amfs_dist.data.shapes import shape_images
        check_shapes_memory(image_size or 28)
        return shape_images(GLYPH_DATA_SEED, image_size or 28)
    from amfs_dist.data.store import cached_store, open_store
    from amfs_dist.storage import is_uri
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
    the run draws from that is empty, classes with fewer images than shots + queries, a
    train.meta_batch whose episodes alone cannot fit in this machine's memory, a model that
    cannot (check_model_memory), and episode counts that would never end."""
    d, t = cfg.data, cfg.train
    counts = [("eval.episodes", cfg.eval.episodes)]
    if training and t.val_every:
        counts.append(("train.val_episodes", t.val_episodes))
    for key, n in counts:
        check_episode_count(key, n)
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
    check_model_memory(cfg, source, training and t.steps > 0)


def check_episode_count(key: str, n: int) -> None:
    """Evaluation episodes beyond MAX_EPISODES only narrow a confidence interval that is tiny
    already (+-0.1 % at 10^6), at hours or years of compute: refuse them with one line."""
    if n > MAX_EPISODES:
        raise UserError(f"{key}={n}: at most {MAX_EPISODES:,} episodes (their 95% confidence "
                        f"interval is about +-0.1 % already)")


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


def check_glyph_memory(size: int) -> None:
    """The synthetic glyphs are rendered whole, then held in memory (and cached on disk) as
    uint8: refuse an image size whose rendering would exceed the memory left. Rendering peaks at
    about 13 bytes a pixel (float32 ink, its concatenation, scaled, then uint8) plus one chunk's
    distance matrix (RENDER_CHUNK glyphs x pixels x stroke points, float32)."""
    from amfs_dist.data import synthetic as s
    images = sum(s.GLYPH_CLASSES.values()) * s.GLYPH_INSTANCES
    pixels = size * size
    need = images * pixels * 13 + min(images, RENDER_CHUNK) * pixels * (
        s._POINTS_PER_STROKE * s._MAX_STROKES) * 4
    free = available_memory()
    if free is not None and need > free:
        raise UserError(f"data.image_size={size}: rendering the synthetic glyphs at {size}x{size}"
                        f" ({images:,} images) needs about {_gib(need)}, more than the "
                        f"{_gib(free)} of memory available; lower data.image_size")


def check_shapes_memory(size: int) -> None:
    """The textured shapes are rendered whole, in float32, three channels: about 100 bytes a
    pixel at the peak (measured: 97 at 28 and 56 px, from the process's peak resident size)."""
    from amfs_dist.data import shapes as s
    images = sum(s.SHAPE_CLASSES.values()) * s.GLYPH_INSTANCES
    need, free = images * size * size * 100, available_memory()
    if free is not None and need > free:
        raise UserError(f"data.image_size={size}: rendering the textured shapes at {size}x{size}"
                        f" ({images:,} images) needs about {_gib(need)}, more than the "
                        f"{_gib(free)} of memory available; lower data.image_size")


def model_footprint(cfg: Config, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, activation floats per input) of the backbone at these sizes, from a
    shape-only forward on PyTorch's meta device: nothing is allocated."""
    import torch

    from amfs_dist.models.backbones import build_backbone
    with torch.device("meta"):
        net = build_backbone(cfg.backbone, tuple(input_shape), cfg.model.width)
        params = sum(p.numel() for p in net.parameters())
        floats = [0]

        def count(module, args, output):
            if isinstance(output, torch.Tensor) and not list(module.children()):
                floats[0] += output.numel()

        hooks = [m.register_forward_hook(count) for m in net.modules()]
        try:
            net(torch.empty(1, *input_shape))
        finally:
            for h in hooks:
                h.remove()
    return params, floats[0]


def check_model_memory(cfg: Config, source: TaskSource, training: bool = True) -> None:
    """The model at model.width and the input size: its parameters (with gradients and Adam's
    two moments when training), and, where this process computes on its CPU, the activations
    one step (or one evaluation batch) keeps for the backward pass. An estimate beyond the
    memory left is refused with one line naming the keys."""
    import torch
    d, free = cfg.data, available_memory()
    if free is None:
        return
    shape = tuple(source.input_shape)
    try:
        params, per_input = model_footprint(cfg, shape)
    except (RuntimeError, ValueError):  # e.g. an input too small for the backbone: the model
        return                          # itself says so, naming the key
    # activations are in this machine's memory only when this process computes, on its CPU
    here = (not training or cfg.dist.workers == 0) and (
        cfg.train.device == "cpu" or (cfg.train.device == "auto"
                                      and not torch.cuda.is_available()))
    copies = 4 if training else 1  # parameters, gradients, Adam's two moments
    if training:
        tasks = math.ceil(cfg.train.meta_batch / max(1, cfg.dist.workers))
        per_task = d.ways * (d.shots + d.queries) if d.source != "sinusoid" else d.shots + d.queries
        inputs, passes = tasks * per_task, 1 + (cfg.maml.steps if cfg.inner_loop in (
            "maml", "fomaml") else 0)  # MAML keeps every inner step's activations
        what = f"train.meta_batch={cfg.train.meta_batch}"
    else:
        per_task = d.ways * (d.shots + cfg.eval.queries) if d.source != "sinusoid" else (
            d.shots + cfg.eval.queries)
        inputs, passes = cfg.eval.batch * per_task, 1 + (cfg.maml.test_steps if cfg.inner_loop
                                                          in ("maml", "fomaml") else 0)
        what = f"eval.batch={cfg.eval.batch}"
    weights, activations = params * 4 * copies, per_input * 4 * inputs * passes * here
    if weights + activations > free:
        sizes = (f"model.width={cfg.model.width or 'default'}"
                 + (f", data.image_size={shape[-1]}" if len(shape) == 3 else ""))
        raise UserError(f"{sizes}: the {cfg.backbone} model needs about "
                        f"{_gib(weights + activations)} ({params:,} parameters: "
                        f"{_gib(weights)}; activations of {inputs:,} inputs of "
                        f"{'x'.join(map(str, shape))} at {what}: {_gib(activations)}), more "
                        f"than the {_gib(free)} of memory available; lower model.width, "
                        f"data.image_size or {what.split('=')[0]}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


__all__ = ["Episodes", "ImageSet", "TaskSource", "check_episodes", "load_images",
           "make_task_source"]
