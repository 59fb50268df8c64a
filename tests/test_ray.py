"""Ray Train and Tune on one local cluster (conftest.py's module-scoped ``cluster``): 2-worker DDP runs, the
supervised presets, sweeps. Killed workers, drivers and storage faults are in tests/test_ray_faults.py."""

from pathlib import Path

import pytest
from rayrun import FAST, assert_bitwise_equal, checkpoint_state, fit_fast, one_process, sweep_cfg, train_steps
from safetensors.torch import load_file

from rayjobs.config import load_config
from rayjobs.runlog import read_metrics

pytestmark = pytest.mark.ray


def test_two_workers_ddp_equal_one_process_and_resume_bitwise(cluster, tmp_path):
    """2 ranks, gloo DDP, K=2; both workers' processes SIGKILLed in step 2 (their reward kills them, as an OOM
    kill would): Ray Train restarts the group from the step-1 checkpoint and the run ends at step 3. Its final
    LoRA weights, AdamW state and export equal, bit for bit, one process without Ray that trains on both ranks'
    batches (their samples as two micro-batches of one step: DDP's mean gradient is the concatenated batch's)."""
    kills = tmp_path / "kills"
    steps = ["train.steps=3", "train.checkpoint_every=1", "reward.name=faults:KillAt"]
    run = fit_fast(tmp_path, "two", "ray.num_workers=2", "ray.max_failures=2", *steps, f"reward.kwargs={{at_calls: [2], directory: '{kills}'}}")
    assert [p.name for p in kills.iterdir()] == ["kill_0"]  # the group really died (then never again)
    assert [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m] == [1]
    assert set(train_steps(run)) == {1, 2, 3} and train_steps(run)[-1] == 3
    ckpt = run / "checkpoints" / "step_000003"
    assert {"rng_rank0.pt", "rng_rank1.pt", "trainable.safetensors", "optimizer.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}
    assert (run / "config.yaml").read_text().count("num_workers: 2") == 1

    # The same reward class with no kill left to do, in one process: each step's two micro-batches are rank 0's
    # and rank 1's batches of the DDP run.
    one = one_process(tmp_path / "ref", "one", *steps, f"reward.kwargs={{at_calls: [], directory: '{kills}'}}", ranks=2)
    assert_bitwise_equal(checkpoint_state(ckpt), checkpoint_state(one / "checkpoints" / "local_step_000003"), "step 3")
    export = "export/pytorch_lora_weights.safetensors"
    assert_bitwise_equal(load_file(run / export), load_file(one / export), "export")


def test_one_process_reference_is_not_one_rank_alone(tmp_path):
    """The reference above can tell: one process on rank 0's batches only (half the samples) ends elsewhere."""
    both = one_process(tmp_path, "both", "train.steps=2", "train.checkpoint_every=2", ranks=2)
    alone = one_process(tmp_path, "alone", "train.steps=2", "train.checkpoint_every=2")
    a, b = (load_file(r / "checkpoints" / "local_step_000002" / "trainable.safetensors") for r in (both, alone))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(a, b)


@pytest.mark.slow
def test_sdxl_draftplus_on_two_workers(cluster, tmp_path):
    """The tiny SDXL (two text encoders, pooled embeds, time ids) through Ray Train and DDP; its LoRA export."""
    run = fit_fast(tmp_path, "sdxl", "model.name_or_path=tiny-sdxl", "ray.num_workers=2", "train.steps=2", "train.checkpoint_every=2")
    assert train_steps(run) == [1, 2]
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "samples" / "base_vs_final.png").is_file()


