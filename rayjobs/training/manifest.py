"""What makes a checkpoint directory complete, and how its directories are named; no torch.

rayjobs/training/checkpoint.py writes the manifests (rank 0's ``manifest.json``, ``manifest_rank{r}.json``
of the others, each written last) and loads checkpoints; this module checks them. It needs neither torch
nor Ray, so the driver (and a sweep's trial, which imports no torch) can check a run's checkpoints before
Ray Train starts (rayjobs/cluster/recovery.py).

Names: a checkpoint of optimizer step N lives in ``step_NNNNNN``. A run that had to fall back past
checkpoints Ray Train had already registered writes its later ones as ``step_NNNNNN-G`` (G = 1, 2, ...),
so that it never writes into a directory name Ray's bookkeeping holds (docs/reliability.md, "Torn
checkpoints").
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
NAME = re.compile(r"step_(\d{6})(?:-(\d+))?")  # step_000012, or step_000012-1 after a fall-back


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete (its writing was interrupted) or whose files do not match its manifest."""


def manifest_name(rank: int) -> str:
    return MANIFEST if rank == 0 else f"manifest_rank{rank}.json"


def checkpoint_name(step: int, generation: int = 0) -> str:
    """The directory name of step ``step``'s checkpoint; generation > 0 after a fall-back (see above)."""
    return f"step_{step:06d}" + (f"-{generation}" if generation else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """(step, generation) of a checkpoint directory name; None for any other name."""
    m = NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def newest_first(names) -> list[str]:
    """The checkpoint directory names among ``names``, newest first: by step, then by generation (a later
    generation of the same step was written after the fall-back that made it)."""
    return sorted((n for n in names if parse_name(n) is not None), key=parse_name, reverse=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalFiles:
    """The files of a checkpoint directory on this machine: read, sized and hashed."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def read_text(self, name: str) -> str | None:
        path = self.directory / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def size(self, name: str) -> int | None:
        path = self.directory / name
        return path.stat().st_size if path.is_file() else None

    def sha256(self, name: str) -> str | None:
        return sha256(self.directory / name)


def read_manifest(files, rank: int) -> dict:
    where = getattr(files, "directory", files)
    name = manifest_name(rank)
    try:
        text = files.read_text(name)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {where}: {name} is unreadable ({err})") from err
    if text is None:
        who = "" if rank == 0 else f" (rank {rank}'s)"
        raise CheckpointError(
            f"checkpoint {where} is incomplete: no {name}{who}, so its writing was interrupted "
            "(or it predates manifests); resume from an earlier checkpoint"
        )
    try:
        return json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {where}: {name} is unreadable ({err})") from err


def verify(directory) -> dict:
    """Checks a checkpoint is complete (every rank's manifest, every file there with its size and, where ``files``
    can hash, its sha256); returns rank 0's manifest. Raises CheckpointError naming what is missing or differs.
    ``directory``: a local path, or an object with LocalFiles' methods (``sha256`` may return None: not checked)."""
    files = LocalFiles(directory) if isinstance(directory, (str, Path)) else directory
    where = getattr(files, "directory", directory)
    head = read_manifest(files, 0)
    for rank in range(int(head.get("world_size", 1))):
        manifest = head if rank == 0 else read_manifest(files, rank)
        listed = manifest_name(rank)
        for name, want in manifest.get("files", {}).items():
            size = files.size(name)
            if size is None:
                raise CheckpointError(f"checkpoint {where}: {name} is missing (listed in {listed})")
            if size != want["size"]:
                raise CheckpointError(f"checkpoint {where}: {name} has {size} bytes, {listed} lists {want['size']}: corrupt or tampered")
            digest = files.sha256(name)
            if digest is not None and digest != want["sha256"]:
                raise CheckpointError(f"checkpoint {where}: {name} does not match the sha256 in {listed}: corrupt or tampered")
        missing = [name for name in manifest.get("sharded", []) if files.size(name) is None]
        if missing:
            raise CheckpointError(f"checkpoint {where}: shard files missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return head


def is_complete(directory) -> bool:
    try:
        verify(directory)
    except CheckpointError:
        return False
    return True
