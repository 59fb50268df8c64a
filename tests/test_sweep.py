"""Sweep configuration without Ray: the sweep section validates, trials get the swept values, bad values fail early."""

from pathlib import Path

import pytest
from ray import tune

from rayjobs.cluster.driver import check_resources
from rayjobs.config import load_config
from rayjobs.config.sweep import ParamSpec
from rayjobs.errors import UserError
from rayjobs.tune.sweep import check_sweep, trial_config, tune_space

CONFIGS = Path(__file__).parents[1] / "configs"


def test_toy_kl_sweep_preset_spans_two_decades_and_includes_draft():
    cfg = load_config(CONFIGS / "toy-kl-sweep.yaml")
    kls = cfg.sweep.params["objective.kl_coeff"].grid
    assert 0.0 in kls  # plain DRaFT is in the front
    positive = [k for k in kls if k > 0]
    assert max(positive) / min(positive) >= 100


def test_tune_space_maps_each_kind():
    space = tune_space({
        "objective.kl_coeff": ParamSpec(grid=[0.0, 0.1]),
        "optim.lr": ParamSpec(loguniform=(1e-4, 1e-2)),
        "train.steps": ParamSpec(choice=[10, 20]),
        "objective.reward_weight": ParamSpec(uniform=(0.5, 1.5)),
    })
    assert space["objective.kl_coeff"] == tune.grid_search([0.0, 0.1])
    assert isinstance(space["optim.lr"], tune.search.sample.Float)
    assert isinstance(space["train.steps"], tune.search.sample.Categorical)


@pytest.mark.parametrize(
    "spec, message",
    [({}, "exactly one"), ({"grid": [1], "choice": [2]}, "exactly one"), ({"uniform": (2.0, 1.0)}, "low < high"),
     ({"loguniform": (0.0, 1.0)}, "low > 0")],
)
def test_param_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        ParamSpec(**spec)


def test_trial_config_sets_values_name_and_drops_sweep(tmp_path):
    cfg = load_config(CONFIGS / "toy-kl-sweep.yaml")
    base = cfg.model_dump(mode="json")
    trial = trial_config(base, {"objective.kl_coeff": 0.03, "optim.lr": 1e-5}, "t7", str(tmp_path))
    assert trial.objective.weights.kl_coeff == 0.03 and trial.optim.lr == 1e-5  # 1e-5 stays a float (no YAML round trip)
    assert trial.run.name == "t7" and trial.run.output_dir == str(tmp_path)
    assert trial.sweep is None
    assert trial.train.checkpoint_every == trial.train.eval_every == 10  # sweep.checkpoint_evals: a checkpoint per point
    kept = trial_config(base | {"sweep": dict(base["sweep"], checkpoint_evals=False)}, {}, "t8", str(tmp_path))
    assert kept.train.checkpoint_every == cfg.train.checkpoint_every == 50


@pytest.mark.parametrize(
    "override, message",
    [
        ("sweep.reward_metric=eval/reward_pickscore", r"sweep.reward_metric: 'eval/reward_pickscore' is never reported.*eval/kl"),
        ("sweep.diversity_metric=eval/diversity_lpips", r"sweep.diversity_metric: 'eval/diversity_lpips' is never reported"),
        ("sweep.scheduler={metric: loss, grace_period: 10}", r"sweep.scheduler.metric: 'loss' is never reported"),
    ],
)
def test_a_metric_never_reported_fails_before_any_trial(override, message):
    cfg = load_config(CONFIGS / "toy-kl-sweep.yaml", [override])
    with pytest.raises(UserError, match=message):
        check_sweep(cfg, cfg.model_dump(mode="json"))


def test_reward_components_are_metrics_a_sweep_can_use():
    terms = "reward.terms=[{name: colorfulness}, {name: brightness, weight: 0.5}]"
    cfg = load_config(CONFIGS / "toy-kl-sweep.yaml", ["reward.name=null", terms, "sweep.reward_metric=eval/reward_brightness"])
    assert len(check_sweep(cfg, cfg.model_dump(mode="json"))) == 1 + 7  # the base and one trial per grid value


def test_empty_space_and_optuna_grid_are_errors():
    with pytest.raises(UserError, match=r"sweep.params: .*at least 1"):
        load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.params={}"])
    with pytest.raises(UserError, match=r"search optuna draws every key; use choice instead of grid for objective.kl_coeff"):
        load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.search=optuna"])


