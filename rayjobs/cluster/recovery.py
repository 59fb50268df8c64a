"""Before Ray Train starts a run: its checkpoints checked, and Ray's record of them made to agree with them.

Ray Train V2 keeps the checkpoints it registered in ``checkpoint_manager_snapshot.json`` beside them; a new
TrainController with the same run name resumes from that record's latest entry. Three states of the storage
break that (docs/reliability.md, "Torn checkpoints"):

- the newest checkpoint is torn (a file no longer matches its manifest: cut short, altered, lost). Left as
  it is, the workers fall back to an older one and then write the newer steps again under names the record
  already holds; when ``num_to_keep`` drops the stale entry, Ray deletes the live directory of that name;
- the record names a directory that is gone: TrainController refuses to start, on every later start;
- the newest complete checkpoint is not in the record (uploaded, then the driver died before Ray
  registered it), or there is no record at all.

``reconcile`` runs in the driver, which holds the run's lock (rayjobs/runlock.py), before Ray Train sees the
storage. It deletes torn checkpoints newer than the newest complete one, and when the record does not have
that one as its latest (or names a missing directory) it sets the record aside; the workers then start from
the checkpoint it returns (rayjobs/cluster/worker.py: RayContext.latest_checkpoint). With no complete
checkpoint at all the run starts from step 0, with one line that says so.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from rayjobs.training.manifest import CheckpointError, LocalFiles, newest_first, parse_name, verify

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the registered checkpoints, in its storage


class ArrowFiles:
    """A checkpoint directory in remote storage (s3://, gs://), for manifest.verify: manifests are read, files
    sized; not hashed, which would download the checkpoint to the driver (each worker hashes what it loads)."""

    def __init__(self, fs: pafs.FileSystem, directory: str):
        self.fs, self.directory = fs, directory

    def read_text(self, name: str) -> str | None:
        if self.size(name) is None:
            return None
        with self.fs.open_input_stream(f"{self.directory}/{name}") as f:
            return f.read().decode("utf-8")

    def size(self, name: str) -> int | None:
        [info] = self.fs.get_file_info([f"{self.directory}/{name}"])
        return info.size if info.type == pafs.FileType.File else None

    def sha256(self, name: str) -> None:
        return None


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a run's checkpoint root: a URI or a local path."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())


def checkpoint_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    """The checkpoint directory names under ``path``, newest first ([] when ``path`` does not exist)."""
    [top] = fs.get_file_info([path])
    if top.type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return newest_first(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def has_checkpoints(root: str) -> bool:
    """Whether the run wrote any checkpoint (for a failure's advice); True when the storage cannot be read."""
    try:
        return bool(checkpoint_dirs(*open_root(root)))
    except OSError:
        return True


def files_of(fs: pafs.FileSystem, directory: str):
    return LocalFiles(Path(directory)) if isinstance(fs, pafs.LocalFileSystem) else ArrowFiles(fs, directory)


def read_record(fs: pafs.FileSystem, path: str) -> tuple[set[str], str | None] | None:
    """(names the record holds, its latest) from Ray's snapshot; None without one. A record that cannot be read
    (another Ray version's format) holds nothing this module can trust: (set(), None)."""
    snapshot = f"{path}/{SNAPSHOT}"
    [info] = fs.get_file_info([snapshot])
    if info.type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(snapshot) as f:
            state = json.loads(f.read().decode("utf-8"))
        latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return set(_dir_names(state)), latest
    except (ValueError, AttributeError):
        return set(), None


def _dir_names(node):
    """Every ``checkpoint_dir_name`` value in the snapshot, wherever its format keeps them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "checkpoint_dir_name" and isinstance(value, str):
                yield value
            else:
                yield from _dir_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dir_names(value)


def newest_complete(fs: pafs.FileSystem, path: str, names: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest of ``names`` that verifies, and the (name, why) of every newer one that does not."""
    torn = []
    for name in names:
        try:
            verify(files_of(fs, f"{path}/{name}"))
        except CheckpointError as err:
            torn.append((name, str(err)))
            continue
        return name, torn
    return None, torn


def reconcile(root: str, keep: int | None, run: str) -> str | None:
    """Makes the checkpoints under ``root`` and Ray's record of them agree (see the module's docstring); returns
    the checkpoint the workers start from when Ray's record was set aside, else None (Ray's record decides, or
    the run starts at step 0). ``keep``: the run's ``num_to_keep`` (None: every checkpoint is kept)."""
    fs, path = open_root(root)
    names = checkpoint_dirs(fs, path)
    record = read_record(fs, path)
    if not names and record is None:
        return None  # a new run
    valid, torn = newest_complete(fs, path, names)
    for name, why in torn:
        fs.delete_dir(f"{path}/{name}")
        say(f"removed the torn checkpoint {name} of run {run} ({why.split(': ', 1)[-1]})")
    held, latest = record if record is not None else (set(), None)
    missing = sorted(held - set(names))
    if record is not None and latest == valid and not missing:
        if keep is not None:
            prune_leftovers(fs, path, names, held, latest)
        return None
    if record is not None:
        aside = f"{path}/{SNAPSHOT}.stale-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
        fs.move(f"{path}/{SNAPSHOT}", aside)
        why = f"it names missing {', '.join(missing)}" if missing else f"its latest is {latest or 'unreadable'}"
        say(f"Ray's checkpoint record of run {run} does not match its checkpoints ({why}); set aside as {Path(aside).name}")
    if valid is None:
        say(f"no complete checkpoint of run {run} is left: it starts again from step 0")
        return None
    say(f"run {run} resumes from its newest complete checkpoint, {valid}")
    return valid


def prune_leftovers(fs: pafs.FileSystem, path: str, names: list[str], held: set[str], latest: str) -> None:
    """Checkpoints older than the record's latest that it does not hold: Ray dropped them (num_to_keep) and died
    before deleting them, or they predate a record that was set aside. Ray would never delete them."""
    newest = parse_name(latest)
    old = [n for n in names if n not in held and parse_name(n) < newest]
    for name in old:
        fs.delete_dir(f"{path}/{name}")
    if old:
        say(f"removed {len(old)} checkpoint(s) no longer kept ({', '.join(sorted(old))})")


def say(line: str) -> None:
    print(f"draftray: {line}", file=sys.stderr)
