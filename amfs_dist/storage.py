"""Run directories and data stores on object storage (s3://, gs://), through pyarrow's filesystems.

A run whose --out is a URI is trained in a local staging copy (AMFS_CACHE/staging/...): the
run's files are pulled from the URI first (to resume or continue it), and pushed back after
every checkpoint and at the end. Each file is uploaded whole; S3 and GCS make an object visible
only once its upload completes, so a reader sees the old file or the new one, never a part.
result.json is pushed last: when it is there, everything else is too.

A data store at a URI is downloaded once into AMFS_CACHE/stores/<hash of URI and manifest>
and memory-mapped from there, like a local store; a changed store has another manifest (its
content hash), so it is downloaded again.

Credentials and endpoints come from the environment, as the AWS and Google SDKs read them
(pyarrow's S3FileSystem / GcsFileSystem): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an S3-compatible server such as MinIO, e.g.
http://minio:9000; GOOGLE_APPLICATION_CREDENTIALS for GCS.
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from amfs_dist import locks
from amfs_dist.errors import UserError
from amfs_dist.files import cache_dir
from amfs_dist.runs import MARKER

SCHEMES = ("s3", "gs", "gcs")
# How long a GCS request is retried (no network, no credentials: each attempt fails): the
# command then fails with one line after about twice this (docs: README, object storage)
GCS_RETRY_TIME_LIMIT = timedelta(seconds=10)
# the order they are pushed in: result.json last, it says the run is complete
UNSYNCED = ".unsynced"  # in a training copy whose last upload failed
RUN_FILES = (MARKER, "config.yaml", "checkpoint.pt", "metrics.jsonl", "model.pt", "result.json")


def is_uri(path) -> bool:
    return "://" in str(path)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for an s3:// or gs:// URI; anything else is refused."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise UserError(f"{uri}: unsupported storage scheme '{scheme}://' (use s3://, gs:// "
                        f"or a local path)")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{uri}: {_first_line(e)}") from None
    if isinstance(fs, pafs.GcsFileSystem):  # its default: retry for 15 minutes, silently
        rebuild, (options,) = fs.__reduce__()
        fs = rebuild({**options, "retry_time_limit": GCS_RETRY_TIME_LIMIT})
    return fs, path.rstrip("/")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class RemoteRun:
    """A folder at a URI (a run directory, a store) and its local copy."""

    def __init__(self, uri: str, local: Path | None = None):
        self.uri, self.local = uri.rstrip("/"), local
        self.fs, self.path = filesystem(self.uri)
        self.unsynced = False  # a push failed: the local copy holds what the URI lacks

    def info(self, name: str) -> pafs.FileInfo:
        return self._io(lambda: self.fs.get_file_info(f"{self.path}/{name}"))

    def pull(self, names=RUN_FILES) -> None:
        for name in names:
            if self.info(name).type == pafs.FileType.File:
                self._io(lambda name=name: pafs.copy_files(
                    f"{self.path}/{name}", str(self.local / name), source_filesystem=self.fs))

    def push(self, names=RUN_FILES) -> None:
        """Upload those of `names` the local copy has; names=None: all of it, folders too."""
        try:
            if names is None:
                pafs.copy_files(str(self.local), self.path, destination_filesystem=self.fs)
            for name in names or ():
                if (self.local / name).is_file():
                    pafs.copy_files(str(self.local / name), f"{self.path}/{name}",
                                    destination_filesystem=self.fs)
        except OSError as e:
            self.unsynced = True
            raise UserError(f"{self.uri}: upload failed ({_first_line(e)}); the run's files "
                            f"are kept in {self.local}") from None

    def check_writable(self) -> None:
        """Write and delete a probe object: a missing bucket or a read-only key fails now, not
        at the first checkpoint's upload."""
        probe = f"{self.path}/.amfs-write-probe-{uuid.uuid4().hex[:12]}"

        def write_and_delete():
            with self.fs.open_output_stream(probe) as f:
                f.write(b"amfs")
            self.fs.delete_file(probe)
        try:
            write_and_delete()
        except OSError as e:
            raise UserError(f"{self.uri}: not writable ({_first_line(e)}); nothing was "
                            f"trained") from None

    def _io(self, op):
        try:
            return op()
        except OSError as e:  # no such bucket, no credentials, endpoint down, ...
            raise UserError(f"{self.uri}: {_first_line(e)}") from None


@contextlib.contextmanager
def staged_run(uri: str, names=RUN_FILES):
    """Yield a RemoteRun whose local copy holds `names` pulled from `uri`, to read them. User
    errors name the URI, not the local copy, which is removed afterwards unless a push to the
    URI failed."""
    run = RemoteRun(uri)
    root = cache_dir() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_read_copies(root)
    run.local = Path(tempfile.mkdtemp(prefix=f"{_key(run.uri)}-", dir=root))
    with _named_by_uri(run):
        run.pull(names)
        yield run


@contextlib.contextmanager
def training_copy(uri: str, wait_for_lock: bool = False):
    """Yield a RemoteRun for training the run at `uri` in AMFS_CACHE/staging/<hash of uri>,
    locked by this process (see locks.py): two trainings of one URI from this machine (one
    cache) cannot overlap; from two machines they can, object storage has no lock.

    The URI must be writable: a probe object is written and deleted before anything else. A
    copy left by a killed run is replaced by the URI's files; one whose upload failed
    (.unsynced) is uploaded first, as it holds what the URI lacks."""
    run = RemoteRun(uri)
    run.local = cache_dir() / "staging" / _key(run.uri)
    with locks.hold(run.local, f"staging copy of {run.uri}", wait_for_lock), _named_by_uri(run):
        if (run.local / UNSYNCED).is_file():
            run.push()
            (run.local / UNSYNCED).unlink()
        shutil.rmtree(run.local, ignore_errors=True)
        run.local.mkdir(parents=True)
        run.check_writable()
        run.pull()
        yield run


@contextlib.contextmanager
def _named_by_uri(run: RemoteRun):
    """User errors name the URI, not the local copy; the copy goes unless a push failed."""
    try:
        yield
    except UserError as e:
        if not run.unsynced:
            e.args = (str(e).replace(str(run.local), run.uri),)
        raise
    finally:
        if run.unsynced:
            with contextlib.suppress(OSError):
                (run.local / UNSYNCED).touch()
        else:
            shutil.rmtree(run.local, ignore_errors=True)


def _remove_stale_read_copies(root: Path, max_age_s: float = 86400) -> None:
    """Read copies (KEY-RANDOM) that a killed `amfs status` or `amfs eval` left: none of them
    lives a day. Training copies (KEY) are left alone: one may hold what its URI lacks."""
    for path in root.glob("*-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path)


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:12]
