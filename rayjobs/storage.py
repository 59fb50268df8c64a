"""Where a run's files live on a cluster (ray.storage_path, issue 7).

    ray.storage_path None       local: checkpoints in <run dir>/checkpoints. Single node only, because
                                workers on other nodes could not read or write them
    s3://, gs://, shared path   Ray Train writes the checkpoints to <storage_path>/<run name>/; rank 0
                                copies the run directory (metrics.jsonl, samples/, export/, tensorboard/,
                                config.yaml) next to them after every report and at the end

Rank 0 may run on any node, and its run directory is on that node's disk. The copy is what makes
metrics and exports reachable from anywhere (``aws s3 sync``, or the shared filesystem).
"""

from __future__ import annotations

from pathlib import Path

import ray

from rayjobs.errors import UserError

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


def run_uri(storage_path: str, name: str) -> str:
    """<storage_path>/<name>, for URIs and paths alike."""
    return storage_path.rstrip("/") + "/" + name


def sync_run_dir(run_dir: Path, storage_path: str, name: str) -> None:
    """Copies the run directory's files to <storage_path>/<name>/ (pyarrow.fs: local paths, s3://, gs://)."""
    import pyarrow.fs as pafs

    dest_fs, dest = pafs.FileSystem.from_uri(run_uri(storage_path, name))
    if isinstance(dest_fs, pafs.LocalFileSystem) and Path(dest).resolve() == Path(run_dir).resolve():
        return  # the run directory is already on the storage
    local = pafs.LocalFileSystem()
    for entry in sorted(Path(run_dir).iterdir()):
        if entry.name in SKIPPED or entry.name.startswith("."):
            continue
        target = f"{dest}/{entry.name}"
        if entry.is_dir():
            dest_fs.create_dir(target, recursive=True)
        pafs.copy_files(str(entry), target, source_filesystem=local, destination_filesystem=dest_fs)


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
