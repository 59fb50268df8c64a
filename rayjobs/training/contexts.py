"""Where a training loop runs: the WorkerContext protocol and the plain in-process LocalContext.

rayjobs.cluster.worker.RayContext is the Ray Train one. A context gives the rank, world size and device,
``report`` (metrics and, at checkpoints, the checkpoint directory) and the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Protocol

import torch

from rayjobs.training import checkpoint


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...


class LocalContext:
    """One process, no Ray: checkpoints go to <run_dir>/checkpoints/local_step_N (copied under a hidden
    temporary name, then renamed into place); resume picks the newest complete one (checkpoint.verify)."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, device: str | torch.device = "cpu"):
        self.root = Path(run_dir) / "checkpoints"
        self.device = torch.device(device)
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = Path(self.checkpoint_location(metrics["step"]))
            tmp = target.with_name(f".{target.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)

    def checkpoint_location(self, step: int) -> str:
        return str(self.root / f"local_step_{step:06d}")

    @contextlib.contextmanager
    def latest_checkpoint(self):
        found = sorted(self.root.glob("local_step_*")) if self.root.exists() else []
        for directory in reversed(found):
            try:
                checkpoint.verify(directory)
            except checkpoint.CheckpointError as err:  # interrupted while written: fall back to the one before
                print(f"draftray: skipping {err}", file=sys.stderr)
                continue
            yield directory
            return
        yield None
