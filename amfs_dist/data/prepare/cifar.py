"""FC100 and CIFAR-FS: few-shot splits of CIFAR-100 (Krizhevsky 2009).

Layout (SRC may also be the cifar-100-binary / cifar-100-python folder itself):
    SRC/cifar-100-binary/train.bin, test.bin   records of 3074 bytes: coarse label, fine label,
                                               then 32x32 R, G and B planes (row-major)
    SRC/cifar-100-binary/fine_label_names.txt, coarse_label_names.txt   one name a line
or, only with --allow-pickle, the Python version:
    SRC/cifar-100-python/train, test, meta     pickled dicts
The train and test images of CIFAR-100 are pooled per class (600 per class); the few-shot
splits are over classes:
  fc100     Oreshkin et al. 2018: superclasses 12 / 4 / 4 (60 / 20 / 20 classes)
  cifar-fs  Bertinetto et al. 2019: classes 64 / 16 / 20
Every class's group is its CIFAR-100 superclass. Output: RGB 32x32 (--image-size to resize).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from amfs_dist.data.episodes import SPLITS, ImageSet
from amfs_dist.data.prepare.common import (
    ClassSpec,
    PrepareError,
    PrepareOptions,
    check_split_classes,
    image_set,
    require_file,
    resize_array,
    split_file_path,
    split_list,
    unpickle,
)

RECORD_BYTES = 2 + 3 * 32 * 32
NATIVE_SIZE = 32


class Cifar100:
    """All 60000 images (train then test) with their fine and coarse labels and names."""

    def __init__(self, pixels, fine, coarse, fine_names, coarse_names, where: str):
        self.pixels, self.fine, self.coarse = pixels, fine, coarse
        self.fine_names, self.coarse_names, self.where = fine_names, coarse_names, where
        if fine.size and (fine.max() >= len(fine_names) or coarse.max() >= len(coarse_names)):
            raise PrepareError(f"{where}: labels beyond the {len(fine_names)} fine / "
                               f"{len(coarse_names)} coarse label names (corrupt data?)")
        for f in np.flatnonzero(np.bincount(fine, minlength=len(fine_names)) == 0):
            raise PrepareError(f"{where}: class '{fine_names[f]}' has no images")
        self.superclass: dict[str, str] = {}
        for f, c in {(int(f), int(c)) for f, c in zip(fine, coarse)}:
            name = fine_names[f]
            if self.superclass.setdefault(name, coarse_names[c]) != coarse_names[c]:
                raise PrepareError(f"{where}: class '{name}' has images with two superclasses")

    def rows(self, class_name: str) -> np.ndarray:
        return np.flatnonzero(self.fine == self.fine_names.index(class_name))


def _names(path: Path) -> list[str]:
    return [line.strip() for line in require_file(path, "CIFAR-100 label names")
            .read_text().splitlines() if line.strip()]


def read_binary(folder: Path) -> Cifar100:
    parts = []
    for name in ("train.bin", "test.bin"):
        path = require_file(folder / name, "CIFAR-100 binary version")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD_BYTES:
            raise PrepareError(f"{path}: {raw.size} bytes is not a whole number of "
                               f"{RECORD_BYTES}-byte records (truncated or not CIFAR-100 "
                               f"binary)")
        parts.append(raw.reshape(-1, RECORD_BYTES))
    records = np.concatenate(parts)
    return Cifar100(records[:, 2:].reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE),
                    records[:, 1].astype(np.int64), records[:, 0].astype(np.int64),
                    _names(folder / "fine_label_names.txt"),
                    _names(folder / "coarse_label_names.txt"), str(folder))


def read_python(folder: Path, allow_pickle: bool) -> Cifar100:
    def load(name):
        path = require_file(folder / name, "CIFAR-100 python version")
        content = unpickle(path, allow_pickle, encoding="latin1")
        if not isinstance(content, dict):
            raise PrepareError(f"{path}: expected a pickled dict")
        return path, content

    meta_path, meta = load("meta")
    pixels, fine, coarse = [], [], []
    for name in ("train", "test"):
        path, part = load(name)
        try:
            data = np.asarray(part["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            fine.append(np.asarray(part["fine_labels"], np.int64))
            coarse.append(np.asarray(part["coarse_labels"], np.int64))
        except (KeyError, ValueError) as e:
            raise PrepareError(f"{path}: not a CIFAR-100 python batch ({e})") from None
        if not len(data) == len(fine[-1]) == len(coarse[-1]):
            raise PrepareError(f"{path}: {len(data)} images but {len(fine[-1])} labels")
        pixels.append(data)
    try:
        fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    except KeyError as e:
        raise PrepareError(f"{meta_path}: missing {e}") from None
    return Cifar100(np.concatenate(pixels), np.concatenate(fine), np.concatenate(coarse),
                    fine_names, coarse_names, str(folder))


def read_cifar100(src: Path, allow_pickle: bool) -> Cifar100:
    for folder in (src / "cifar-100-binary", src):
        if (folder / "train.bin").is_file():
            return read_binary(folder)
    for folder in (src / "cifar-100-python", src):
        if (folder / "meta").is_file() and (folder / "train").is_file():
            return read_python(folder, allow_pickle)
    raise PrepareError(f"{src / 'cifar-100-binary' / 'train.bin'}: file not found (CIFAR-100 "
                       f"binary version; or cifar-100-python/ with --allow-pickle)")


def fc100_classes(cifar: Cifar100) -> list[ClassSpec]:
    rows = split_list("fc100")
    present = {s for c, s in cifar.superclass.items() if len(cifar.rows(c))}
    check_split_classes(sorted(present), [s for _, s in rows], f"{cifar.where} (superclasses)",
                        split_file_path("fc100"))
    split_of = {superclass: split for split, superclass in rows}
    classes = [ClassSpec(name, split_of[cifar.superclass[name]], cifar.superclass[name])
               for name in cifar.fine_names if cifar.superclass.get(name) in split_of]
    return sorted(classes, key=lambda spec: SPLITS.index(spec.split))  # stable: name order kept


def cifar_fs_classes(cifar: Cifar100) -> list[ClassSpec]:
    rows = split_list("cifar_fs")
    present = [c for c in cifar.superclass if len(cifar.rows(c))]
    check_split_classes(present, [c for _, _, c in rows], cifar.where, split_file_path("cifar_fs"))
    for _, superclass, name in rows:
        if cifar.superclass[name] != superclass:
            raise PrepareError(f"{cifar.where}: class '{name}' has superclass "
                               f"'{cifar.superclass[name]}', but {split_file_path('cifar_fs')} "
                               f"says '{superclass}' (wrong label name files?)")
    return [ClassSpec(name, split, superclass) for split, superclass, name in rows]


def load(src: Path, opts: PrepareOptions, benchmark: str) -> tuple[ImageSet, str]:
    cifar = read_cifar100(src, opts.allow_pickle)
    classes = fc100_classes(cifar) if benchmark == "fc100" else cifar_fs_classes(cifar)
    rows = [cifar.rows(spec.name) for spec in classes]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(r) for r in rows])
    images = resize_array(cifar.pixels[np.concatenate(rows)], opts.image_size or NATIVE_SIZE,
                          desc=benchmark)
    split_name = "oreshkin2018" if benchmark == "fc100" else "bertinetto2019"
    return image_set(np.ascontiguousarray(images), labels, classes), split_name
