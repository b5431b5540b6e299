"""Task sources: what `data.source` names, as an object that draws seeded episodes."""
from __future__ import annotations

from amfs_dist.config import Config
from amfs_dist.data.episodes import Episodes, ImageEpisodeSampler, ImageSet, TaskSource
from amfs_dist.errors import UserError

# the glyph data set is a fixed benchmark: the same images whatever the run's seed
GLYPH_DATA_SEED = 0


def load_images(source: str, image_size: int | None = None) -> ImageSet:
    if source == "synthetic":
        from amfs_dist.data.synthetic import glyph_images
        return glyph_images(GLYPH_DATA_SEED, image_size or 28)
    from amfs_dist.data.store import open_store
    return open_store(source)


def make_task_source(cfg: Config, input_shape: tuple[int, ...] | None = None) -> TaskSource:
    """The episode source for cfg; images are converted to `input_shape` when it is given
    (a trained model's input), else to data.channels / data.image_size where those are set."""
    d = cfg.data
    if d.source == "sinusoid":
        from amfs_dist.data.synthetic import SinusoidTasks
        return SinusoidTasks(d.shots, d.queries, cfg.seed)
    images = load_images(d.source, d.image_size if d.source == "synthetic" else None)
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
        source = ImageEpisodeSampler(images, d.ways, d.shots, d.queries, cfg.seed, transform, target)
    except ValueError as e:
        raise UserError(f"data.source={d.source}: {e}") from None
    if d.conflict_fraction > 0:
        from amfs_dist.data.conflict import ConflictingTasks
        source = ConflictingTasks(source, d.conflict_fraction, d.conflict, cfg.seed,
                                  cfg.train.meta_batch)
    return source


__all__ = ["Episodes", "ImageSet", "TaskSource", "load_images", "make_task_source"]
