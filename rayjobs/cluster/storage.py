"""Where a run's files live on a cluster (ray.storage_path; docs/cluster.md).

    ray.storage_path None       local: checkpoints in <run dir>/checkpoints. Single node only, because
                                workers on other nodes could not read or write them
    s3://, gs://, shared path   Ray Train writes the checkpoints to <storage_path>/<run name>/; rank 0
                                copies the run directory (metrics.jsonl, samples/, export/, tensorboard/,
                                config.yaml) next to them after every report and at the end

Rank 0 may run on any node, and its run directory is on that node's disk. The copy is what makes
metrics and exports reachable from anywhere (``aws s3 sync``, or the shared filesystem).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import ray

from rayjobs.errors import UserError
from rayjobs.redaction import redact_text

T = TypeVar("T")
PROBE_BYTES = 1 << 20  # the up-front probe write: a filesystem with less free space than this is full for a run


class StorageError(RuntimeError):
    """A write to the run's storage failed on every attempt (raised in the worker; the run stops with it)."""

SKIPPED = ("checkpoints",)  # Ray Train already wrote these to the storage itself


def cluster_nodes() -> int:
    """Alive nodes of the connected cluster that offer resources (a head with CPU 0 still counts)."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_storage(storage_path: str | None, nodes: int) -> None:
    """A multi-node cluster needs storage every node reaches: refused up front with one line."""
    if storage_path is None and nodes > 1:
        raise UserError(
            f"ray.storage_path: this cluster has {nodes} nodes, and local checkpoints on one node are not visible "
            "to workers on the others; set ray.storage_path to s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a path on "
            "a filesystem every node mounts (NFS/EFS/Filestore)"
        )


def check_writable(location: str, field: str) -> None:
    """Up front, before anything is written: a probe file (PROBE_BYTES, fsynced, deleted again) where the run will
    write. A read-only or full filesystem, a missing bucket, missing credentials or no network fail here with one
    line naming ``field``, instead of at the first checkpoint. A local path that does not exist yet is probed in
    its nearest existing parent (nothing is created)."""
    shown = redact_text(location)
    try:
        if "://" in location:
            _probe_uri(location)
        else:
            _probe_dir(Path(location).expanduser())
    except OSError as err:
        reason = redact_text(str(err).splitlines()[0] if str(err) else type(err).__name__)
        hint = ("check that the bucket exists, the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and the network"
                if "://" in location else "a read-only or full filesystem? free space or choose another path")  # fmt: skip
        raise UserError(f"{field}: cannot write to {shown} ({reason}); {hint}") from None


def _probe_dir(path: Path) -> None:
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    fd, probe = tempfile.mkstemp(prefix=".draftray-probe-", dir=path)
    try:
        left = memoryview(bytes(PROBE_BYTES))
        while left:  # a nearly full filesystem takes a short write first, then ENOSPC
            left = left[os.write(fd, left) :]
        os.fsync(fd)  # a full filesystem can accept the write into the page cache and fail only here
    finally:
        os.close(fd)
        os.unlink(probe)


def _probe_uri(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)  # s3: resolves the bucket's region, so a missing bucket fails here
    probe = f"{path.rstrip('/')}/.draftray-probe-{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as out:
        out.write(b"draftray")
    fs.delete_file(probe)


def retrying(fn: Callable[[], T], what: str, attempts: int, backoff_s: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried up to ``attempts`` times in all when it raises OSError (pyarrow's and the OS's I/O errors:
    a full disk, a read-only mount, an S3 throttle or timeout), waiting backoff_s, 2 backoff_s, ... in between.
    Ray retries a checkpoint upload itself only on a few AWS error codes; a run on spot nodes and a shared
    filesystem meets others. The last failure raises StorageError naming ``what``."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as err:
            reason = redact_text(str(err).splitlines()[0] if str(err) else type(err).__name__)
            if attempt == attempts:
                raise StorageError(f"{what} failed {attempts} times (last: {reason})") from err
            wait = backoff_s * 2 ** (attempt - 1)
            print(f"draftray: {what} failed ({reason}); retry {attempt} of {attempts - 1} in {wait:g} s", file=sys.stderr)
            sleep(wait)
    raise AssertionError("unreachable")


def run_uri(storage_path: str, name: str) -> str:
    """<storage_path>/<name>, for URIs and paths alike."""
    return storage_path.rstrip("/") + "/" + name


def sync_run_dir(run_dir: Path, storage_path: str, name: str, synced: dict | None = None) -> int:
    """Copies the run directory's files to <storage_path>/<name>/ (pyarrow.fs: local paths, s3://, gs://).

    ``synced`` (path -> (size, mtime_ns), kept by the caller across calls) skips the files unchanged since
    the last copy, so a report uploads only what is new: grids, metrics.jsonl, the export. Returns the
    number of files copied."""
    import pyarrow.fs as pafs

    dest_fs, dest = pafs.FileSystem.from_uri(run_uri(storage_path, name))
    if isinstance(dest_fs, pafs.LocalFileSystem) and Path(dest).resolve() == Path(run_dir).resolve():
        return 0  # the run directory is already on the storage
    synced = {} if synced is None else synced
    local, copied = pafs.LocalFileSystem(), 0
    for path in sorted(Path(run_dir).rglob("*")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in SKIPPED or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        stat = path.stat()
        if synced.get(str(rel)) == (stat.st_size, stat.st_mtime_ns):
            continue
        dest_fs.create_dir(dest if rel.parent == Path(".") else f"{dest}/{rel.parent.as_posix()}", recursive=True)
        pafs.copy_files(str(path), f"{dest}/{rel.as_posix()}", source_filesystem=local, destination_filesystem=dest_fs)
        synced[str(rel)] = (stat.st_size, stat.st_mtime_ns)
        copied += 1
    return copied


PULLED = ("metrics.jsonl", "samples", "tensorboard")


def pull_run_dir(run_dir: Path, storage_path: str, name: str) -> int:
    """Before rank 0 trains: bring back what an earlier attempt synced and this node lacks (rank 0 may land
    on another node after a lost node or a resubmitted job). metrics.jsonl is append-only: the longer copy
    wins. Other files are copied when missing here. Returns the number of files copied."""
    import pyarrow.fs as pafs

    src_fs, src = pafs.FileSystem.from_uri(run_uri(storage_path, name))
    if isinstance(src_fs, pafs.LocalFileSystem) and Path(src).resolve() == Path(run_dir).resolve():
        return 0
    copied = 0
    for top in PULLED:
        [entry] = src_fs.get_file_info([f"{src}/{top}"])
        infos = [entry]  # a file, or nothing there
        if entry.type == pafs.FileType.Directory:
            infos = src_fs.get_file_info(pafs.FileSelector(entry.path, recursive=True))
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            local = Path(run_dir) / info.path[len(src) + 1 :]
            if local.exists() and (top != "metrics.jsonl" or local.stat().st_size >= info.size):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(local), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
            copied += 1
    return copied
