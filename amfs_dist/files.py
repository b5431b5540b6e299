"""Writing and reading the files we own: atomically, as strict JSON, and with one-line errors.

Every file amfs writes goes through atomic_write: the content goes to a temporary file beside
the target, which then replaces it (os.replace), so a reader, a crash or a full disk leaves the
old file or the whole new one, never a part; the temporary file is removed on any failure.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from amfs_dist.errors import UserError

MAX_SHOWN = 200  # characters of a user's value shown in a message: a 10 MB value is cut


def cache_dir() -> Path:
    """Where downloads, rendered data and staging copies go: AMFS_CACHE, default
    ~/.cache/amfs-dist."""
    return Path(os.environ.get("AMFS_CACHE", Path.home() / ".cache" / "amfs-dist"))


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """`value` as text, cut to `limit` characters (middle elided) so a message stays readable."""
    text = str(value)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]}[...]{text[-half:]}"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_options) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (open's mode and options); on success
    it replaces `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_options) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the content
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write's error names no file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 2, **options) -> None:
    """Strict JSON: a NaN or infinite float is written as null (missing), as JSON has no such
    numbers and strict readers refuse them."""
    write_text(path, json.dumps(finite_or_none(obj), indent=indent, allow_nan=False,
                                **options) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    import torch
    buffer = io.BytesIO()  # torch's own writer turns a full disk into a RuntimeError
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file we wrote; a torn, empty or non-JSON one is a UserError naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: damaged or not an amfs {what} (not valid JSON); "
                        f"repair or remove it") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path and what the errno means, without Python's repr."""
    meaning = os.strerror(e.errno) if e.errno else (e.strerror or type(e).__name__)
    path = e.filename if e.filename is not None else ""
    if e.errno == errno.ENAMETOOLONG and path:
        longest = max(str(path).split(os.sep), key=len)
        return (f"{shorten(path)}: {meaning} (a path component of {len(longest.encode())} "
                f"bytes; at most 255 are allowed)")
    return f"{shorten(path)}: {meaning}" if path else meaning


def current_umask() -> int:
    """The process's umask. Linux tells it without changing it (os.umask can only set it, and
    setting it even for an instant races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
