"""`draftray sweep`: Ray Tune over config keys; the reward-diversity Pareto front is the product.

Train V2 way (REFERENCES.md): ``Tuner(TorchTrainer)`` fails, so each trial is a Tune
*function* trainable that builds and fits a TorchTrainer, with Tune's
``TuneReportCallback`` forwarding rank 0's reports. The trial function itself
reserves almost nothing ({"cpu": 0.01}); its Train workers take the real
resources, so concurrency is capped from the cluster size (SweepConfig.max_concurrent).

Sweep directory (<run.output_dir>/<sweep.name>):
    sweep.yaml            the resolved base config with its sweep section
    trials/<trial>/       one full run directory per trial (config, metrics, grids, checkpoints, export)
    tune/                 Tune's own experiment state
    points.csv            every evaluation of every trial: params, step, reward, diversity, on_front
    pareto.png            reward vs diversity, coloured by the first swept key, front marked
    summary.md            the front as a table
"""

from __future__ import annotations

import copy
import sys
from datetime import datetime
from pathlib import Path

import ray
from ray import tune

from rayjobs.config import Config, ParamSpec, set_dotted, to_yaml, validate
from rayjobs.errors import TrainingStopped, UserError
from rayjobs.pareto import collect_points, get_dotted, plot_front, write_points, write_summary
from rayjobs.runlog import Watcher, new_records
from rayjobs.knobs import run_knobs_remote
from rayjobs.train import connect, preflight, prepare_run_dir, run_trainer

TRIALS = "trials"


def tune_space(params: dict[str, ParamSpec]) -> dict:
    """SweepConfig.params -> Tune param_space, keyed by the dotted config key."""
    space = {}
    for key, spec in params.items():
        if spec.grid is not None:
            space[key] = tune.grid_search(list(spec.grid))
        elif spec.choice is not None:
            space[key] = tune.choice(list(spec.choice))
        elif spec.uniform is not None:
            space[key] = tune.uniform(*spec.uniform)
        else:
            space[key] = tune.loguniform(*spec.loguniform)
    return space


def trial_config(base: dict, params: dict, name: str, output_dir: str) -> Config:
    """The base config (a model_dump) with the swept keys set; the trial runs in <output_dir>/<name>."""
    data = copy.deepcopy(base)
    data.pop("sweep", None)
    for key, value in params.items():
        set_dotted(data, key, value, f"sweep.params.{key}")
    data["run"] = dict(data.get("run", {}), name=name, output_dir=output_dir)
    return validate(data, where=f"sweep trial {params}: config")


def _check_values(cfg: Config, base: dict) -> None:
    """Every value a grid or choice can take must give a valid config: fail before any trial starts."""
    for key, spec in cfg.sweep.params.items():
        for value in (spec.grid or spec.choice or list(spec.uniform or spec.loguniform)):
            try:
                trial_config(base, {key: value}, "check", "check")
            except UserError as err:
                raise UserError(f"sweep.params.{key}: value {value!r} gives an invalid config ({err})") from None