@pytest.mark.slow
def test_inpainting_lora_through_ray(cluster, tmp_path):
    """A 2-step LoRA run on the tiny inpainting model (9 channels) with random masks, through Ray Train."""
    from toydata import write_toy_images

    write_toy_images(tmp_path / "data", 2)
    run = fit_fast(tmp_path, "inpaint", "model.name_or_path=tiny-inpaint", "trainable.unet_in_channels=9", "data.inpaint=true",
               "objective.preset=finetune", f"data.source={tmp_path / 'data'}", "data.resolution=32", "train.steps=2",
               "train.checkpoint_every=2")  # fmt: skip
    steps = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all("denoise" in m for m in steps)
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_dreambooth_on_two_workers_draws_class_images_once(cluster, tmp_path):
    """A supervised preset through Ray Train: 2 ranks split the missing class images, then train
    denoise + prior (the same loop as DRaFT+)."""
    from toydata import write_toy_images

    instance, classes = tmp_path / "instance", tmp_path / "classes"
    write_toy_images(instance, 2, captions=False)
    run = fit_fast(tmp_path, "db", "ray.num_workers=2", "train.steps=2", "objective.preset=dreambooth", f"data.source={instance}",
               "data.fixed_caption=a sks star", f"data.class_dir={classes}", "data.class_prompt=a star", "data.num_class_images=3")  # fmt: skip
    assert sorted(p.name for p in classes.iterdir()) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    steps = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all("prior" in m and "denoise" in m for m in steps)
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()


PIVOTAL_PHASES = "optim.phases=[{steps: 1, lr: {tokens: 5.0e-3}}, {steps: 1, lr: {unet: 1.0e-3}}]"


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, kind, extra, exported",
    [
        ("toy-finetune.yaml", "captions", [], "kohya_lora.safetensors"),
        ("toy-textual-inversion.yaml", "subject", [], "learned_embeds.safetensors"),
        ("toy-pivotal.yaml", "subject", [PIVOTAL_PHASES], "learned_embeds.safetensors"),
        ("toy-instructpix2pix.yaml", "edits", ["data.eval_images=[{data}/input/000.png]"], "model_index.json"),
    ],
)
def test_each_supervised_preset_trains_through_ray(cluster, tmp_path, preset, kind, extra, exported):
    """The shipped toy presets, 2 steps each through Ray Train: the loop's metrics and the method's export."""
    from rayjobs.cluster.driver import fit
    from rayjobs.tools.toy_data import write_dataset

    data = write_dataset(tmp_path / "data", kind, 4)
    overrides = [f"run.output_dir={tmp_path}", "run.name=p", f"data.source={data}", "train.steps=2", "train.eval_every=2",
                 "train.checkpoint_every=2", *(e.replace("{data}", str(data)) for e in extra)]  # fmt: skip
    run = fit(load_config(Path(__file__).parents[1] / "configs" / preset, FAST + overrides))
    steps = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all("denoise" in m and "reward" not in m for m in steps)
    assert (run / "export" / exported).is_file() and (run / "samples" / "step_000002.png").is_file()
    if kind == "edits":
        assert (run / "samples" / "edits_step_000002.png").is_file()


OUTPUTS = {"sweep.yaml", "trials", "tune", "trials.csv", "pareto.csv", "pareto.json", "pareto.png", "front", "summary.md"}


