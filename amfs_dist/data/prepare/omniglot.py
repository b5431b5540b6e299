"""Omniglot (Lake et al. 2015) from its original / torchvision layout:

    SRC/images_background/<alphabet>/<character>/*.png   (30 alphabets, 964 characters)
    SRC/images_evaluation/<alphabet>/<character>/*.png   (20 alphabets, 659 characters)

Every image is a 105x105 greyscale PNG (mode 1 or L); each character is one class, its group
is its alphabet.

Splits:
  vinyals  the 1200 / 423 character split of Vinyals et al. 2016, with 172 characters of five
           background alphabets carved out for validation (Snell et al. 2017): 1028 / 172 / 423;
           see amfs_dist/data/splits/omniglot_vinyals.txt.
  lake     whole alphabets: images_background for train and val, images_evaluation for test.
           Validation is every sixth background alphabet counting back from the last in
           name order (positions n-1, n-7, n-13, ... of the sorted names; none when there is
           only one alphabet): for the standard 30 that is Balinese, Early_Aramaic,
           Inuktitut_(Canadian_Aboriginal_Syllabics), Mkhedruli_(Georgian) and Tifinagh.
           Works for any alphabets laid out the same way.
--rotations adds the 90, 180 and 270 degree rotations of every character as extra classes in
the same split as the character (so no split sees a rotation of another split's character).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from amfs_dist.data.episodes import ImageSet
from amfs_dist.data.prepare.common import (
    ClassSpec,
    PrepareError,
    PrepareOptions,
    assemble,
    check_split_classes,
    inside_src,
    open_image,
    require_dir,
    resize,
    split_file_path,
    split_list,
    to_tensor,
)

NATIVE_SIZE = 105
DEFAULT_SIZE = 28
FOLDERS = ("images_background", "images_evaluation")
SPLITS = ("vinyals", "lake")


def lake_val_alphabets(names: list[str]) -> set[str]:
    """The background alphabets carved out for validation in the lake split."""
    ordered = sorted(names)
    return set(ordered[::-1][::6]) if len(ordered) > 1 else set()


def load_glyph(path: Path) -> torch.Tensor:
    image = open_image(path)
    if image.mode not in ("1", "L"):
        raise PrepareError(f"{path}: expected a greyscale image (mode 1 or L) as in Omniglot, "
                           f"got mode {image.mode}")
    if image.size != (NATIVE_SIZE, NATIVE_SIZE):
        raise PrepareError(f"{path}: expected {NATIVE_SIZE}x{NATIVE_SIZE} pixels as in "
                           f"Omniglot, got {image.width}x{image.height}")
    return to_tensor(image, "L")


def _alphabets(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}


def _characters(alphabet: Path) -> dict[str, list[Path]]:
    """'<alphabet>/<character>' -> its PNG files, sorted."""
    return {f"{alphabet.name}/{c.name}": sorted(c.glob("*.png"))
            for c in sorted(alphabet.iterdir()) if c.is_dir()}


def vinyals_classes(roots: dict[str, Path], src: Path) -> list[ClassSpec]:
    found: dict[str, list[Path]] = {}
    alphabet_home: dict[str, Path] = {}
    for root in roots.values():
        for name, path in _alphabets(root).items():
            if name in alphabet_home:
                raise PrepareError(f"alphabet '{name}' is in both {alphabet_home[name]} and "
                                   f"{path}")
            alphabet_home[name] = path
            found.update(_characters(path))
    listed = []  # (split, class name, alphabet) in split-list order
    for split, alphabet, span in split_list("omniglot_vinyals"):
        first, last = (int(x) for x in span.split("-"))
        listed += [(split, f"{alphabet}/character{i:02d}", alphabet)
                   for i in range(first, last + 1)]
    check_split_classes([name for name, files in found.items() if files],
                        [name for _, name, _ in listed], str(src),
                        split_file_path("omniglot_vinyals"))
    return [ClassSpec(name, split, alphabet, found[name]) for split, name, alphabet in listed]


def lake_classes(roots: dict[str, Path]) -> list[ClassSpec]:
    background = _alphabets(roots["images_background"])
    evaluation = _alphabets(roots["images_evaluation"])
    for folder, alphabets in zip(FOLDERS, (background, evaluation)):
        if not alphabets:
            raise PrepareError(f"{roots[folder]}: no alphabet folders")
    val = lake_val_alphabets(list(background))
    classes = []
    for alphabets, test in ((background, False), (evaluation, True)):
        for alphabet, path in alphabets.items():
            split = "test" if test else "val" if alphabet in val else "train"
            for name, files in _characters(path).items():
                if not files:
                    raise PrepareError(f"{path / name.split('/', 1)[1]}: character folder "
                                       f"with no PNG images (class '{name}')")
                classes.append(ClassSpec(name, split, alphabet, files))
    return classes


def with_rotations(data: ImageSet) -> ImageSet:
    """Add the 90/180/270 degree rotations of every class as new classes, same split."""
    k_classes = len(data.class_names)
    images = np.concatenate([np.rot90(data.images, k, axes=(2, 3)) for k in range(4)])
    return ImageSet(
        images=np.ascontiguousarray(images),
        labels=np.concatenate([data.labels + k * k_classes for k in range(4)]),
        class_names=[f"{name}/rot{90 * k:03d}" for k in range(4) for name in data.class_names],
        splits={s: np.concatenate([c + k * k_classes for k in range(4)])
                for s, c in data.splits.items()},
        groups=list(data.groups) * 4)


def load(src: Path, opts: PrepareOptions) -> tuple[ImageSet, str]:
    split = opts.split or "vinyals"
    if split not in SPLITS:
        raise PrepareError(f"--split {split}: Omniglot splits are {', '.join(SPLITS)}")
    roots = {f: require_dir(src / f, f"Omniglot layout: SRC/{f}/<alphabet>/<character>/*.png")
             for f in FOLDERS}
    classes = vinyals_classes(roots, src) if split == "vinyals" else lake_classes(roots)
    for spec in classes:  # a symlinked alphabet, character or glyph may point anywhere
        for path in spec.items:
            inside_src(src, path, f"class '{spec.name}'")
    size = opts.image_size or DEFAULT_SIZE
    data = assemble(classes, lambda path: resize(load_glyph(path), size), (1, size, size),
                    desc="omniglot")
    return (with_rotations(data) if opts.rotations else data), split