def _trial(params: dict, *, base: dict, trials_dir: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    name = tune.get_context().get_trial_name()
    cfg = trial_config(base, params, name, trials_dir)
    run_dir = Path(trials_dir) / name
    prepare_run_dir(cfg, run_dir)
    run_trainer(cfg, run_dir, callbacks=[TuneReportCallback()], progress=False)


def _concurrency(cfg: Config) -> int:
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    r = cfg.ray
    if r.use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 0)) // r.num_workers)
    return max(1, int(ray.cluster_resources().get("CPU", 1) // (r.num_workers * r.cpus_per_worker)))


def sweep_dir_for(cfg: Config) -> Path:
    name = cfg.sweep.name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir).resolve() / name


def run_sweep(cfg: Config, verbose: bool = False) -> Path:
    """Runs every trial, then writes points.csv, pareto.png and summary.md; returns the sweep directory."""
    if cfg.sweep is None:
        raise UserError("sweep: the config has no sweep section (see configs/toy-kl-sweep.yaml)")
    cfg = preflight(cfg)
    base = cfg.model_dump(mode="json")
    _check_values(cfg, base)
    out = sweep_dir_for(cfg)
    started = connect(cfg, verbose)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        trainable = tune.with_parameters(_trial, base=base, trials_dir=str(out / TRIALS))
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.01}),  # the trial driver; {"cpu": 0} is refused
            param_space=tune_space(cfg.sweep.params),
            tune_config=tune.TuneConfig(
                num_samples=cfg.sweep.num_samples,
                # The generator caps concurrency itself (Tune ignores max_concurrent_trials with it).
                search_alg=tune.search.BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=_concurrency(cfg)),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1 if verbose else 0),
        )
        with SweepProgress(out / TRIALS, list(cfg.sweep.params), cfg.sweep.reward_metric, _diversity_key(cfg)):
            results = tuner.fit()
        _inference_points(cfg, out / TRIALS, [r for r in results if r.error is None])
    finally:
        if started:
            ray.shutdown()
    failed = [r for r in results if r.error is not None]
    summarize(out, cfg)
    if failed:
        raise TrainingStopped(f"{len(failed)} of {len(results)} trials failed (see {out / TRIALS}); the front uses the rest")
    return out


def _inference_points(cfg: Config, trials_dir: Path, finished: list) -> None:
    """LoRA-scale and AIG points on each finished trial's final weights (sweep.inference; rayjobs/knobs.py)."""
    knobs = cfg.sweep.inference
    if not (knobs.lora_scales or knobs.aig) or not finished:
        return
    run_dirs = [d for d in sorted(trials_dir.glob("*")) if (d / "config.yaml").exists()]
    print(f"sweep: inference-time points ({len(knobs.lora_scales)} LoRA scales, {len(knobs.aig)} AIG schedules) "
          f"on {len(run_dirs)} trials", file=sys.stderr, flush=True)  # fmt: skip
    run_knobs_remote(cfg, run_dirs)


def summarize(out: Path, cfg: Config) -> list[dict]:
    """Reads every trial's evaluations and writes points.csv, pareto.png and summary.md."""
    keys = list(cfg.sweep.params)
    diversity = _diversity_key(cfg)
    points = collect_points(out / TRIALS, keys, cfg.sweep.reward_metric, diversity)
    if not points:
        print(f"sweep: no evaluations found under {out / TRIALS}", file=sys.stderr)
        return points
    write_points(points, keys, out / "points.csv")
    plot_front(points, keys, out / "pareto.png", cfg.sweep.reward_metric, diversity)
    print(write_summary(points, keys, out / "summary.md"))
    return points


def _diversity_key(cfg: Config) -> str:
    return cfg.sweep.diversity_metric or f"eval/diversity_{cfg.diversity.name}"


class SweepProgress(Watcher):
    """One stderr line per evaluation of any trial (read from the trials' metrics.jsonl as they grow)."""

    interval = 1.0

    def __init__(self, trials_dir: Path, keys: list[str], reward: str, diversity: str):
        super().__init__()
        self.dir, self.keys, self.reward, self.diversity = Path(trials_dir), keys, reward, diversity
        self.offsets: dict[Path, int] = {}

    def poll(self) -> None:
        import yaml

        for path in sorted(self.dir.glob("*/metrics.jsonl")):
            records, self.offsets[path] = new_records(path, self.offsets.get(path, 0))
            for rec in (r for r in records if self.reward in r):
                cfg = yaml.safe_load((path.parent / "config.yaml").read_text(encoding="utf-8"))
                params = " ".join(f"{k.split('.')[-1]}={get_dotted(cfg, k)}" for k in self.keys)
                print(f"[{path.parent.name}] {params} step {rec['step']}: reward {rec[self.reward]:.4g}, "
                      f"diversity {rec.get(self.diversity, float('nan')):.4g}, kl {rec.get('eval/kl', float('nan')):.3g}",
                      file=sys.stderr, flush=True)