def test_kl_sweep_end_to_end(cluster, tmp_path):
    """Two kl_coeffs on the toy world, at once (1 CPU each): DRaFT (kl 0) gains more reward,
    drifts further from the reference and keeps less diversity; every output file is written; the
    inference-time knobs reproduce their endpoints on every checkpoint."""
    from rayjobs.tune.pareto import read_csv, rebuild
    from rayjobs.tune.sweep import run_sweep

    cfg = sweep_cfg(tmp_path, "kl2", "sweep.params={objective.kl_coeff: {grid: [0.0, 10.0]}}",
                     "sweep.inference={lora_scales: [0.0], aig: [draft]}")  # fmt: skip
    out = run_sweep(cfg)
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    rows = read_csv(out / "trials.csv")
    assert {r["status"] for r in rows} == {"done"} and len({r["trial"] for r in rows}) == 2
    # Every evaluation after step 0 has its checkpoint, and each checkpoint its knob points: LoRA scale 0 is
    # the base model and AIG 'draft' (w = 1 throughout) the trained model, so they reproduce the step-0 and
    # the same-step evaluations.
    for trial in {r["trial"] for r in rows}:
        mine = [r for r in rows if r["trial"] == trial]
        trained = {r["step"]: r for r in mine if r["kind"] == "trained"}
        assert sorted(trained) == [0, 5, 10] and all(Path(trained[s]["checkpoint"]).is_dir() for s in (5, 10))
        for r in (r for r in mine if r["kind"] != "trained"):
            same = trained[0] if r["kind"] == "lora_scale" else trained[r["step"]]
            assert r["reward"] == pytest.approx(same["reward"], abs=1e-5), (r["kind"], r["step"])
        assert sorted((r["step"], r["kind"]) for r in mine if r["kind"] != "trained") == [(5, "aig"), (5, "lora_scale"), (10, "aig"), (10, "lora_scale")]
    final = {r["config.objective.kl_coeff"]: r for r in rows if r["kind"] == "trained" and r["step"] == cfg.train.steps}
    draft, anchored = final[0.0], final[10.0]
    assert draft["reward"] > anchored["reward"] and draft["kl"] > anchored["kl"] and draft["diversity"] < anchored["diversity"]
    base = [r for r in rows if r["step"] == 0]
    assert len(base) == 2 and len({r["reward"] for r in base}) == 1  # step 0 is the same base model in every trial
    front = read_csv(out / "pareto.csv")
    assert front and all(r["on_front"] for r in front) and len(list((out / "front").glob("*.png"))) == len(front)
    summary = (out / "summary.md").read_text()
    assert summary.count("draftray train ") + summary.count("the base model") == len(front)
    assert rebuild(out) == out  # `draftray pareto` from trials.csv alone
    assert read_csv(out / "pareto.csv") == front


@pytest.mark.slow
def test_failed_trial_is_retried_then_recorded(cluster, tmp_path):
    """A trial that fails once is restarted from its last checkpoint (sweep.max_failures) and finishes; one
    that keeps failing is recorded as failed with its error in trials.csv while the sweep goes on."""
    from rayjobs.errors import TrainingStopped
    from rayjobs.tune.pareto import read_csv
    from rayjobs.tune.sweep import run_sweep

    marker = tmp_path / "crashed"
    crash_once = f"{{name: 'faults:CrashOnce', kwargs: {{at_call: 4, marker: '{marker}'}}}}"
    nan_always = "{name: 'faults:NaNFrom', kwargs: {at_call: 1}}"  # before any checkpoint: fails on every retry
    cfg = sweep_cfg(tmp_path, "faults", "train.steps=4", "train.eval_every=2", "ray.max_failures=0", "sweep.max_failures=1",
                     f"sweep.params={{reward: {{grid: [{crash_once}, {nan_always}]}}}}")  # fmt: skip
    with pytest.raises(TrainingStopped, match="1 of 2 trials failed"):
        run_sweep(cfg)
    out = tmp_path / "faults"
    rows = read_csv(out / "trials.csv")
    status = {r["config.reward"]["name"]: (r["status"], r["error"]) for r in rows}
    assert status["faults:CrashOnce"] == ("done", "") and marker.exists()
    assert status["faults:NaNFrom"][0] == "failed" and "non-finite loss" in status["faults:NaNFrom"][1]
    crashed = next(out / "trials" / r["trial"] for r in rows if r["config.reward"]["name"] == "faults:CrashOnce")
    assert {"resumed_from_step": 2, "step": 2} in [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(crashed)]
    assert (out / "pareto.png").exists() and "faults:NaNFrom" not in (out / "pareto.csv").read_text()


def _wait_for_all_cpus(seconds: float = 60.0) -> None:  # placement groups go asynchronously; slower under load
    import time

    import ray

    deadline = time.time() + seconds
    while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


