"""One process per run directory, experiment, sweep or store: a lock beside the folder.

The lock is a POSIX record lock (fcntl.lockf) on `.NAME.lock` next to the folder NAME: the
kernel, or the NFS lock manager and Lustre's, grants it to one process at a time and releases
it when that process dies, however it dies (SIGKILL included), so a stale lock never blocks a
later run. The holder writes its host and PID into the file, so that a refusal names it.
It lives beside the folder, not in it, because it must exist before the folder does and must
not make an empty folder look used; the holder removes it when done (one left by a killed
holder is reused by the next one).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from amfs_dist.errors import UserError

POLL_S = 1.0
_held: set[str] = set()  # POSIX locks are per process: a second lock from this one must fail


def lock_path(folder: str | Path) -> Path:
    folder = Path(os.path.realpath(folder))  # one lock whichever link or relative path names it
    return folder.parent / f".{folder.name}.lock"


def add_wait_flag(parser) -> None:
    parser.add_argument("--wait-for-lock", action="store_true",
                        help="if another amfs process is using --out, wait until it ends "
                             "instead of refusing")


def wait_until_free(folder: str | Path, what: str, wait: bool = False) -> None:
    """Refuse (or, with wait, wait) now if another process holds `folder`, writing nothing: a
    long job checks this before it starts, and holds the lock only to write its result."""
    if str(lock_path(folder)) in _held:
        return  # this process holds it (closing another descriptor would release it)
    try:
        fd = os.open(lock_path(folder), os.O_RDWR)
    except FileNotFoundError:
        return  # nobody holds it
    try:
        _lock(fd, folder, lock_path(folder), what, wait, announced=False)
    finally:
        os.close(fd)  # releases it at once


@contextlib.contextmanager
def hold(folder: str | Path, what: str, wait: bool = False) -> Iterator[Path]:
    """Own `folder` (a run directory, ...) for the block. If another process owns it: a
    UserError naming that process, or, with wait, wait for it, saying so once."""
    path = lock_path(folder)
    if str(path) in _held:
        raise UserError(f"{folder}: this process uses the {what} already")
    path.parent.mkdir(parents=True, exist_ok=True)
    announced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            announced = _lock(fd, folder, path, what, wait, announced)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        _held.add(str(path))
        yield path
    finally:
        _held.discard(str(path))
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked: a waiter that opened it sees it gone and retries
        os.close(fd)


def _lock(fd: int, folder, path: Path, what: str, wait: bool, announced: bool) -> bool:
    """Lock `fd`; if another process holds it, refuse or wait (saying so once). Returns
    whether the wait was announced."""
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return announced
        except OSError:
            holder = _holder(fd)
        if not wait:
            raise UserError(f"{folder}: the {what} is in use by {holder} (lock {path}); "
                            f"wait for it to end, or pass --wait-for-lock")
        if not announced:
            print(f"amfs: waiting for {holder} to release the {what} {folder}",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(POLL_S)


def _holder(fd: int) -> str:
    try:
        host, pid = os.pread(fd, 300, 0).decode(errors="replace").split()
        return f"PID {pid} on host {host}"
    except (OSError, ValueError):
        return "another process (it has not written its host and PID yet)"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
