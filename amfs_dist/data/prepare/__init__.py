"""Converters from the standard on-disk layouts of few-shot benchmarks to an ImageSet.

Each data set has its own module with load(src, options) -> (ImageSet, split name); the split
lists they follow are shipped in amfs_dist/data/splits/. Nothing is downloaded.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from amfs_dist.data.episodes import ImageSet
from amfs_dist.data.prepare.common import PrepareError, PrepareOptions, require_dir

DATASETS = ("omniglot", "mini-imagenet", "cub", "fc100", "cifar-fs")
# which options each data set takes (the rest are errors, not silently ignored)
OPTIONS = {
    "omniglot": {"image_size", "split", "rotations"},
    "mini-imagenet": {"image_size", "allow_pickle"},
    "cub": {"image_size", "bbox_crop"},
    "fc100": {"image_size", "allow_pickle"},
    "cifar-fs": {"image_size", "allow_pickle"},
}
FLAGS = {"image_size": "--image-size", "split": "--split", "rotations": "--rotations",
         "allow_pickle": "--allow-pickle", "bbox_crop": "--bbox-crop"}


def check_options(name: str, opts: PrepareOptions) -> None:
    if name not in DATASETS:
        raise PrepareError(f"unknown data set '{name}'; expected one of {', '.join(DATASETS)}")
    for key, flag in FLAGS.items():
        if getattr(opts, key) not in (None, False) and key not in OPTIONS[name]:
            raise PrepareError(f"{flag} does not apply to {name}")
    if opts.image_size is not None and opts.image_size < 1:
        raise PrepareError(f"--image-size must be >= 1, got {opts.image_size}")


def load(name: str, src: str | Path, opts: PrepareOptions) -> tuple[ImageSet, str]:
    """Read data set `name` from `src` -> (ImageSet, name of the split it follows)."""
    check_options(name, opts)
    src = require_dir(Path(src), f"--src for {name}")
    if name in ("fc100", "cifar-fs"):
        from amfs_dist.data.prepare import cifar
        return cifar.load(src, opts, name)
    module = importlib.import_module(f"amfs_dist.data.prepare.{name.replace('-', '_')}")
    return module.load(src, opts)
