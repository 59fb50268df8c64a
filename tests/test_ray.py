"""Ray Train: a 2-worker CPU run, resume after a killed worker, resume of a named run.

One local cluster for the module (each start costs seconds on 2 cores).
"""

import json
import os
from pathlib import Path

import pytest

from rayjobs.config import load_config
from rayjobs.runlog import read_metrics

pytestmark = pytest.mark.ray

TESTS_DIR = str(Path(__file__).parent)
FAST = [
    "sampler.steps=3",
    "sampler.truncation_steps=2",
    "data.eval_prompts=[a red circle]",
    "data.eval_seeds=[0,1]",
    "train.batch_size=1",
    "train.eval_every=0",
]


@pytest.fixture(scope="module")
def cluster():
    import ray

    # Workers of a local cluster inherit this environment: they can import tests/faults.py.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=True, configure_logging=False)
    yield
    ray.shutdown()


def _fit(tmp_path, name, *extra):
    from rayjobs.train import fit

    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", f"run.name={name}", *extra])
    return fit(cfg)


def _train_steps(run_dir):
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def test_two_workers_ddp(cluster, tmp_path):
    """2 ranks, gloo DDP, K=2 (two grad forwards before one backward): every rank checkpoints."""
    run = _fit(tmp_path, "two", "ray.num_workers=2", "train.steps=2", "train.checkpoint_every=2")
    assert _train_steps(run) == [1, 2]
    ckpt = run / "checkpoints" / "step_000002"
    assert {"rng_rank0.pt", "rng_rank1.pt", "trainable.safetensors", "optimizer.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "config.yaml").read_text().count("num_workers: 2") == 1


def test_resume_after_killed_worker_and_after_restart(cluster, tmp_path):
    marker = tmp_path / "crashed"
    reward = ["reward.name=faults:CrashOnce", f"reward.kwargs={{at_call: 4, marker: '{marker}'}}"]
    run = _fit(tmp_path, "crash", "train.steps=5", "train.checkpoint_every=2", "ray.max_failures=1", *reward)
    assert marker.exists()  # the worker really died during step 4
    metrics = read_metrics(run)
    resumed = [m["resumed_from_step"] for m in metrics if "resumed_from_step" in m]
    assert resumed == [2]  # restarted from the step-2 checkpoint, not from scratch
    assert _train_steps(run) == [1, 2, 3, 2 + 1, 4, 5]  # step 3 logged twice: before and after the crash
    assert json.loads((run / "checkpoints" / "step_000005" / "state.json").read_text()) == {"step": 5}

    # Starting a run with the same name again resumes it: more steps continue from step 5.
    again = _fit(tmp_path, "crash", "train.steps=6", "train.checkpoint_every=2", *reward)
    assert again == run
    assert [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m] == [2, 5]
    assert _train_steps(run)[-1] == 6


def test_non_finite_loss_stops_the_run_with_a_message(cluster, tmp_path):
    from rayjobs.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match="non-finite loss or gradient at step 2 .loss=nan"):
        _fit(tmp_path, "nan", "train.steps=4", "train.checkpoint_every=1", "reward.name=faults:NaNFrom", "reward.kwargs={at_call: 2}")
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("step_*")) == ["step_000001"]


def test_worker_failure_beyond_max_failures_is_one_clear_error(cluster, tmp_path):
    from rayjobs.errors import TrainingStopped

    marker = tmp_path / "crashed"
    reward = ["reward.name=faults:CrashOnce", f"reward.kwargs={{at_call: 2, marker: '{marker}'}}"]
    with pytest.raises(TrainingStopped, match="training failed .*start the same run.name to resume"):
        _fit(tmp_path, "dies", "train.steps=3", "train.checkpoint_every=1", "ray.max_failures=0", *reward)
    assert (tmp_path / "dies" / "checkpoints" / "step_000001" / "trainable.safetensors").is_file()


# The toy default, shortened: 10 steps at a higher lr so DRaFT visibly hacks the reward within them.
SWEEP_FAST = ["train.steps=10", "train.eval_every=10", "train.checkpoint_every=10", "optim.lr=3e-3", "data.eval_seeds=[0,1,2,3]"]


def test_two_point_kl_sweep_shows_the_trade_off(cluster, tmp_path):
    """kl_coeff 0 (DRaFT) vs a large kl_coeff on the toy world: DRaFT gains more reward, drifts further
    from the reference (KL) and keeps less diversity. Both trials run at once (1 CPU each)."""
    import csv

    from rayjobs.sweep import run_sweep

    cfg = load_config(Path(__file__).parents[1] / "configs" / "toy-kl-sweep.yaml", [
        f"run.output_dir={tmp_path}", "sweep.name=kl2", "sweep.params={objective.kl_coeff: {grid: [0.0, 10.0]}}",
        "sweep.inference={lora_scales: [0.0], aig: [draft]}", *SWEEP_FAST,
    ])
    out = run_sweep(cfg)
    assert {"sweep.yaml", "points.csv", "pareto.png", "summary.md", "trials"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader(open(out / "points.csv")))
    # Inference-time points on each trial's final weights: LoRA scale 0 is the base model and AIG 'draft'
    # (w = 1 throughout) the trained model, so they reproduce the step-0 and final evaluations.
    for kl in (0.0, 10.0):
        mine = [r for r in rows if float(r["objective.kl_coeff"]) == kl]
        by_kind = {(r["kind"], r["knob"]): r for r in mine if r["kind"] != "trained" or int(r["step"]) in (0, cfg.train.steps)}
        trained_last = [r for r in mine if r["kind"] == "trained" and int(r["step"]) == cfg.train.steps][0]
        base = [r for r in mine if r["kind"] == "trained" and int(r["step"]) == 0][0]
        assert float(by_kind[("lora_scale", "0")]["reward"]) == pytest.approx(float(base["reward"]), abs=1e-5)
        assert float(by_kind[("aig", "draft")]["reward"]) == pytest.approx(float(trained_last["reward"]), abs=1e-5)
    rows = [r for r in rows if r["kind"] == "trained"]
    final = {float(r["objective.kl_coeff"]): r for r in rows if int(r["step"]) == cfg.train.steps}
    assert set(final) == {0.0, 10.0}
    draft, anchored = final[0.0], final[10.0]
    assert float(draft["reward"]) > float(anchored["reward"])
    assert float(draft["kl"]) > float(anchored["kl"])
    assert float(draft["diversity"]) < float(anchored["diversity"])
    base = [r for r in rows if int(r["step"]) == 0]
    assert len(base) == 2 and base[0]["reward"] == base[1]["reward"]  # step 0 is the same base model in every trial
