"""CUB-200-2011 (Wah et al. 2011) with the 100 / 50 / 50 class split of Chen et al. 2019.

Layout (the CUB_200_2011 folder; SRC may also be its parent):
    SRC/classes.txt             `<class id> <class folder>`, e.g. `1 001.Black_footed_Albatross`
    SRC/images.txt              `<image id> <path under images/>`
    SRC/image_class_labels.txt  `<image id> <class id>`
    SRC/images/<path>           JPEG photos of any size
    SRC/bounding_boxes.txt      `<image id> <x> <y> <width> <height>` (pixels), for --bbox-crop
Images are decoded as RGB (greyscale photos get three equal channels), optionally cropped to
their bounding box, and resized (squashed, aspect ratio not kept) to 84x84 by default.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from amfs_dist.data.episodes import ImageSet
from amfs_dist.data.prepare.common import (
    ClassSpec,
    PrepareError,
    PrepareOptions,
    assemble,
    check_split_classes,
    decode,
    inside_src,
    require_dir,
    require_file,
    resize,
    split_file_path,
    split_list,
)

DEFAULT_SIZE = 84
Box = tuple[float, float, float, float]


def read_table(path: Path, columns: int,
               lines: dict[str, int] | None = None) -> dict[str, list[str]]:
    """First column -> the other columns, for a whitespace-separated CUB metadata file; the
    line number of each first column into `lines`, if given."""
    table = {}
    for line_no, line in enumerate(require_file(path, "CUB_200_2011 metadata").read_text()
                                   .splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise PrepareError(f"{path}, line {line_no}: expected {columns} fields, got "
                               f"{line!r}")
        table[fields[0]] = fields[1:]
        if lines is not None:
            lines[fields[0]] = line_no
    return table


def crop_box(image: torch.Tensor, box: Box, path: Path) -> torch.Tensor:
    x, y, w, h = box
    height, width = image.shape[1:]
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    if x1 <= x0 or y1 <= y0:
        raise PrepareError(f"{path}: bounding box {box} lies outside the {width}x{height} image")
    return image[:, y0:y1, x0:x1]


def load(src: Path, opts: PrepareOptions) -> tuple[ImageSet, str]:
    if not (src / "classes.txt").is_file() and (src / "CUB_200_2011" / "classes.txt").is_file():
        src = src / "CUB_200_2011"
    images_dir = require_dir(src / "images", "CUB_200_2011 layout: SRC/images/<class>/<file>")
    class_of_id = {cid: row[0] for cid, row in read_table(src / "classes.txt", 2).items()}
    path_lines: dict[str, int] = {}
    paths = read_table(src / "images.txt", 2, path_lines)
    labels = read_table(src / "image_class_labels.txt", 2)
    boxes: dict[str, list[str]] = {}
    if opts.bbox_crop:
        boxes = read_table(src / "bounding_boxes.txt", 5)

    members: dict[str, list[tuple[Path, Box | None]]] = {}
    for image_id, (rel_path,) in paths.items():
        if image_id not in labels:
            raise PrepareError(f"{src / 'image_class_labels.txt'}: no class for image id "
                               f"{image_id} ({rel_path})")
        class_id = labels[image_id][0]
        if class_id not in class_of_id:
            raise PrepareError(f"{src / 'image_class_labels.txt'}: image id {image_id} has "
                               f"class id {class_id}, which is not in classes.txt")
        box = None
        if opts.bbox_crop:
            if image_id not in boxes:
                raise PrepareError(f"{src / 'bounding_boxes.txt'}: no box for image id "
                                   f"{image_id} ({rel_path})")
            try:
                box = tuple(float(v) for v in boxes[image_id])
            except ValueError:
                box = (math.nan,)
            if not all(math.isfinite(v) for v in box):  # 'nan' and 'inf' read as floats
                raise PrepareError(f"{src / 'bounding_boxes.txt'}: bad box for image id "
                                   f"{image_id}: {boxes[image_id]} (expected 4 finite "
                                   f"numbers)")
        image = inside_src(src, images_dir / rel_path,
                           f"{src / 'images.txt'}, line {path_lines[image_id]}")
        members.setdefault(class_of_id[class_id], []).append((image, box))

    listed = split_list("cub")
    check_split_classes(list(members), [name for _, name in listed], str(src),
                        split_file_path("cub"))
    classes = [ClassSpec(name, split, "", members[name]) for split, name in listed]
    size = opts.image_size or DEFAULT_SIZE

    def load_one(item: tuple[Path, Box | None]) -> torch.Tensor:
        path, box = item
        if not path.is_file():
            raise PrepareError(f"{path}: image listed in images.txt not found")
        image = decode(path, "RGB")
        return resize(crop_box(image, box, path) if box else image, size)

    return assemble(classes, load_one, (3, size, size), desc="cub"), "chen2019"
