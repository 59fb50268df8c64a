"""Ray Train (V2) glue: one TorchTrainer runs ``train_loop`` on every worker.

With no cluster address a local Ray is started (``address="local"``, so it
never attaches to another cluster on the host); ``ray.address`` / $RAY_ADDRESS
joins an existing one. Checkpoints live in <run dir>/checkpoints (or
``ray.storage_path``); starting a run with the same name resumes from the latest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from rayjobs.cluster.leftovers import reap_stale, watch_session
from rayjobs.cluster.preflight import check_resume, preflight
from rayjobs.cluster.recovery import has_checkpoints, reconcile
from rayjobs.cluster.storage import check_storage, cluster_nodes
from rayjobs.cluster.worker import CHECKPOINTS, StopOnDeterministicError, checkpoint_root, training_failure, worker_entry
from rayjobs.config import Config, to_yaml
from rayjobs.errors import Interrupted, TrainingStopped, UserError
from rayjobs.runlock import hold_run
from rayjobs.runlog import METRICS_FILE, STOP_FILE, STOP_REQUEST, Watcher, new_records, read_metrics

# torch, diffusers and the rewards are imported where used: a sweep's trial actors and Train's
# controller import this module too and need none of them (each import costs seconds per trial).


def run_dir_for(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.objective.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir).resolve() / name


def connect(cfg: Config, verbose: bool = False) -> bool:
    """Joins the configured cluster or starts a local one; returns True if we started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Small runs report often: the controller's default 2 s poll would dominate (docs/references.md).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if address:
        try:
            ray.init(address=address, log_to_driver=verbose)
        except Exception as err:  # noqa: BLE001  (ray raises several types here)
            hint = (
                "; with token auth (on by default for a Ray 2.60 cluster from ray.init()): export RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN=<`ray get-auth-token` on the head>, or RAY_AUTH_MODE=disabled if the cluster has no auth"
            )
            raise UserError(f"ray.address {address!r}: cannot connect ({str(err).splitlines()[0]}){hint}") from None
        return False
    start_local_ray(log_to_driver=verbose)
    return True


def start_local_ray(**kwargs) -> None:
    """A new local cluster (``address="local"``) with its dashboard on a free port that every worker knows.

    Ray Train V2 removes the placement group of a Train run whose controller died (a trial stopped by a
    Tune scheduler) from a cleaner actor that asks the dashboard's state API. Without an address that
    API resolves /tmp/ray/ray_current_cluster, which names another cluster or none when the host has
    several Ray instances; the run's resources then leak and the sweep deadlocks (docs/references.md). The
    raylet and so every worker inherit RAY_API_SERVER_ADDRESS from this process.

    A driver killed without ``ray.shutdown()`` would leave some of the cluster's processes running forever:
    the leftovers of dead drivers are stopped first, and a watchdog guards this one (rayjobs/cluster/leftovers.py).
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray starts workers at nice 15 by default: on a busy host any other process would starve training.
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs.setdefault("log_to_driver", False)
    reap_stale()
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, configure_logging=False, **kwargs)
    watch_session(ray.get_runtime_context().get_session_name())


def fit(cfg: Config, verbose: bool = False) -> Path:
    """Runs (or resumes) training; returns the run directory. SIGTERM (``kill PID``, `draftray jobs stop`) ends it
    as Ctrl-C does, as Interrupted: one line, the checkpoints kept, Ray shut down (docs/reliability.md)."""
    cfg = preflight(cfg)
    run_dir = run_dir_for(cfg)
    received: list[int] = []
    # One driver per run name, from before anything is written until the end (docs/reliability.md, "One run per run name").
    with hold_run(run_dir, cfg.ray.storage_path):
        check_resume(cfg, run_dir)
        started = connect(cfg, verbose)
        try:
            with sigterm_as_ctrl_c(received, delegate=False):
                check_storage(cfg.ray.storage_path, cluster_nodes())
                if started:  # a local cluster never grows: a run larger than it would wait forever
                    check_resources([cfg])
                prepare_run_dir(cfg, run_dir)
                run_trainer(cfg, run_dir)
        except KeyboardInterrupt:
            if not received:
                raise  # Ctrl-C: the CLI's own line
            raise Interrupted(f"training interrupted (SIGTERM); start the same run.name to resume: draftray train {run_dir / 'config.yaml'}", signal.SIGTERM) from None
        finally:
            if started:
                ray.shutdown()
    return run_dir


@contextlib.contextmanager
def sigterm_as_ctrl_c(received: list[int], delegate: bool = True):
    """SIGTERM calls the SIGINT handler in place (Tune's during a sweep's fit; ``delegate`` False: raises
    KeyboardInterrupt instead) and is appended to ``received``. Installed once Ray is connected: ray.init gives
    the driver Ray's own SIGTERM handler, which aborts the process (exit -6: no state saved, no line printed).
    A train run does not delegate: Ray Train's SIGINT handler, in place during TorchTrainer.fit, aborts the run
    and exits 1 without a word; KeyboardInterrupt leaves fit at once, and the checkpoints are already kept."""

    def on_sigterm(signum, frame):
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not delegate or not callable(handler):  # SIG_IGN or SIG_DFL
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    main = threading.current_thread() is threading.main_thread()  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        yield
    finally:
        if main:  # Ray's handler, installed from C, reads as None: the default then
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Creates the run directory with its resolved config.yaml (a second start with the same name resumes)."""
    if (run_dir / "config.yaml").exists():
        done = max((m["step"] for m in read_metrics(run_dir)), default=0)
        print(f"resuming {run_dir.name} (metrics up to step {done})", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in (STOP_FILE, STOP_REQUEST):  # a resumed run starts without an old stop
        (run_dir / leftover).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")


def run_trainer(cfg: Config, run_dir: Path, callbacks: list = (), progress: bool = True, keep: int | None = 3) -> None:
    """Fits one TorchTrainer on the connected cluster; self-stops and failures after the retries become
    TrainingStopped, a worker's deterministic error (not retried) UserError (rayjobs/cluster/worker.py:
    training_failure). ``keep``: checkpoints kept (None = all; a sweep keeps every evaluated one)."""
    root = checkpoint_root(run_dir, cfg.ray.storage_path)
    try:
        _fit_trainer(cfg, run_dir, root, list(callbacks), progress, keep)
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as err:
        raise training_failure(err, cfg.ray.max_failures, checkpointed=has_checkpoints(root)) from err
    stop = run_dir / STOP_FILE
    if stop.exists():
        raise TrainingStopped(stop.read_text(encoding="utf-8").strip())


def _fit_trainer(cfg: Config, run_dir: Path, root: str, callbacks: list, progress: bool, keep: int | None) -> ray.train.Result:
    """``root``: the run's checkpoint folder in its storage (RunConfig's storage_path / name below)."""
    r = cfg.ray
    # Torn checkpoints out, and Ray's record of them agreeing with the rest, before Ray Train reads it.
    start_from = reconcile(root, keep, run_dir.name)
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "start_from": start_from},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,  # adds GPU: 1 per worker
            resources_per_worker={"CPU": r.cpus_per_worker, **r.resources_per_worker},
            accelerator_type=r.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name if r.storage_path else CHECKPOINTS,  # same name in the same storage = resume
            storage_path=r.storage_path or str(run_dir),
            # ray.max_failures retries a worker's failure from the last checkpoint; a deterministic one (a config,
            # shape or type error) ends the run at once instead (docs/reliability.md, "Errors inside a worker").
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            callbacks=[*callbacks, StopOnDeterministicError()],
        ),
    )
    with Progress(run_dir, cfg.train.steps) if progress else contextlib.nullcontext():
        return trainer.fit()