def test_more_gpus_or_cpus_per_trial_than_the_cluster_has(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(UserError, match=r"ray.num_workers: a trial needs 2 GPUs .* the cluster has 0"):
        check_resources([load_config(None, ["ray.use_gpu=true", "ray.num_workers=2"])])
    with pytest.raises(UserError, match=r"ray.cpus_per_worker: a trial needs 3 CPUs"):
        check_resources([load_config(None, ["ray.num_workers=3"])])
    check_resources([load_config(None, ["ray.num_workers=2"])])


def test_bad_swept_key_or_value_fails_before_any_trial():
    base_cfg = load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.params={objective.kl_cof: {grid: [0.1]}}"])
    with pytest.raises(UserError, match=r"sweep.params.objective.kl_cof: .*unknown key"):
        check_sweep(base_cfg, base_cfg.model_dump(mode="json"))
    bad = load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.params={objective.kl_coeff: {grid: [0.1, -1]}}"])
    with pytest.raises(UserError, match=r"value -1 gives an invalid config"):
        check_sweep(bad, bad.model_dump(mode="json"))


def test_sweep_without_section_is_a_clear_error():
    from rayjobs.tune.sweep import run_sweep

    with pytest.raises(UserError, match="no sweep section"):
        run_sweep(load_config(None))


def test_progress_line_of_a_diverged_trial(tmp_path, capsys):
    """metrics.jsonl keeps a non-finite metric as the string 'nan'/'inf'; the sweep's progress printer shows it
    (the 50-trial load bench found the printer thread dying on one)."""
    from rayjobs.tune.sweep import SweepProgress

    trial = tmp_path / "trials" / "t0"
    trial.mkdir(parents=True)
    (trial / "config.yaml").write_text("optim:\n  lr: 2000.0\n")
    (trial / "metrics.jsonl").write_text('{"step": 1, "eval/reward_mean": "inf", "eval/kl": 6.5e7}\n')
    SweepProgress(tmp_path / "trials", ["optim.lr"], "eval/reward_mean", "eval/diversity_lpips").poll()
    assert capsys.readouterr().err == "[t0] lr=2000.0 step 1: reward inf, diversity nan, kl 6.5e+07\n"


# An interrupted sweep accounts for every trial of its space (docs/sweeps.md, "Trial states"); the real Ctrl-C of a
# real `draftray sweep` is tests/test_sweep_interrupt.py (slow tier).


def test_planned_trials_are_the_trials_tune_draws():
    """planned_trials replays Tune's BasicVariantGenerator: the same values in the same order, grid points and
    samples of the random keys, so a trial that never started is listed with the values it will get."""
    from rayjobs.tune.space import planned_trials

    cfg = load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.num_samples=2", "sweep.seed=7",
                      "sweep.params={objective.kl_coeff: {grid: [0.0, 1.0, 10.0]}, optim.lr: {loguniform: [1.0e-4, 1.0e-2]}, train.steps: {choice: [4, 6]}}"])  # fmt: skip
    tune.register_trainable("draftray_planned_check", lambda config: None)
    generator = tune.search.BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=1)
    generator.add_configurations({"check": {"run": "draftray_planned_check", "config": tune_space(cfg.sweep.params), "num_samples": 2}})
    drawn = []
    while not generator.is_finished():
        trial = generator.next_trial()
        if trial is not None:
            drawn.append((str(trial)[-5:], trial.config))
            generator.on_trial_complete(trial.trial_id)  # max_concurrent 1: the next trial after this one ends
    assert [f"{i:05d}" for i in range(6)] == [index for index, _ in drawn]  # trial i's name ends with its index
    assert planned_trials(cfg.sweep) == [config for _, config in drawn]
    assert planned_trials(load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.num_samples=3", "sweep.search=optuna",
                                      "sweep.params={objective.kl_coeff: {choice: [0.0, 1.0]}}"]).sweep) == [None] * 3  # fmt: skip


def _run_dir(trials: Path, name: str, kl: float, evaluated: list[int], status: str = "running"):
    """A trial's run directory as a sweep of configs/toy-kl-sweep.yaml leaves it: config.yaml (6 steps),
    metrics.jsonl evaluated at these steps."""
    import json

    from rayjobs.config import to_yaml
    from rayjobs.runlog import write_status

    d = trials / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(to_yaml(load_config(None, ["train.steps=6", f"objective.kl_coeff={kl}"])))
    lines = [{"step": s, "eval/reward_mean": 1.0 + s, "eval/diversity_toy_lpips": 0.5, "eval/kl": 0.1 * s} for s in evaluated]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    write_status(d, status)
    return d


def _result(name: str, done: bool = False, error: Exception | None = None):
    """What _final_status reads of a ResultGrid entry: the trial's path (its name first), error, last metrics."""
    from types import SimpleNamespace

    return SimpleNamespace(path=f"/x/tune/{name}_0_kl=0_2026-01-01", error=error, metrics={"step": 2, "done": done})


def test_each_trial_state_from_tunes_verdict(tmp_path):
    """done (its last step evaluated) beats Tune's flags; stopped = ended early with Tune's done mark (the
    scheduler); interrupted = ended early without it (the sweep stopped it), or no verdict at all; failed = Tune's error."""
    from rayjobs.runlog import read_status
    from rayjobs.tune.sweep import _final_status

    trials = tmp_path / "trials"
    names = {"done": [0, 2, 4, 6], "stopped": [0, 2], "interrupted": [0, 2], "failed": [0], "no_verdict": [0]}
    for i, (name, steps) in enumerate(names.items()):
        _run_dir(trials, f"_trial_abcde_0000{i}", 0.1, steps, status="failed" if name == "failed" else "done")
    results = [_result("_trial_abcde_00000"), _result("_trial_abcde_00001", done=True), _result("_trial_abcde_00002"),
               _result("_trial_abcde_00003", error=RuntimeError("worker died\nTraceback ..."))]  # fmt: skip
    _final_status(trials, results)
    got = [tuple(read_status(d).values()) for d in sorted(trials.iterdir())]
    assert got == [("done", ""), ("stopped", ""), ("interrupted", ""), ("failed", "worker died"), ("interrupted", "")]
    _final_status(trials, None)  # Tune itself interrupted (a second Ctrl-C): only done is known
    assert [read_status(d)["status"] for d in sorted(trials.iterdir())] == ["done", "interrupted", "interrupted", "interrupted", "interrupted"]


