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
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from amfs_dist.errors import UserError
from amfs_dist.runs import MARKER

SCHEMES = ("s3", "gs", "gcs")
# How long a GCS request is retried (no network, no credentials: each attempt fails): the
# command then fails with one line after about twice this (docs: README, object storage)
GCS_RETRY_TIME_LIMIT = timedelta(seconds=10)
# the order they are pushed in: result.json last, it says the run is complete
RUN_FILES = (MARKER, "config.yaml", "checkpoint.pt", "metrics.jsonl", "model.pt", "result.json")


def cache_dir() -> Path:
    return Path(os.environ.get("AMFS_CACHE", Path.home() / ".cache" / "amfs-dist"))


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
                self._io(lambda: pafs.copy_files(f"{self.path}/{name}", str(self.local / name),
                                                 source_filesystem=self.fs))

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

    def _io(self, op):
        try:
            return op()
        except OSError as e:  # no such bucket, no credentials, endpoint down, ...
            raise UserError(f"{self.uri}: {_first_line(e)}") from None


@contextlib.contextmanager
def staged_run(uri: str, names=RUN_FILES):
    """Yield a RemoteRun whose local copy holds `names` pulled from `uri`. User errors name the
    URI, not the local copy, which is removed afterwards unless a push to the URI failed."""
    run = RemoteRun(uri)
    root = cache_dir() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(run.uri.encode()).hexdigest()[:12]
    run.local = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
    try:
        run.pull(names)
        yield run
    except UserError as e:
        if not run.unsynced:
            e.args = (str(e).replace(str(run.local), run.uri),)
        raise
    finally:
        if not run.unsynced:
            shutil.rmtree(run.local, ignore_errors=True)


def cached_store(uri: str) -> Path:
    """A local copy of the data store at `uri`, downloaded once (see the module docstring)."""
    from amfs_dist.data.store import DATA_FILE, MANIFEST_FILE, StoreError
    remote = RemoteRun(uri)
    if remote.info(MANIFEST_FILE).type != pafs.FileType.File:
        raise StoreError(f"{uri}: not an amfs data store ({MANIFEST_FILE} is missing; create "
                         f"one with `amfs data prepare` and upload the folder)")

    def read_manifest() -> bytes:
        with remote.fs.open_input_stream(f"{remote.path}/{MANIFEST_FILE}") as f:
            return f.read()
    manifest = remote._io(read_manifest)
    key = hashlib.sha256(remote.uri.encode() + b"\0" + manifest).hexdigest()[:16]
    local = cache_dir() / "stores" / key
    if not (local / MANIFEST_FILE).is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=local.parent))
        try:
            remote.local = tmp
            remote.pull([DATA_FILE])
            (tmp / MANIFEST_FILE).write_bytes(manifest)
            try:
                os.rename(tmp, local)
            except OSError:  # another process on this node was faster: use its copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local
