"""The Ray Train worker side: each worker's entry point and its WorkerContext (rayjobs/training/contexts.py).

RayContext reports metrics and checkpoints to Ray Train, uploads a checkpoint with retries
(ray.upload_attempts, rayjobs/cluster/storage.py), copies the run directory to ray.storage_path, and restores from
the newest checkpoint that passes manifest.verify. rayjobs/cluster/driver.py builds the TorchTrainer around
``worker_entry``. torch is imported where used (Train's controller imports this module too).

A worker's exception reaches the driver in Ray Train's TrainingFailedError; ``training_failure`` turns it into
the one-line error the user sees, and StopOnDeterministicError ends a run at the first error that a retry would
only repeat (docs/reliability.md, "Errors inside a worker").
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import ray
import ray.train

from rayjobs.cluster.recovery import checkpoint_dirs
from rayjobs.cluster.storage import StorageError, pull_run_dir, retrying, run_uri, sync_run_dir
from rayjobs.config import Config
from rayjobs.errors import TrainingStopped, UserError, capped, first_line
from rayjobs.runlog import PLACEMENT_GROUPS
from rayjobs.training.manifest import CheckpointError, checkpoint_name, parse_name, verify

CHECKPOINTS = "checkpoints"  # <run dir>/checkpoints: Ray Train's storage for a run without ray.storage_path


def checkpoint_root(run_dir: Path, storage_path: str | None) -> str:
    """The run's checkpoint folder in its storage: where Ray Train puts a run of rayjobs/cluster/driver.py's RunConfig
    (storage_path/<run name>, or <run dir>/checkpoints without ray.storage_path)."""
    return run_uri(storage_path, Path(run_dir).name) if storage_path else str(Path(run_dir) / CHECKPOINTS)


class RayContext:
    """The WorkerContext of a Ray Train worker."""

    def __init__(self, run_dir: Path, storage_path: str | None = None, attempts: int = 3, backoff_s: float = 2.0,
                 start_from: str | None = None):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir, self.storage_path = Path(run_dir), storage_path
        self.attempts, self.backoff_s = attempts, backoff_s
        self.synced: dict = {}  # files already copied to the storage (rayjobs/cluster/storage.py)
        # The checkpoint the driver chose when it set Ray's record aside (rayjobs/cluster/recovery.py): the start
        # while Ray holds none of this run's.
        self.start_from = start_from
        # Names of the checkpoints written from here on: step_NNNNNN, or step_NNNNNN-G once a fall-back made
        # generation G (rayjobs/training/manifest.py); set by latest_checkpoint.
        self.generation = 0

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Every rank's files land in one directory per step (rank 0: weights, all: RNG state).
        name = checkpoint_name(metrics["step"], self.generation) if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name, checkpoint_upload_fn=self._upload if ckpt else None)
        self.sync()

    def _upload(self, ckpt: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """Ray's own copy into the run's storage, retried (ray.upload_attempts); registered only once whole."""
        storage = ray.train.get_context().get_storage()
        what = f"checkpoint upload of {name} to {self.root()}/{name}"
        try:
            return retrying(lambda: storage.persist_current_checkpoint(ckpt, name), what, self.attempts, self.backoff_s)
        except StorageError:  # never registered; remove what part of it landed (it would read as a checkpoint)
            with contextlib.suppress(OSError):
                storage.storage_filesystem.delete_dir(storage.build_checkpoint_path_from_name(name))
            raise

    def checkpoint_location(self, step: int) -> str:
        """Where the step's checkpoint lands (rayjobs.cluster.driver._fit_trainer's RunConfig), for messages."""
        return f"{self.root()}/{checkpoint_name(step, self.generation)}"

    def root(self) -> str:
        return checkpoint_root(self.run_dir, self.storage_path)

    def sync(self) -> None:
        """Rank 0 copies the run directory next to the checkpoints in ray.storage_path (rayjobs/cluster/storage.py)."""
        if self.rank == 0 and self.storage_path:
            what = f"copy of the run directory to {run_uri(self.storage_path, self.run_dir.name)}"
            retrying(lambda: sync_run_dir(self.run_dir, self.storage_path, self.run_dir.name, self.synced), what, self.attempts, self.backoff_s)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        """The checkpoint to resume from: the latest Ray registered (or, before any, the driver's choice), or, when
        it fails manifest.verify (files altered or lost in the storage since), the newest older one beside it that
        passes; None before the first, or with one line when none passes (the run starts again from step 0).
        Every rank picks the same. After a fall-back past registered checkpoints, the later ones are written
        under a new generation of names (rayjobs/training/manifest.py), never into a name Ray's record holds."""
        registered = ray.train.get_checkpoint()
        ckpt = registered or self._driver_choice()
        if ckpt is None:
            yield None
            return
        parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
        beside = checkpoint_dirs(ckpt.filesystem, parent)  # every rank lists before any writes a new one
        own = parse_name(_name(ckpt))
        older = [ray.train.Checkpoint(f"{parent}/{n}", filesystem=ckpt.filesystem) for n in beside if own is None or parse_name(n) < own]
        registered_name = registered and _name(registered)
        for candidate in [ckpt, *older]:
            with candidate.as_directory() as directory:
                try:
                    verify(Path(directory))
                except CheckpointError as err:
                    print(f"draftray: skipping {err}", file=sys.stderr)
                    continue
                self.generation = next_generation(_name(candidate), registered_name, beside)
                yield Path(directory)
                return
        print(f"draftray: no complete checkpoint of this run is left beside {ckpt.path}: training starts again from step 0", file=sys.stderr)
        self.generation = next_generation(None, registered_name, beside)
        yield None

    def _driver_choice(self) -> ray.train.Checkpoint | None:
        if self.start_from is None:
            return None
        storage = ray.train.get_context().get_storage()
        return ray.train.Checkpoint(storage.build_checkpoint_path_from_name(self.start_from), filesystem=storage.storage_filesystem)


def next_generation(restored: str | None, registered: str | None, beside: list[str]) -> int:
    """The generation of the names to write after restoring ``restored`` (None: starting from step 0) when Ray's
    latest registered checkpoint is ``registered`` (None: none in this record) and ``beside`` are the checkpoint
    names in the storage. Restoring the registered one (or with none registered) keeps the restored name's
    generation; a fall-back past it takes a generation no name in the storage has yet: Ray's record holds
    names up to the registered one, and writing one of them again would let Ray delete it as a stale entry."""
    if registered is None or restored == registered:
        return parse_name(restored)[1] if restored and parse_name(restored) else 0
    return 1 + max((parse_name(n)[1] for n in [*beside, registered] if parse_name(n)), default=0)


def _name(ckpt: ray.train.Checkpoint) -> str:
    return ckpt.path.rstrip("/").rsplit("/", 1)[-1]


def worker_entry(config: dict) -> None:
    from rayjobs.training.loop import train_loop

    cfg = Config.model_validate(config["cfg"])
    ctx = RayContext(Path(config["run_dir"]), cfg.ray.storage_path, cfg.ray.upload_attempts, cfg.ray.upload_backoff_s,
                     config.get("start_from"))
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


# ---- errors raised inside a worker (docs/reliability.md, "Errors inside a worker") ---------------------------

# Errors that fail the same way on every attempt: bad configuration, shapes and types. A retry restores the last
# checkpoint and runs the same code on the same input, so it only repeats them (ray.max_failures times).
DETERMINISTIC = (UserError, ValueError, TypeError, LookupError, AttributeError, NotImplementedError, ImportError)
# The project's bad-input errors that derive from OSError (which is retried): by name, so that Ray Train's
# controller, which classifies with this module, need not import the model code and torch.
DETERMINISTIC_NAMES = frozenset({"models.components.ModelNotFoundError"})

# Messages of libraries (and of the project, without the field's name in front) that concern one config field.
FIELD_PATTERNS = (
    (r"Target modules? .*(not found in the base model|is not supported)", "trainable.lora_targets"),  # peft's LoRA
    (r"model (path )?'[^']*' (does not exist|lacks|could not be loaded)", "model.name_or_path"),  # models/loading.py
)


class DeterministicWorkerError(UserError):
    """A worker's error that a retry would repeat: raised on Ray Train's controller by StopOnDeterministicError,
    it reaches the driver as the ControllerError's ``controller_failure``. The message is the one line to show."""


class StopOnDeterministicError(ray.train.UserCallback):
    """Ends a run at a worker's first deterministic error (DETERMINISTIC) instead of ray.max_failures retries.

    Ray Train V2's failure policy retries every worker-group error up to FailureConfig.max_failures and has no
    public way to choose which. A UserCallback's ``after_exception`` runs on the controller at the poll that found
    the workers' errors, before the policy decides; an exception raised there ends that controller step as a
    ControllerError, which the policy does not retry: the worker group is shut down and ``fit`` raises it. Every
    other error (a killed worker, a lost node, a storage OSError) passes through to the retries.
    """

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        found = deterministic_failure(worker_exceptions)
        if found is not None:
            raise DeterministicWorkerError(deterministic_message(*found))


def is_deterministic(err: BaseException) -> bool:
    """True for an error that recurs on a retry; False for what a retry can get past: a killed or out-of-memory
    worker, a lost node, a network or storage OSError, a collective's RuntimeError."""
    if any(f"{c.__module__}.{c.__qualname__}" in DETERMINISTIC_NAMES for c in type(err).__mro__):
        return True
    return isinstance(err, DETERMINISTIC) and not isinstance(err, OSError)


def worker_exception(err: BaseException) -> BaseException:
    """The exception the training function raised, from what Ray Train reports for a worker: Ray wraps it with
    its traceback text and passes the exception as the wrapper's first argument. A worker that died (its
    health check failed) has no such exception: its report is returned as it is."""
    inner = err.args[0] if err.args else None
    return inner if isinstance(inner, BaseException) else err


def deterministic_failure(failures: dict) -> tuple[int, BaseException] | None:
    """(rank, exception) of the lowest rank whose exception is deterministic, or None."""
    found = [(rank, worker_exception(err)) for rank, err in failures.items() if is_deterministic(worker_exception(err))]
    return min(found, key=lambda item: item[0]) if found else None


def described(err: BaseException) -> str:
    """``Type: first line of the message`` (capped), one line. A wrapper that holds only a traceback's text
    gives the traceback's last ``Type: message`` line."""
    text = first_line(err)
    if text.startswith("Traceback (most recent call last)"):
        last = [line for line in str(err).splitlines() if re.match(r"[A-Za-z_][\w.]*: ", line)]
        return capped(last[-1]) if last else type(err).__name__
    return type(err).__name__ if text == type(err).__name__ else f"{type(err).__name__}: {capped(text)}"


def config_field(err: BaseException) -> str | None:
    """The config field an error concerns, where its message says: ``section.key: ...`` (the project's own
    messages) or a message of FIELD_PATTERNS; else None."""
    message = str(err).strip()
    named = re.match(r"(?:config )?([a-z_]+(?:\.[A-Za-z0-9_]+)+)\b", message)
    if named and named.group(1).split(".")[0] in Config.model_fields:
        return named.group(1)
    return next((field for pattern, field in FIELD_PATTERNS if re.match(pattern, message, re.S)), None)


def deterministic_message(rank: int, err: BaseException) -> str:
    """The one line for a deterministic worker error: the project's UserError as it is (it names the field and
    the fix), else the exception's type and message, the field where known, and that a retry would not help."""
    if isinstance(err, UserError):
        return capped(str(err), 500)
    field = config_field(err)
    fix = f"fix {field}" if field else "fix the setting or input it names"
    return (f"{field + ': ' if field else ''}training failed on worker rank {rank} with {described(err)}; not retried "
            f"(this kind of error recurs on every attempt): {fix} and start the run again; --verbose shows the traceback")  # fmt: skip


def training_failure(err: BaseException, max_failures: int, checkpointed: bool = True) -> Exception:
    """The one-line error for a failed ``fit``: UserError (exit 2) for a deterministic worker error, which says
    what to fix; else TrainingStopped naming the worker's error, the retries spent, and that the same run.name
    resumes from the checkpoints kept (``checkpointed``) or, with none written yet, starts again from step 0."""
    failure = getattr(err, "controller_failure", None)  # ray.train.ControllerError
    if isinstance(failure, UserError):  # StopOnDeterministicError's, or a callback's own
        return UserError(str(failure))
    failures = getattr(err, "worker_failures", None) or {}  # ray.train.WorkerGroupError
    found = deterministic_failure(failures)
    if found is not None:  # the callback did not end the run (the retries are spent): the advice is the same
        return UserError(deterministic_message(*found))
    if failures:
        rank = min(failures)
        inner = worker_exception(failures[rank])
    else:
        rank, inner = None, failure if isinstance(failure, BaseException) else err
    storage = inner if isinstance(inner, StorageError) else re.search(r"StorageError: (.+)", str(err))
    if storage:  # a worker's upload failed on every retry
        reason = first_line(storage) if isinstance(storage, StorageError) else storage.group(1).strip()
        return TrainingStopped(
            f"{capped(reason, 500)}; the checkpoints before it are kept: free space or fix ray.storage_path, "
            "then start the same run.name to resume"
        )
    tries = max_failures + 1
    attempts = f" after {tries} attempt{'s' if tries > 1 else ''} (ray.max_failures={max_failures})" if failures and max_failures >= 0 else ""
    where = f" on worker rank {rank}" if rank is not None else ""
    then = ("checkpoints are kept, start the same run.name to resume" if checkpointed
            else "no checkpoint was written yet: the same run.name starts again from step 0")  # fmt: skip
    return TrainingStopped(f"training failed{attempts}{where}: {described(inner)}; {then}; --verbose shows the workers' logs")
