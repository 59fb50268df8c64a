"""The Ray Train worker side: each worker's entry point and its WorkerContext (rayjobs/training/contexts.py).

RayContext reports metrics and checkpoints to Ray Train, uploads a checkpoint with retries
(ray.upload_attempts, rayjobs/cluster/storage.py), copies the run directory to ray.storage_path, and restores from
the newest checkpoint that passes checkpoint.verify. rayjobs/cluster/driver.py builds the TorchTrainer around
``worker_entry``. torch is imported where used (Train's controller imports this module too).
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import ray
import ray.train

from rayjobs.cluster.storage import StorageError, pull_run_dir, retrying, run_uri, sync_run_dir
from rayjobs.config import Config
from rayjobs.runlog import PLACEMENT_GROUPS

CHECKPOINTS = "checkpoints"  # <run dir>/checkpoints: Ray Train's storage for a run without ray.storage_path


class RayContext:
    """The WorkerContext of a Ray Train worker."""

    def __init__(self, run_dir: Path, storage_path: str | None = None, attempts: int = 3, backoff_s: float = 2.0):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir, self.storage_path = Path(run_dir), storage_path
        self.attempts, self.backoff_s = attempts, backoff_s
        self.synced: dict = {}  # files already copied to the storage (rayjobs/cluster/storage.py)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Every rank's files land in one directory per step (rank 0: weights, all: RNG state).
        name = f"step_{metrics['step']:06d}" if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name, checkpoint_upload_fn=self._upload if ckpt else None)
        self.sync()

    def _upload(self, ckpt: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """Ray's own copy into the run's storage, retried (ray.upload_attempts); registered only once whole."""
        storage = ray.train.get_context().get_storage()
        what = f"checkpoint upload of {name} to {self.checkpoint_location(int(name.split('_')[-1]))}"
        try:
            return retrying(lambda: storage.persist_current_checkpoint(ckpt, name), what, self.attempts, self.backoff_s)
        except StorageError:  # never registered; remove what part of it landed (it would read as a checkpoint)
            with contextlib.suppress(OSError):
                storage.storage_filesystem.delete_dir(storage.build_checkpoint_path_from_name(name))
            raise

    def checkpoint_location(self, step: int) -> str:
        """Where the step's checkpoint lands (rayjobs.cluster.driver._fit_trainer's RunConfig), for messages."""
        root = run_uri(self.storage_path, self.run_dir.name) if self.storage_path else str(self.run_dir / CHECKPOINTS)
        return f"{root}/step_{step:06d}"

    def sync(self) -> None:
        """Rank 0 copies the run directory next to the checkpoints in ray.storage_path (rayjobs/cluster/storage.py)."""
        if self.rank == 0 and self.storage_path:
            what = f"copy of the run directory to {run_uri(self.storage_path, self.run_dir.name)}"
            retrying(lambda: sync_run_dir(self.run_dir, self.storage_path, self.run_dir.name, self.synced), what, self.attempts, self.backoff_s)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        """The latest checkpoint Ray registered, or, when it fails checkpoint.verify (files altered or lost in the
        storage after the upload), the newest older step_NNNNNN beside it that passes (every rank picks the
        same); None before the first."""
        from rayjobs.training import checkpoint  # imports torch: not at module level (see above)

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        for candidate in [ckpt, *_older_checkpoints(ckpt)]:
            with candidate.as_directory() as directory:
                try:
                    checkpoint.verify(Path(directory))
                except checkpoint.CheckpointError as err:
                    print(f"draftray: skipping {err}", file=sys.stderr)
                    continue
                yield Path(directory)
                return
        raise checkpoint.CheckpointError(f"no complete checkpoint beside {ckpt.path}: start a new run.name")


def _older_checkpoints(ckpt: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The step_NNNNNN directories beside ``ckpt`` in its storage with a lower step, newest first."""
    import pyarrow.fs as pafs

    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and re.fullmatch(r"step_\d{6}", i.base_name)
                    and i.base_name < name), reverse=True)  # fmt: skip
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=ckpt.filesystem) for n in older]


def worker_entry(config: dict) -> None:
    from rayjobs.training.loop import train_loop

    cfg = Config.model_validate(config["cfg"])
    ctx = RayContext(Path(config["run_dir"]), cfg.ray.storage_path, cfg.ray.upload_attempts, cfg.ray.upload_backoff_s)
    if ctx.rank == 0:
        record_placement_group(Path(config["run_dir"]))
        if cfg.ray.storage_path:
            pull_run_dir(Path(config["run_dir"]), cfg.ray.storage_path, Path(config["run_dir"]).name)
    train_loop(cfg, Path(config["run_dir"]), ctx)
    ctx.sync()  # the export and the last metrics


def record_placement_group(run_dir: Path) -> None:
    """Note this worker group's placement group in the run directory. A sweep frees it when Tune ends the
    trial (rayjobs/tune/sweep.py: ReleaseTrainResources): a placement group lives as long as the job that made
    it, not the Train controller (ray-project/ray#54305), and a stopped trial's must not wait for Train's
    own cleaner, which polls the state API."""
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        with open(run_dir / PLACEMENT_GROUPS, "a", encoding="utf-8") as f:
            f.write(pg.id.hex() + "\n")