def test_release_removes_a_runs_recorded_placement_groups(cluster, tmp_path):
    """What a sweep does when Tune ends a trial: the run's recorded worker groups give their CPUs back."""
    import ray
    from ray.util.placement_group import placement_group

    from rayjobs.runlog import PLACEMENT_GROUPS
    from rayjobs.tune.resources import release_placement_groups

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=30)
    assert ray.available_resources().get("CPU", 0) <= ray.cluster_resources()["CPU"] - 1
    (tmp_path / PLACEMENT_GROUPS).write_text(pg.id.hex() + "\n")
    assert release_placement_groups(tmp_path) == 1
    assert release_placement_groups(tmp_path) == 0  # already removed: nothing to do
    _wait_for_all_cpus()


class _Holder:
    def ready(self) -> bool:
        return True


@pytest.mark.slow  # the fast tier keeps its siblings (make test's 10-minute budget)
def test_an_orphaned_worker_group_is_reaped_only_while_trials_starve(cluster):
    """A placement group of this job holding a CPU with no actor in it (a Train controller's last worker group,
    made as Tune killed it) is removed once something waits for resources and it stayed empty orphan_s; one
    with a live actor is kept; at the sweep's end every empty one goes but those from before the sweep."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rayjobs.tune.resources import reap_orphans

    orphan, busy = placement_group([{"CPU": 1}]), placement_group([{"CPU": 1}])
    ray.get([orphan.ready(), busy.ready()], timeout=30)
    holder = ray.remote(num_cpus=1)(_Holder).options(scheduling_strategy=PlacementGroupSchedulingStrategy(busy)).remote()
    ray.get(holder.ready.remote(), timeout=60)
    seen: dict = {}
    assert reap_orphans(seen, orphan_s=5, now=0.0) == 0 and list(seen) == [orphan.id.hex()]  # nobody waits: kept
    waiting = placement_group([{"CPU": 1}])  # every CPU is reserved: this one starves
    assert reap_orphans(seen, orphan_s=5, now=1.0) == 0  # empty for 1 s only
    assert reap_orphans(seen, orphan_s=5, now=6.0) == 1
    ray.get(waiting.ready(), timeout=30)  # the starved group got the orphan's CPU
    assert ray.util.placement_group_table(busy)["state"] == "CREATED"
    # The sweep's end (on_experiment_end): empty groups go at once, starved or not, except those from before it.
    ray.kill(holder)
    assert reap_orphans({}, orphan_s=0.0, starved_only=False, exclude=frozenset({busy.id.hex()})) == 1
    assert ray.util.placement_group_table(waiting)["state"] == "REMOVED"
    assert ray.util.placement_group_table(busy)["state"] == "CREATED"
    remove_placement_group(busy)
    _wait_for_all_cpus()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_optuna_with_asha_finishes_and_releases_resources(cluster, tmp_path):
    """Optuna's multi-objective search with ASHA early stopping, two trials at once on 2 CPUs: stopped
    trials give their CPUs back (rayjobs/tune/resources.py), so the sweep finishes."""
    from rayjobs.tune.pareto import read_csv
    from rayjobs.tune.sweep import run_sweep

    cfg = sweep_cfg(tmp_path, "asha", "train.steps=6", "train.eval_every=2", "sweep.search=optuna", "sweep.num_samples=4",
                     "sweep.params={objective.kl_coeff: {loguniform: [0.01, 10.0]}}", "sweep.inference={}",
                     "sweep.scheduler={grace_period: 2, reduction_factor: 4}")  # fmt: skip
    out = run_sweep(cfg)
    rows = read_csv(out / "trials.csv")
    status = {r["trial"]: r["status"] for r in rows}
    assert len(status) == 4 and set(status.values()) <= {"done", "stopped"} and "stopped" in status.values()
    assert len({r["config.objective.kl_coeff"] for r in rows}) == 4  # four draws
    stopped = [r for r in rows if status[r["trial"]] == "stopped"]
    assert max(r["step"] for r in stopped) < cfg.train.steps
    _wait_for_all_cpus()  # nothing left reserved (placement groups are removed asynchronously)
