"""`draftray sweep`: Ray Tune over config keys; the reward-diversity Pareto front is the product.

Train V2 way (docs/references.md): ``Tuner(TorchTrainer)`` fails, so each trial is a Tune
*function* trainable that builds and fits a TorchTrainer; rank 0's evaluations (and only
those: the searcher and scheduler judge evaluations) reach Tune through ``EvalReportCallback``.
The trial function itself reserves almost nothing ({"cpu": 0.01}); its Train workers take the
real resources (ray.num_workers workers, ray.cpus_per_worker CPUs and, with ray.use_gpu, one GPU
each), so concurrency is capped from the cluster size (SweepConfig.max_concurrent).

Sweep directory (<run.output_dir>/<sweep.name>), see rayjobs/tune/pareto.py for the outputs:
    sweep.yaml            the resolved base config with its sweep section (what --resume reads)
    trials/<trial>/       one full run directory per trial (config, metrics, grids, checkpoints, trial.json)
    tune/                 Tune's own experiment state (what --resume restores)
    trials.csv, pareto.csv, pareto.json, pareto.png, front/, summary.md
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import sys
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from rayjobs.cluster.driver import check_resources, connect, prepare_run_dir, run_trainer, sigterm_as_ctrl_c
from rayjobs.cluster.preflight import preflight
from rayjobs.cluster.storage import check_storage, cluster_nodes, pull_run_dir, sync_run_dir
from rayjobs.config import Config, load_config, set_dotted, to_yaml, validate
from rayjobs.errors import Interrupted, TrainingStopped, UserError, first_line
from rayjobs.runlock import hold_run
from rayjobs.runlog import STOP_REQUEST, Watcher, new_records, read_metrics, read_status, write_status
from rayjobs.tune.pareto import (
    DONE,
    FAILED,
    INTERRUPTED,
    NOT_STARTED,
    STATES,
    STOPPED,
    TRIALS,
    UNFINISHED,
    build_outputs,
    diversity_key,
    get_dotted,
    resume_command,
    unstarted_row,
)
from rayjobs.tune.resources import ReleaseTrainResources
from rayjobs.tune.space import planned_trials, trial_index, tune_space

TUNE = "tune"
TUNE_LOGGER = "ray.tune.tune"  # the logger of tune.run, which tuner.fit calls


def trial_config(base: dict, params: dict, name: str, output_dir: str) -> Config:
    """The base config (a model_dump) with the swept keys set; the trial runs in <output_dir>/<name>.

    With sweep.checkpoint_evals every evaluation is also a checkpoint (train.checkpoint_every =
    train.eval_every), so each point of the front keeps its weights.
    """
    data = copy.deepcopy(base)
    sweep = data.pop("sweep", None) or {}
    for key, value in params.items():
        set_dotted(data, key, value, f"sweep.params.{key}")
    data["run"] = dict(data.get("run", {}), name=name, output_dir=output_dir)
    train = data.get("train", {})
    if sweep.get("checkpoint_evals") and train.get("eval_every"):
        data["train"] = dict(train, checkpoint_every=train["eval_every"])
    return validate(data, where=f"sweep trial {params}: config")


def check_sweep(cfg: Config, base: dict) -> list[Config]:
    """Bad input fails here, before any trial starts: every value a key can take must give a valid
    config, and every metric the sweep judges must be one an evaluation reports."""
    from rayjobs.training.loop import eval_metric_names  # driver only: trial actors need no torch (sweep.py imports stay light)

    variants = [cfg]
    for key, spec in cfg.sweep.params.items():
        for value in spec.grid or spec.choice or list(spec.uniform or spec.loguniform):
            try:
                variants.append(trial_config(base, {key: value}, "check", "check"))
            except UserError as err:
                raise UserError(f"sweep.params.{key}: value {value!r} gives an invalid config ({err})") from None
    s = cfg.sweep
    judged = {"sweep.reward_metric": s.reward_metric, "sweep.diversity_metric": diversity_key(cfg)}
    if s.scheduler is not None:
        judged["sweep.scheduler.metric"] = s.scheduler.metric or s.reward_metric
    for variant in variants:
        reported = eval_metric_names(variant)
        for field, name in judged.items():
            if name not in reported:
                raise UserError(f"{field}: {name!r} is never reported by an evaluation; choose one of {', '.join(sorted(reported))}")
    return variants  # for check_resources once connected


def _trial(params: dict, *, base: dict, trials_dir: str, report_metric: str, keep_all: bool) -> None:
    name = tune.get_context().get_trial_name()
    cfg = trial_config(base, params, name, trials_dir)
    run_dir = Path(trials_dir) / name
    prepare_run_dir(cfg, run_dir)  # a retried or resumed trial continues from its latest checkpoint
    write_status(run_dir, "running")
    finished = _forward_stop(run_dir)
    try:
        run_trainer(cfg, run_dir, callbacks=[EvalReportCallback(report_metric)], progress=False, keep=None if keep_all else 3)
    except BaseException as err:
        write_status(run_dir, "failed", next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__))
        raise
    finally:
        finished.set()
        if cfg.ray.storage_path:  # rank 0 may have run on another node: its metrics and grids, here
            pull_run_dir(run_dir, cfg.ray.storage_path, run_dir.name)
    write_status(run_dir, "done")


class EvalReportCallback(TuneReportCallback):
    """Forwards rank 0's evaluations (the reports holding ``metric``) to Tune, not the training-only
    reports between them: the searcher and scheduler judge evaluations, and Tune's strict metric
    check fails a trial on a result that lacks the judged metric."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _forward_stop(run_dir: Path):
    """When Tune stops this trial (a scheduler's decision), ask the training loop to end (STOP_REQUEST), so
    the Train run shuts down cleanly and frees its placement group itself. Should the trial's process be
    killed first, Ray Train's placement-group cleaner frees it (rayjobs/cluster/driver.py: start_local_ray).
    Returns the event the trial sets once its run has ended."""
    from ray.train._internal.session import get_session

    event, finished = get_session().stop_event, threading.Event()  # stop_event: set by Tune's cleanup on stop

    def watch():
        event.wait()
        if not finished.is_set():  # cleanup after a normal end sets it too
            (run_dir / STOP_REQUEST).touch()

    threading.Thread(target=watch, name="draftray-stop", daemon=True).start()
    return finished