PROGRESS_TERMS = ("loss", "reward", "kl", "denoise", "prior", "loss_scale")


def progress_fields(rec: dict) -> dict[str, str]:
    """The objective's terms this run logs (a supervised run has no reward, a DRaFT run no KL)."""
    return {k: f"{rec[k]:.4g}" for k in PROGRESS_TERMS if isinstance(rec.get(k), (int, float))}


class Progress(Watcher):
    """A live progress line on stderr (step, loss, reward, KL, it/s), read from metrics.jsonl."""

    def __init__(self, run_dir: Path, total: int):
        super().__init__()
        self.path, self.total = Path(run_dir) / METRICS_FILE, total

    def begin(self) -> None:
        from tqdm import tqdm

        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.bar = tqdm(total=self.total, file=sys.stderr, desc="train", dynamic_ncols=True, mininterval=0.5)

    def poll(self) -> None:
        records, self.offset = new_records(self.path, self.offset)
        for rec in records:
            if "loss" in rec:
                self.bar.n = rec["step"]
                self.bar.set_postfix(progress_fields(rec), refresh=False)
                self.bar.refresh()
            elif "eval/reward_mean" in rec:
                self.bar.write(f"eval step {rec['step']}: reward {rec['eval/reward_mean']:.4g} ± {rec['eval/reward_std']:.3g}, kl {rec['eval/kl']:.3g}", file=sys.stderr)

    def end(self) -> None:
        self.bar.close()


def check_resources(variants: list[Config]) -> None:
    """A trial that can never be placed would wait forever: refuse it (one line, before any trial)."""
    have = ray.cluster_resources()
    for c in variants:
        r = c.ray
        need_gpu, need_cpu = (r.num_workers if r.use_gpu else 0), r.num_workers * r.cpus_per_worker
        if need_gpu > have.get("GPU", 0):
            raise UserError(
                f"ray.num_workers: a trial needs {need_gpu} GPUs (one per worker with ray.use_gpu) but the cluster has "
                f"{int(have.get('GPU', 0))}; lower ray.num_workers or add GPUs"
            )
        if need_cpu > have.get("CPU", 0):
            raise UserError(
                f"ray.cpus_per_worker: a trial needs {need_cpu:g} CPUs (ray.num_workers x ray.cpus_per_worker) but the "
                f"cluster has {have.get('CPU', 0):g}; lower them"
            )