def test_the_trials_never_started_are_the_rest_of_the_space(tmp_path):
    """Trials 0 and 2 of a 4-point grid have run directories: trials.csv gets rows for 1 and 3, with the values
    and kl_coeff they will train with; with search optuna the values are drawn at the start, so they are empty."""
    from rayjobs.tune.sweep import _unstarted

    cfg = load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.params={objective.kl_coeff: {grid: [0.0, 1.0, 10.0, 100.0]}}"])
    _run_dir(tmp_path, "_trial_abcde_00000", 0.0, [0, 2, 4, 6])
    _run_dir(tmp_path, "_trial_abcde_00002", 10.0, [0])
    rows = _unstarted(cfg, tmp_path)
    assert [(r["trial"], r["status"], r["config.objective.kl_coeff"], r["kl_coeff"], r["step"] if "step" in r else None) for r in rows] == [
        ("#1", "not_started", 1.0, 1.0, None), ("#3", "not_started", 100.0, 100.0, None)]  # fmt: skip
    optuna = load_config(CONFIGS / "toy-kl-sweep.yaml", ["sweep.search=optuna", "sweep.num_samples=3", "sweep.params={objective.kl_coeff: {choice: [0.0, 1.0]}}"])
    assert [(r["trial"], r["kl_coeff"], "config.objective.kl_coeff" in r) for r in _unstarted(optuna, tmp_path)] == [("#2", "", False)]


def test_an_interrupted_sweep_exits_with_the_signal_and_one_resume_line(tmp_path, monkeypatch, capsys):
    """`draftray sweep` interrupted: exit 130 (SIGINT) or 143 (SIGTERM), one stderr line with the exact
    command that continues the sweep, and not the sweep directory on stdout (its last line after a finished sweep)."""
    import signal

    import rayjobs.tune.sweep as sweep
    from rayjobs.cli import main
    from rayjobs.errors import Interrupted
    from rayjobs.tune.pareto import resume_command

    out = tmp_path / "my sweep"
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        def interrupted(sweep_dir, verbose=False, signum=signum):
            raise Interrupted(f"sweep interrupted: 1 done of 3 trials; continue with: {resume_command(out)}", signum)

        monkeypatch.setattr(sweep, "resume_sweep", interrupted)
        assert main(["sweep", "--resume", str(out)]) == code
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.splitlines() == [f"draftray: sweep interrupted: 1 done of 3 trials; continue with: draftray sweep --resume '{out}'"]


def test_sigterm_stops_a_sweep_as_ctrl_c_does(tmp_path, monkeypatch, caplog):
    """While Tune runs, SIGTERM calls Tune's SIGINT handler (its clean stop); before, it raises KeyboardInterrupt,
    which ends as Interrupted (exit 143, the resume command) once Tune has saved a state, and stays a
    KeyboardInterrupt before (nothing to resume). The handler is set after Ray connects (ray.init sets its own,
    which aborts) and the one before is back after. Tune's Tuner.restore hint, Python, is not shown."""
    import logging
    import signal

    import rayjobs.tune.sweep as sweep
    from rayjobs.errors import Interrupted

    cfg = load_config(None)
    connected = []
    monkeypatch.setattr(sweep, "connect", lambda cfg, verbose: connected.append(signal.getsignal(signal.SIGTERM)) or False)
    tune_calls = []
    with sweep.sweep_driver(cfg, tmp_path, False) as signals:
        logging.getLogger("ray.tune.tune").warning('Experiment has been interrupted.\nResume experiment with: Tuner.restore(path="x", trainable=...)')
        logging.getLogger("ray.tune.tune").warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
        before = signal.signal(signal.SIGINT, lambda signum, frame: tune_calls.append(signum))  # as Tune's fit does
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGINT, before)
    assert tune_calls == [signal.SIGINT] and signals == [signal.SIGTERM]
    assert connected == [signal.SIG_DFL] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # set after connect, then restored
    assert [r.getMessage()[:20] for r in caplog.records] == ["Stop signal received"]
    with pytest.raises(KeyboardInterrupt), sweep.sweep_driver(cfg, tmp_path, False):
        signal.raise_signal(signal.SIGTERM)
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    with pytest.raises(Interrupted) as err, sweep.sweep_driver(cfg, tmp_path, False):
        signal.raise_signal(signal.SIGTERM)
    assert err.value.exit_code == 143 and str(err.value) == f"sweep interrupted (SIGTERM); continue with: draftray sweep --resume {tmp_path}"
