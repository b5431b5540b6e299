"""mini-ImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle 2017.

Layout (default):
    SRC/train.csv, SRC/val.csv, SRC/test.csv   rows `filename,label` after a header line
    SRC/images/<filename>                       (or SRC/images/<label>/<filename>)
Or, only with --allow-pickle (pickles can run code when loaded):
    SRC/mini-imagenet-cache-{train,val,test}.pkl   dicts with 'image_data' uint8 [N, 84, 84, 3]
                                                    and 'class_dict' {wnid: [row indices]}
The classes of each split are checked against amfs_dist/data/splits/mini_imagenet.txt.
Output: RGB, 84x84 by default (--image-size).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from amfs_dist.data.episodes import SPLITS, ImageSet
from amfs_dist.data.prepare.common import (
    ClassSpec,
    PrepareError,
    PrepareOptions,
    assemble,
    check_split_classes,
    decode,
    image_set,
    inside_src,
    require_dir,
    resize,
    resize_array,
    split_file_path,
    split_list,
    unpickle,
)

DEFAULT_SIZE = 84
PICKLE_NAME = "mini-imagenet-cache-{}.pkl"


def ravi_split() -> dict[str, list[str]]:
    listed: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split, wnid in split_list("mini_imagenet"):
        listed[split].append(wnid)
    return listed


def read_csv(path: Path) -> dict[str, list[tuple[str, int]]]:
    """wnid -> (filename, line number), in file order."""
    members: dict[str, list[tuple[str, int]]] = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"{path}: cannot read ({e})") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise PrepareError(f"{path}: expected a header line 'filename,label'")
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0] or not row[1]:
            raise PrepareError(f"{path}, line {line}: expected 'filename,label', got {row}")
        members.setdefault(row[1].strip(), []).append((row[0].strip(), line))
    return members


def _image_path(src: Path, images: Path, wnid: str, filename: str, where: str) -> Path:
    flat = inside_src(src, images / filename, where)
    if flat.is_file():
        return flat
    nested = inside_src(src, images / wnid / filename, where)
    if nested.is_file():
        return nested
    raise PrepareError(f"{flat}: image listed in the split CSV not found (also looked in "
                       f"{nested})")


def load_from_csv(src: Path, size: int) -> ImageSet:
    images = require_dir(src / "images", "mini-ImageNet layout: SRC/images/<filename>")
    classes = []
    for split, wnids in ravi_split().items():
        csv_path = src / f"{split}.csv"
        members = read_csv(csv_path)
        check_split_classes(list(members), wnids, str(csv_path), split_file_path("mini_imagenet"))
        classes += [ClassSpec(w, split, "", [_image_path(src, images, w, f,
                                                         f"{csv_path}, line {line}")
                                             for f, line in members[w]])
                    for w in wnids]
    return assemble(classes, lambda p: resize(decode(p, "RGB"), size),
                    (3, size, size), desc="mini-imagenet")


def load_from_pickles(src: Path, size: int, allow_pickle: bool) -> ImageSet:
    parts, labels, classes = [], [], []
    for split, wnids in ravi_split().items():
        path = src / PICKLE_NAME.format(split)
        if not path.is_file():
            raise PrepareError(f"{path}: file not found (mini-ImageNet pickle layout)")
        cache = unpickle(path, allow_pickle)
        try:
            data, class_dict = np.asarray(cache["image_data"]), dict(cache["class_dict"])
        except (TypeError, KeyError) as e:
            raise PrepareError(f"{path}: expected a dict with 'image_data' and 'class_dict' "
                               f"({e})") from None
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
            raise PrepareError(f"{path}: 'image_data' must be uint8 [N, H, W, 3], got "
                               f"{data.dtype} {data.shape}")
        check_split_classes([w for w, rows in class_dict.items() if len(rows)], wnids, str(path),
                            split_file_path("mini_imagenet"))
        for wnid in wnids:
            rows = np.asarray(class_dict[wnid], dtype=np.int64)
            if rows.min() < 0 or rows.max() >= len(data):
                raise PrepareError(f"{path}: class '{wnid}' lists rows outside 0..{len(data) - 1}")
            labels.append(np.full(len(rows), len(classes), np.int64))
            classes.append(ClassSpec(wnid, split))
            parts.append(resize_array(data[rows].transpose(0, 3, 1, 2), size,
                                      desc=f"mini-imagenet {wnid}"))
    return image_set(np.ascontiguousarray(np.concatenate(parts)), np.concatenate(labels), classes)


def load(src: Path, opts: PrepareOptions) -> tuple[ImageSet, str]:
    size = opts.image_size or DEFAULT_SIZE
    if all((src / f"{s}.csv").is_file() for s in SPLITS):
        return load_from_csv(src, size), "ravi"
    if any((src / PICKLE_NAME.format(s)).is_file() for s in SPLITS):
        return load_from_pickles(src, size, opts.allow_pickle), "ravi"
    missing = next(src / f"{s}.csv" for s in SPLITS if not (src / f"{s}.csv").is_file())
    raise PrepareError(f"{missing}: file not found (mini-ImageNet layout: SRC/train.csv, "
                       f"val.csv, test.csv and SRC/images/; or the "
                       f"mini-imagenet-cache-*.pkl files with --allow-pickle)")
