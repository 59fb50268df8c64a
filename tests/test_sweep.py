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
