"""What every converter shares: split lists, checked paths, decoding, resizing, assembling."""
from __future__ import annotations

import os
import pickle
import stat
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from amfs_dist.data.episodes import SPLITS, ImageSet
from amfs_dist.errors import UserError

SPLITS_DIR = Path(__file__).resolve().parent.parent / "splits"


class PrepareError(UserError):
    """A data set on disk that does not match its expected layout; names the path or class."""


@dataclass
class PrepareOptions:
    image_size: int | None = None  # None: the data set's default size
    split: str | None = None  # Omniglot only: vinyals or lake
    rotations: bool = False  # Omniglot only
    allow_pickle: bool = False
    bbox_crop: bool = False  # CUB only


@dataclass
class ClassSpec:
    """One class of the output store and where its images come from."""

    name: str
    split: str
    group: str = ""
    items: list = field(default_factory=list)  # image files (or whatever the loader takes)


def split_list(name: str) -> list[list[str]]:
    """The rows of a shipped split list (amfs_dist/data/splits/NAME.txt), comments dropped."""
    rows = []
    for line in (SPLITS_DIR / f"{name}.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(line.split("\t"))
    return rows


def split_file_path(name: str) -> str:
    return f"amfs_dist/data/splits/{name}.txt"


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PrepareError(f"{path}: folder not found ({what})")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        if path.exists():
            raise PrepareError(f"{path}: not a regular file ({what})")
        raise PrepareError(f"{path}: file not found ({what})")
    return path


def inside_src(src: Path, path: Path, where: str) -> Path:
    """`path` if it lies inside `src` once symlinks and '..' are resolved; a list naming
    /etc/... or ../../secret (or a symlink to them) is refused, naming `where` (file, line)."""
    try:
        root, real = src.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise PrepareError(f"{where}: cannot resolve {path} ({e})") from None
    if not real.is_relative_to(root):
        raise PrepareError(f"{where}: {path} lies outside --src {src} (at {real}); amfs reads "
                           f"only files inside --src")
    return path


def open_regular(path: Path):
    """`path` opened for binary reading, if it is a regular file. A FIFO, device or socket is
    refused without waiting on it (a FIFO opened plainly would block until a writer came)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise PrepareError(f"{path}: image file not found") from None
    except OSError as e:
        raise PrepareError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PrepareError(f"{path}: not a regular file (a FIFO, device, socket or folder); "
                           f"refusing to read it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def warn(message: str) -> None:
    print(f"amfs: warning: {message}", file=sys.stderr)


def unpickle(path: Path, allow_pickle: bool, **kwargs):
    """Load a pickle only when the user said so: unpickling can run arbitrary code."""
    if not allow_pickle:
        raise PrepareError(f"{path} is a Python pickle; unpickling can run arbitrary code, so "
                           f"amfs reads it only with --allow-pickle (pass it if you trust the "
                           f"file)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, **kwargs)
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise PrepareError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None


def open_image(path: Path) -> Image.Image:
    """A fully decoded PIL image; a missing, damaged or truncated file is an error naming it.

    PIL rather than torchvision.io: torchvision's decoders are deprecated since 0.29."""
    try:
        with open_regular(path) as f, Image.open(f) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PrepareError(f"{path}: cannot decode image ({e})") from None


def to_tensor(image: Image.Image, mode: str) -> torch.Tensor:
    """uint8 [C, H, W] in PIL mode 'L' (grey) or 'RGB' (grey, palette, CMYK... converted)."""
    return TF.pil_to_tensor(image if image.mode == mode else image.convert(mode))


def decode(path: Path, mode: str) -> torch.Tensor:
    return to_tensor(open_image(path), mode)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize of uint8 [..., C, H, W]: bilinear with antialias; no-op at the size."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BILINEAR,
                     antialias=True)


def resize_array(images: np.ndarray, size: int, desc: str, chunk: int = 1024) -> np.ndarray:
    """Resize a uint8 [N, C, H, W] array in chunks (with progress); no copy at the size."""
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), np.uint8)
    for start in tqdm(range(0, len(images), chunk), desc=desc, unit="chunk", disable=None):
        out[start:start + chunk] = resize(torch.from_numpy(images[start:start + chunk]),
                                          size).numpy()
    return out


def assemble(classes: Sequence[ClassSpec], load: Callable[[object], torch.Tensor],
             shape: tuple[int, int, int], desc: str) -> ImageSet:
    """Load every class's items with `load` (-> uint8 [C, H, W] of `shape`) into an ImageSet.

    Decoding runs on a thread pool (PIL's decoders and torch's resize release the GIL);
    results land in one preallocated array, in class order.
    """
    for spec in classes:
        if not spec.items:
            raise PrepareError(f"class '{spec.name}' ({spec.split} split) has no images")
    items = [item for spec in classes for item in spec.items]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64),
                       [len(spec.items) for spec in classes])
    images = np.empty((len(items),) + tuple(shape), np.uint8)

    def load_into(row: int) -> None:
        image = load(items[row])
        if tuple(image.shape) != tuple(shape):  # the loader resizes; this guards its contract
            raise PrepareError(f"{items[row]}: image shape {tuple(image.shape)}, "
                               f"expected {tuple(shape)}")
        images[row] = image.numpy()

    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        with tqdm(total=len(items), desc=desc, unit="img", disable=None) as bar:
            for _ in pool.map(load_into, range(len(items))):
                bar.update()
    finally:  # on the first bad image, drop the queued rest instead of decoding it all
        pool.shutdown(wait=True, cancel_futures=True)
    return image_set(images, labels, classes)


def image_set(images: np.ndarray, labels: np.ndarray, classes: Sequence[ClassSpec]) -> ImageSet:
    for split in {spec.split for spec in classes} - set(SPLITS):
        raise ValueError(f"unknown split {split!r}")
    return ImageSet(
        images=images, labels=labels, class_names=[spec.name for spec in classes],
        splits={s: np.array([c for c, spec in enumerate(classes) if spec.split == s], np.int64)
                for s in SPLITS},
        groups=[spec.group for spec in classes])


def check_split_classes(found: Sequence[str], listed: Sequence[str], where: str,
                        split_file: str) -> None:
    """Every class of the split list must be present; extra classes are skipped (warned)."""
    present = set(found)
    missing = [c for c in listed if c not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PrepareError(f"class '{missing[0]}'{more} of the split list {split_file} has no "
                           f"images in {where}")
    extra = sorted(present - set(listed))
    if extra:
        warn(f"{len(extra)} class(es) in {where} not in {split_file} skipped "
             f"(e.g. '{extra[0]}')")