def concurrency(cfg: Config) -> int:
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    r = cfg.ray
    if r.use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 0)) // r.num_workers)
    return max(1, int(ray.cluster_resources().get("CPU", 1) // (r.num_workers * r.cpus_per_worker)))


def _search(cfg: Config):
    s, limit = cfg.sweep, concurrency(cfg)
    if s.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # TPE handles several objectives (MOTPE); seeded so a sweep draws the same trials again.
        sampler = optuna.samplers.TPESampler(seed=s.seed)
        alg = OptunaSearch(metric=[s.reward_metric, diversity_key(cfg)], mode=["max", "max"], sampler=sampler)
        return ConcurrencyLimiter(alg, max_concurrent=limit)
    # The generator caps concurrency itself (Tune ignores max_concurrent_trials with it).
    return tune.search.BasicVariantGenerator(random_state=s.seed, max_concurrent=limit)


def _scheduler(cfg: Config):
    a = cfg.sweep.scheduler
    if a is None:
        return None
    # max_t past every trial's last step: ASHA stops a trial that reaches max_t, which would cut its last
    # report short of the export; trials end themselves at train.steps.
    steps = cfg.sweep.params.get("train.steps")
    longest = max([cfg.train.steps, *(steps.grid or steps.choice or steps.uniform or steps.loguniform)] if steps else [cfg.train.steps])
    return tune.schedulers.ASHAScheduler(
        time_attr="step", metric=a.metric or cfg.sweep.reward_metric, mode="max", max_t=int(longest) + 1,
        grace_period=a.grace_period, reduction_factor=a.reduction_factor,
    )  # fmt: skip


def _trainable(cfg: Config, out: Path):
    fn = tune.with_parameters(
        _trial, base=cfg.model_dump(mode="json"), trials_dir=str(out / TRIALS), report_metric=cfg.sweep.reward_metric,
        keep_all=cfg.sweep.checkpoint_evals,
    )  # fmt: skip
    # The trial driver itself takes no CPU: a fractional CPU per driver (0.01) left 1.98 of 2 CPUs for two
    # concurrent 1-CPU trials, so one waited, and a lingering stopped driver could starve the sweep.
    # Tune refuses an all-zero request, so the driver reserves 1 byte of memory instead.
    # ray.driver_resources (e.g. {draftray_head: 0.001}) pins the drivers to cluster.yaml's CPU head.
    return tune.with_resources(fn, {"cpu": 0, "memory": 1, **cfg.ray.driver_resources})


def sweep_dir_for(cfg: Config) -> Path:
    name = cfg.sweep.name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir).resolve() / name


def run_sweep(cfg: Config, verbose: bool = False) -> Path:
    """Runs every trial, then the inference-time points and the outputs; returns the sweep directory.
    Interrupted (Ctrl-C, SIGTERM) once Tune has started: the outputs list every trial's state, then Interrupted."""
    if cfg.sweep is None:
        raise UserError("sweep: the config has no sweep section (see configs/toy-kl-sweep.yaml)")
    cfg = preflight(cfg)
    variants = check_sweep(cfg, cfg.model_dump(mode="json"))
    out = sweep_dir_for(cfg)
    # One driver per sweep directory, from before anything is written until the end (docs/reliability.md, "One run per run name").
    with hold_run(out, cfg.ray.storage_path, field="sweep.name"):
        if (out / TUNE).exists():
            raise UserError(f"sweep.name: {out} already holds a sweep; `draftray sweep --resume {out}` continues it, or pick another sweep.name")
        with sweep_driver(cfg, out, verbose) as signals:
            check_storage(cfg.ray.storage_path, cluster_nodes())
            check_resources(variants)
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.yaml").write_text(to_yaml(cfg), encoding="utf-8")
            tuner = tune.Tuner(
                _trainable(cfg, out),
                param_space=tune_space(cfg.sweep.params),
                tune_config=tune.TuneConfig(num_samples=cfg.sweep.num_samples, search_alg=_search(cfg), scheduler=_scheduler(cfg)),
                run_config=_run_config(cfg, out, verbose),
            )
            return _finish(cfg, out, tuner, signals)


def resume_sweep(sweep_dir: str | Path, verbose: bool = False) -> Path:
    """Continues a sweep whose driver stopped (Tune's restore): done, stopped and failed trials are kept,
    interrupted ones continue from their latest checkpoints, trials not yet started start."""
    out = Path(sweep_dir).resolve()
    if not (out / "sweep.yaml").is_file() or not tune.Tuner.can_restore(str(out / TUNE)):
        raise UserError(f"--resume {sweep_dir}: not a sweep directory (needs sweep.yaml and tune/ from `draftray sweep`)")
    cfg = preflight(load_config(out / "sweep.yaml"))
    variants = check_sweep(cfg, cfg.model_dump(mode="json"))
    with hold_run(out, cfg.ray.storage_path, field="sweep.name"):  # not while the sweep's own driver still runs
        with sweep_driver(cfg, out, verbose) as signals:
            check_storage(cfg.ray.storage_path, cluster_nodes())
            check_resources(variants)
            tuner = tune.Tuner.restore(str(out / TUNE), _trainable(cfg, out), resume_unfinished=True, resume_errored=False)
            return _finish(cfg, out, tuner, signals)


@contextlib.contextmanager
def sweep_driver(cfg: Config, out: Path, verbose: bool):
    """Ray connected for a sweep's driver (shut down at the end if started here), with SIGTERM doing what Ctrl-C
    does; an interruption once Tune has state to restore ends as Interrupted, one line naming `draftray sweep
    --resume`. Yields the list of the signals received that way (SIGTERM; Tune handles SIGINT itself, so an
    interruption without one is SIGINT).

    During tuner.fit, Tune's SIGINT handler ends the experiment cleanly (it saves its state, stops the running
    trials, and fit returns: _finish tells the interrupted trials from the rest); SIGTERM calls that handler.
    Outside fit the handler in place raises KeyboardInterrupt."""
    received: list[int] = []
    hint = _NoRestoreHint()
    logging.getLogger(TUNE_LOGGER).addFilter(hint)
    try:
        started = connect(cfg, verbose)
        try:
            with sigterm_as_ctrl_c(received):
                yield received
        finally:
            if started:
                ray.shutdown()
    except KeyboardInterrupt:
        if not tune.Tuner.can_restore(str(out / TUNE)):
            raise  # nothing to resume yet: the same command starts the sweep again
        raise Interrupted(f"sweep interrupted ({_signal_name(received)}); continue with: {resume_command(out)}", _signum(received)) from None
    finally:
        logging.getLogger(TUNE_LOGGER).removeFilter(hint)


class _NoRestoreHint(logging.Filter):
    """Drops Tune's warning that an interrupted experiment resumes with ``Tuner.restore(path=..., trainable=...)``:
    Python a user of the CLI cannot run; the sweep's own line names `draftray sweep --resume`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def _signum(received: list[int]) -> int:
    return received[-1] if received else signal.SIGINT


def _signal_name(received: list[int]) -> str:
    return signal.Signals(_signum(received)).name


def _run_config(cfg: Config, out: Path, verbose: bool) -> tune.RunConfig:
    return tune.RunConfig(
        name=TUNE, storage_path=str(out), verbose=1 if verbose else 0,
        failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        callbacks=[ReleaseTrainResources(out / TRIALS)],
    )  # fmt: skip


def _finish(cfg: Config, out: Path, tuner: tune.Tuner, signals: list[int]) -> Path:
    """Runs the trials, records each one's state, writes the outputs. A sweep that ended with trials
    interrupted or not started (Ctrl-C, SIGTERM) raises Interrupted after writing trials.csv and summary.md
    (the inference-time points wait for the resumed sweep's end); failed trials raise TrainingStopped."""
    trials = out / TRIALS
    results = None
    with SweepProgress(trials, list(cfg.sweep.params), cfg.sweep.reward_metric, diversity_key(cfg)):
        try:
            results = tuner.fit()
        except KeyboardInterrupt:  # a second Ctrl-C while Tune stopped the trials: no verdict from Tune
            if not tune.Tuner.can_restore(str(out / TUNE)):
                raise
    _final_status(trials, results)
    unstarted = _unstarted(cfg, trials)
    states = [read_status(d)["status"] for d in _run_dirs(trials)] + [NOT_STARTED] * len(unstarted)
    interrupted = any(s in UNFINISHED for s in states)
    if not interrupted:
        _inference_points(cfg, trials)
    build_outputs(out, cfg, unstarted)
    if cfg.ray.storage_path:  # the front, trials.csv and summary next to the trials' checkpoints
        sync_run_dir(out, cfg.ray.storage_path, out.name)
    if interrupted:
        counts = Counter(states)
        tally = ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in STATES if counts[s])
        raise Interrupted(f"sweep interrupted ({_signal_name(signals)}): {tally} of {len(states)} trials; continue with: {resume_command(out)}",
                          _signum(signals))  # fmt: skip
    failed = [s for s in states if s == FAILED]
    if failed:
        raise TrainingStopped(f"{len(failed)} of {len(states)} trials failed (their errors are in {out / 'trials.csv'}); the front uses the rest")
    return out


def _final_status(trials: Path, results) -> None:
    """Each trial's trial.json from Tune's verdict (``results``, the ResultGrid; None when Tune gave none,
    interrupted itself), see _state."""
    verdicts = {Path(r.path).name: r for r in results} if results is not None else {}  # <trial name>_<index>_<params>_<date>
    for run_dir in _run_dirs(trials):
        result = next((r for name, r in verdicts.items() if name.startswith(run_dir.name + "_")), None)
        write_status(run_dir, *_state(run_dir, result))


def _state(run_dir: Path, result) -> tuple[str, str]:
    """(status, error) of one trial that started. failed: Tune gave up on it (the trial's own first error line
    is kept); done: it evaluated its last step; stopped: Tune ended it early with a last result marked done,
    which is the scheduler's stop (the scheduler's kill also reaches the trial's except clause, so trial.json
    alone cannot tell); interrupted: it ended early without that mark, so only because the sweep ended (an
    interrupted sweep stops its running trials; a trial whose function returns is marked done too)."""
    if result is not None and result.error is not None:
        return FAILED, read_status(run_dir)["error"] or first_line(result.error)
    steps = load_config(run_dir / "config.yaml").train.steps
    if any(m["step"] == steps and "eval/reward_mean" in m for m in read_metrics(run_dir)):
        return DONE, ""
    if result is not None and (result.metrics or {}).get("done"):  # Tune's own "done" metric
        return STOPPED, ""
    return INTERRUPTED, ""


def _unstarted(cfg: Config, trials: Path) -> list[dict]:
    """trials.csv rows of the trials of the search space that have no run directory (rayjobs/tune/space.py):
    by their index in Tune's names with search basic; the last ones of num_samples with search optuna."""
    planned, run_dirs = planned_trials(cfg.sweep), _run_dirs(trials)
    if cfg.sweep.search == "optuna":
        missing = range(len(run_dirs), len(planned))
    else:
        started = {trial_index(d.name) for d in run_dirs}
        missing = [i for i in range(len(planned)) if i not in started]
    base, keys = cfg.model_dump(mode="json"), list(cfg.sweep.params)
    return [unstarted_row(i, planned[i], keys, _kl_coeff(base, planned[i], str(trials))) for i in missing]


def _kl_coeff(base: dict, params: dict | None, trials_dir: str):
    """The kl_coeff a trial with these swept values trains with ("" when they are not drawn yet, or invalid together)."""
    if params is None:
        return ""
    try:
        return trial_config(base, params, "unstarted", trials_dir).objective.weights.kl_coeff
    except UserError:
        return ""


def _run_dirs(trials: Path) -> list[Path]:
    return [d for d in sorted(trials.glob("*")) if (d / "config.yaml").exists()]


def _inference_points(cfg: Config, trials: Path) -> None:
    """LoRA-scale and AIG points on every checkpoint of every trial (sweep.inference; rayjobs/tune/inference_points.py)."""
    knobs = cfg.sweep.inference
    run_dirs = _run_dirs(trials)
    if not (knobs.lora_scales or knobs.aig) or not run_dirs:
        return
    if "://" in (cfg.ray.storage_path or ""):
        print(f"sweep: inference-time points skipped: they read checkpoints from a filesystem, and ray.storage_path is "
              f"{cfg.ray.storage_path} (docs/cluster.md)", file=sys.stderr, flush=True)  # fmt: skip
        return
    print(f"sweep: inference-time points ({len(knobs.lora_scales)} LoRA scales, {len(knobs.aig)} AIG schedules) "
          f"on the checkpoints of {len(run_dirs)} trials", file=sys.stderr, flush=True)  # fmt: skip
    from rayjobs.tune.inference_points import run_knobs_remote

    run_knobs_remote(cfg, run_dirs)


class SweepProgress(Watcher):
    """One stderr line per evaluation of any trial (read from the trials' metrics.jsonl as they grow)."""

    interval = 1.0

    def __init__(self, trials_dir: Path, keys: list[str], reward: str, diversity: str):
        super().__init__()
        self.dir, self.keys, self.reward, self.diversity = Path(trials_dir), keys, reward, diversity
        self.offsets: dict[Path, int] = {}

    def begin(self) -> None:  # a resumed sweep prints only what is new
        self.offsets = {p: p.stat().st_size for p in self.dir.glob("*/metrics.jsonl")}

    def poll(self) -> None:
        import yaml

        for path in sorted(self.dir.glob("*/metrics.jsonl")):
            records, self.offsets[path] = new_records(path, self.offsets.get(path, 0))
            for rec in (r for r in records if self.reward in r):
                cfg = yaml.safe_load((path.parent / "config.yaml").read_text(encoding="utf-8"))
                params = " ".join(f"{k.split('.')[-1]}={get_dotted(cfg, k)}" for k in self.keys)
                print(f"[{path.parent.name}] {params} step {rec['step']}: reward {_num(rec[self.reward], '.4g')}, "
                      f"diversity {_num(rec.get(self.diversity), '.4g')}, kl {_num(rec.get('eval/kl'), '.3g')}",
                      file=sys.stderr, flush=True)  # fmt: skip


def _num(value, spec: str) -> str:
    """A metric for a progress line: metrics.jsonl keeps a non-finite value as the string 'nan'/'inf'
    (rayjobs/runlog.py), which a format spec would reject (a diverging trial killed this thread once)."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value if value is not None else "nan")
