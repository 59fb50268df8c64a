"""Faults injected for real into Ray runs on the module's local cluster (docs/reliability.md).

Workers are SIGKILLed at random steps (tests/faults.py), drivers are SIGKILLed and their command run again,
and a run's storage fills up or turns read-only. The promise checked: the run ends where an uninterrupted
one ends, bit for bit on CPU, and a failure is one clear message with the checkpoints kept.
"""

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rayrun import (
    FAST,
    REPO,
    SWEEP_FAST,
    SWEEP_YAML,
    assert_bitwise_equal,
    checkpoint_state,
    fit_fast,
    kill_with_children,
    one_process,
    registered_checkpoint,  # fmt: skip
    train_steps,
)
from safetensors.torch import load_file

from rayjobs.runlog import read_metrics

# The fast tier's worker kill is tests/test_ray.py's DDP run; these are the slow tier's (make test-all).
pytestmark = [pytest.mark.ray, pytest.mark.slow]


STEPS = 6
KILLED = [f"train.steps={STEPS}", "train.checkpoint_every=1", "ray.max_failures=3"]


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """The uninterrupted run the killed ones are compared with (the same reward, with no kill)."""
    tmp = tmp_path_factory.mktemp("straight")
    return fit_fast(tmp, "straight", *KILLED, "reward.name=faults:KillAt", f"reward.kwargs={{at_calls: [], directory: '{tmp / 'kills'}'}}")


def _killed_twice(tmp_path, seed: int) -> tuple[Path, list[int]]:
    rng = random.Random(seed)
    first = rng.randint(2, STEPS)  # the first process dies at this step (after the step-(first-1) checkpoint)
    second = rng.randint(1, STEPS - first + 1)  # the restarted one at its call `second`, counted from its resume
    kills = tmp_path / "kills"
    reward = ["reward.name=faults:KillAt", f"reward.kwargs={{at_calls: [{first}, {second}], directory: '{kills}'}}"]
    return fit_fast(tmp_path, f"killed{seed}", *KILLED, *reward), [first, second]


def _check_killed_run(run: Path, straight: Path, kills: list[int]) -> None:
    assert len(list((run.parent / "kills").glob("kill_*"))) == 2, kills  # both workers really died
    resumed = [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m]
    assert len(resumed) == 2 and resumed[0] <= kills[0] - 1, (kills, resumed)  # from a checkpoint, not from zero
    assert set(train_steps(run)) == set(range(1, STEPS + 1)) and train_steps(run)[-1] == STEPS, kills
    assert json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "state.json").read_text()) == {"step": STEPS}
    final = f"step_{STEPS:06d}"
    assert_bitwise_equal(checkpoint_state(run / "checkpoints" / final), checkpoint_state(straight / "checkpoints" / final), f"kills at {kills}")
    a, b = (load_file(r / "export" / "pytorch_lora_weights.safetensors") for r in (run, straight))
    assert_bitwise_equal(a, b, "export")


def test_sigkill_at_random_steps_ends_bitwise_equal(straight, tmp_path):
    """Two SIGKILLs of the Ray Train worker at steps drawn at random: the run completes with the exact step count,
    and its final LoRA weights, AdamW state and export are bitwise equal to the uninterrupted run's."""
    run, kills = _killed_twice(tmp_path, seed=0)
    _check_killed_run(run, straight, kills)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_more_random_steps(straight, tmp_path, seed):
    run, kills = _killed_twice(tmp_path, seed)
    _check_killed_run(run, straight, kills)


def _wait_for_a_registered_checkpoint(driver: subprocess.Popen, run: Path, timeout: float = 240) -> None:
    """Until Ray's record holds a checkpoint of ``run`` and 2 steps are logged; the driver must still run then."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (registered_checkpoint(run) and len(train_steps(run)) >= 2):
        time.sleep(0.3)
    assert driver.poll() is None, "the driver ended before the test could stop it"


def test_killed_train_driver_then_the_same_command_continues(cluster, tmp_path):
    """`draftray train` SIGKILLed midway (with its own local Ray); the same command again (here on the module's
    cluster) continues the run from its last registered checkpoint: one run directory, every step once more
    at most, and the run ends at train.steps with the weights and AdamW state, bit for bit, of one uninterrupted
    process."""
    from rayjobs.cli import main

    settings = ["train.steps=10", "train.checkpoint_every=1", "reward.name=faults:Slow", "reward.kwargs={seconds: 0.5}"]
    args = ["train", *FAST, f"run.output_dir={tmp_path}", "run.name=drv", *settings]
    driver = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    run = tmp_path / "drv"
    try:
        _wait_for_a_registered_checkpoint(driver, run)
    finally:
        kill_with_children(driver)
    before = train_steps(run)
    assert 2 <= len(before) < 10, before
    assert main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["drv"]  # continued, not forked into a second run
    resumed = [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m]
    assert len(resumed) == 1 and 1 <= resumed[0] <= before[-1]
    steps = train_steps(run)
    assert steps[: len(before)] == before and steps[len(before) :] == list(range(resumed[0] + 1, 11))
    straight = one_process(tmp_path / "ref", "drv", *settings[:2], "reward.name=colorfulness")  # faults:Slow's scores
    assert_bitwise_equal(checkpoint_state(run / "checkpoints" / "step_000010"), checkpoint_state(straight / "checkpoints" / "local_step_000010"))


def test_sigterm_to_the_train_driver_is_one_line_and_the_run_continues(cluster, tmp_path):
    """`kill PID` (SIGTERM, what `draftray jobs stop` sends first) to `draftray train` with its own local Ray: exit
    143 with one line naming the command that continues the run (not Ray's own handler, which aborted the driver
    with exit -6 and nothing printed); the same command again finishes the run from its checkpoint."""
    from rayjobs.cli import main

    settings = ["train.steps=8", "train.checkpoint_every=1", "reward.name=faults:Slow", "reward.kwargs={seconds: 0.5}"]
    args = ["train", *FAST, f"run.output_dir={tmp_path}", "run.name=term", *settings]
    driver = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    run = tmp_path / "term"
    try:
        _wait_for_a_registered_checkpoint(driver, run)
        driver.terminate()  # SIGTERM to the driver's PID only
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            kill_with_children(driver)
    lines = [ln for ln in err.splitlines() if ln.startswith("draftray: ")]
    assert driver.returncode == 143, err[-2000:]
    assert lines[-1] == f"draftray: training interrupted (SIGTERM); start the same run.name to resume: draftray train {run / 'config.yaml'}"
    assert main(args) == 0 and train_steps(run)[-1] == 8
    assert [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m]  # continued, not restarted


def test_resume_after_killed_worker_and_after_restart(cluster, tmp_path):
    marker = tmp_path / "crashed"
    reward = ["reward.name=faults:CrashOnce", f"reward.kwargs={{at_call: 4, marker: '{marker}'}}"]
    run = fit_fast(tmp_path, "crash", "train.steps=5", "train.checkpoint_every=2", "ray.max_failures=1", *reward)
    assert marker.exists()  # the worker really died during step 4
    metrics = read_metrics(run)
    resumed = [m["resumed_from_step"] for m in metrics if "resumed_from_step" in m]
    assert resumed == [2]  # restarted from the step-2 checkpoint, not from scratch
    assert train_steps(run) == [1, 2, 3, 2 + 1, 4, 5]  # step 3 logged twice: before and after the crash
    assert json.loads((run / "checkpoints" / "step_000005" / "state.json").read_text()) == {"step": 5}

    # Starting a run with the same name again resumes it. Its latest checkpoint (step 5) altered in the storage
    # is skipped: the run continues from step 4, the newest that verifies.
    weights = run / "checkpoints" / "step_000005" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    again = fit_fast(tmp_path, "crash", "train.steps=6", "train.checkpoint_every=2", *reward)
    assert again == run
    assert [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m] == [2, 4]
    assert train_steps(run)[-2:] == [5, 6]


def test_non_finite_loss_stops_the_run_with_a_message(cluster, tmp_path):
    from rayjobs.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match="non-finite loss or gradient at step 2 .loss=nan") as err:
        fit_fast(tmp_path, "nan", "train.steps=4", "train.checkpoint_every=1", "reward.name=faults:NaNFrom", "reward.kwargs={at_call: 2}")
    assert str(err.value).endswith(f"last good checkpoint kept: {tmp_path / 'nan' / 'checkpoints' / 'step_000001'}")  # a path to open
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("step_*")) == ["step_000001"]


def test_worker_failure_beyond_max_failures_is_one_clear_error(cluster, tmp_path):
    from rayjobs.errors import TrainingStopped

    marker = tmp_path / "crashed"
    reward = ["reward.name=faults:CrashOnce", f"reward.kwargs={{at_call: 2, marker: '{marker}'}}"]
    with pytest.raises(TrainingStopped, match="training failed .*start the same run.name to resume"):
        fit_fast(tmp_path, "dies", "train.steps=3", "train.checkpoint_every=1", "ray.max_failures=0", *reward)
    assert (tmp_path / "dies" / "checkpoints" / "step_000001" / "trainable.safetensors").is_file()


def test_resume_after_killing_the_driver(cluster, tmp_path):
    """`draftray sweep` killed (SIGKILL) while its second trial trains; `--resume` finishes the sweep
    without repeating the finished trial, continuing the interrupted one from its checkpoint."""
    from rayjobs.runlog import read_status
    from rayjobs.tune.pareto import read_csv
    from rayjobs.tune.sweep import resume_sweep

    argv = [sys.executable, "-m", "rayjobs.cli", "sweep", str(SWEEP_YAML), f"run.output_dir={tmp_path}", "sweep.name=killed",
            *SWEEP_FAST, "train.steps=6", "train.eval_every=2", "sweep.max_concurrent=1", "sweep.inference={}",
            "sweep.params={objective.kl_coeff: {grid: [0.0, 1.0, 10.0]}}"]  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    trials = tmp_path / "killed" / "trials"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once one trial is done and the next has a checkpoint
            states = {d.name: read_status(d)["status"] for d in trials.glob("*") if (d / "trial.json").exists()}
            # a checkpoint counts once Ray Train's controller has registered it (its snapshot names it), not when
            # its files exist: a kill in between loses it, and the resumed trial would restart from zero
            started = [d for d in trials.glob("*") if states.get(d.name) == "running" and registered_checkpoint(d)]
            if "done" in states.values() and started:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the sweep did not get to its second trial in time")
    finally:
        kill_with_children(driver)  # and the driver's own Ray cluster
    done_before = {d.name: (d / "metrics.jsonl").read_text() for d in trials.glob("*") if read_status(d)["status"] == "done"}
    out = resume_sweep(tmp_path / "killed")  # on this module's cluster
    rows = read_csv(out / "trials.csv")
    assert {r["status"] for r in rows} == {"done"} and len({r["trial"] for r in rows}) == 3
    for name, text in done_before.items():
        steps = [m["step"] for m in read_metrics(trials / name) if "loss" in m]
        assert steps == list(range(1, 7)), name  # the finished trial did not train again
    for d in trials.glob("*"):
        assert sorted(set(m["step"] for m in read_metrics(d) if "loss" in m)) == list(range(1, 7))
    assert any("resumed_from_step" in m for d in trials.glob("*") for m in read_metrics(d))
    assert (out / "pareto.png").exists() and (out / "summary.md").exists()


def test_storage_full_during_a_run_fails_after_the_retries_and_keeps_the_last_checkpoint(cluster, tmpfs, tmp_path):
    """The storage fills up at step 3 and stays full: the step-3 upload is tried ray.upload_attempts times, then
    the run stops with one message naming the checkpoint and the reason; step 2's checkpoint stays loadable."""
    from rayjobs.errors import TrainingStopped
    from rayjobs.training.checkpoint import verify

    store = tmpfs("store", "16m")
    fault = ["reward.name=faults:FillDisk", f"reward.kwargs={{at_call: 3, directory: '{store}'}}"]
    with pytest.raises(TrainingStopped) as err:
        fit_fast(tmp_path, "full", "train.steps=4", "train.checkpoint_every=1", "ray.max_failures=0", f"ray.storage_path={store}",
                 "ray.upload_attempts=2", "ray.upload_backoff_s=0.1", *fault)  # fmt: skip
    message = str(err.value)
    assert f"{store}/full/step_000003 failed 2 times (last: " in message and "No space left on device" in message, message
    assert "\n" not in message
    verify(store / "full" / "step_000002")  # complete and loadable
    assert not (store / "full" / "step_000003").exists()  # the partial upload is removed, never registered


def test_a_transient_storage_outage_is_retried_and_the_run_completes(cluster, tmpfs, tmp_path):
    """The storage is full for 1 s at step 3: the upload's retry after ray.upload_backoff_s lands it."""
    from rayjobs.training.checkpoint import verify

    store = tmpfs("store", "16m")
    fault = ["reward.name=faults:FillDisk", f"reward.kwargs={{at_call: 3, directory: '{store}', free_after: 1.0}}"]
    run = fit_fast(tmp_path, "blip", "train.steps=4", "train.checkpoint_every=1", "ray.max_failures=0", f"ray.storage_path={store}",
                   "ray.upload_backoff_s=2.0", *fault)  # fmt: skip
    assert (store / "freed").exists()  # the outage happened, and ended
    assert train_steps(run) == [1, 2, 3, 4] and not any("resumed_from_step" in m for m in read_metrics(run))
    for step in (3, 4):
        verify(store / "blip" / f"step_{step:06d}")


def test_a_deterministic_worker_error_is_not_retried_and_is_named(cluster, tmp_path):
    """A ValueError inside the worker (the reward's first training call) with ray.max_failures=3: one attempt (no
    restart: one process made one call; the run ends well within what one more attempt would take), and one line
    naming the error and what to fix, not the advice to resume (docs/reliability.md, "Errors inside a worker")."""
    from rayjobs.errors import UserError

    calls = tmp_path / "calls"
    reward = ["reward.name=faults:RaiseAt", f"reward.kwargs={{at_call: 1, log: '{calls}', message: 'RaiseAt: this reward rejects its input'}}"]
    start = time.time()
    with pytest.raises(UserError) as err:
        fit_fast(tmp_path, "det", "train.steps=3", "train.checkpoint_every=1", "ray.max_failures=3", *reward)
    end = time.time()
    message = str(err.value)
    assert "training failed on worker rank 0 with ValueError: RaiseAt: this reward rejects its input; not retried" in message, message
    assert "\n" not in message and "resume" not in message
    lines = calls.read_text().splitlines()
    assert len(lines) == 1, lines  # one training call, in one worker process: Ray restarted nothing
    assert not any("resumed_from_step" in m for m in read_metrics(tmp_path / "det"))
    # A retry would start a new worker group that loads the model and samples before its first call again, most of
    # the time from the start to the error (the rest is the driver's preflight); the run ended in a fraction of it.
    raised_at = float(lines[0].split()[1])
    assert end - raised_at < 0.5 * (raised_at - start), (end - raised_at, raised_at - start)


# ---- torn checkpoints and Ray's record of them (docs/reliability.md, "Torn checkpoints") ----------------------


def _record(run: Path) -> tuple[list[str], str]:
    """The checkpoint names Ray Train's record holds, and its latest."""
    state = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    return [r["checkpoint_dir_name"] for r in state["checkpoint_results"]], state["latest_checkpoint_result"]["checkpoint_dir_name"]


def _check_consistent_and_equal(run: Path, straight: Path) -> None:
    """The run ended at STEPS, bit for bit the uninterrupted run; Ray's record names only directories that exist,
    each once; and the same run name starts again (a record naming a missing directory would stop that)."""
    from rayjobs.training.manifest import parse_name

    held, latest = _record(run)
    assert len(held) == len(set(held)) and all((run / "checkpoints" / n).is_dir() for n in held), held
    assert parse_name(latest)[0] == STEPS and train_steps(run)[-1] == STEPS
    assert_bitwise_equal(checkpoint_state(run / "checkpoints" / latest), checkpoint_state(straight / "checkpoints" / f"step_{STEPS:06d}"))
    a, b = (load_file(r / "export" / "pytorch_lora_weights.safetensors") for r in (run, straight))
    assert_bitwise_equal(a, b, "export")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torn_registered_checkpoint_then_a_kill_in_the_fall_back_window(straight, tmp_path, seed):
    """The worker is killed after its newest registered checkpoint was torn: the restarted worker falls back to
    the one before and writes the later steps as a new generation of names (step_NNNNNN-1), never into a name
    Ray's record holds; a second kill, at a random call inside that window, resumes again. The run ends bitwise
    equal to the uninterrupted one, and the same run name starts again."""
    rng = random.Random(seed)
    first = rng.randint(3, STEPS)  # dies at this call, after tearing step first-1 (step first-2 is whole)
    second = rng.randint(1, 2)  # the restarted worker dies again at its call 1 or 2: before or after passing the torn step
    kills, ckpts = tmp_path / "kills", tmp_path / "torn" / "checkpoints"
    reward = ["reward.name=faults:TearAndKill", f"reward.kwargs={{at_calls: [{first}, {second}], tears: [true, false], directory: '{kills}', checkpoints: '{ckpts}'}}"]
    run = fit_fast(tmp_path, "torn", *KILLED, *reward)
    assert len(list(kills.glob("kill_*"))) == 2 and (kills / "torn_0").read_text() == f"step_{first - 1:06d}", (first, second)
    resumed = [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m]
    assert resumed[0] == first - 2, (first, resumed)  # the fall-back: the torn step_{first-1} was skipped
    held, latest = _record(run)
    assert latest == f"step_{STEPS:06d}-1", held  # written after the fall-back: generation 1
    _check_consistent_and_equal(run, straight)
    again = fit_fast(tmp_path, "torn", *KILLED, *reward)  # a finished run started again: no TrainController error
    assert again == run


def test_only_checkpoint_torn_starts_again_from_step_0(straight, tmp_path, capfd):
    """The run stops after its step-1 checkpoint (its one retry spent), and that checkpoint is then torn. The same
    run name starts again from step 0 with one line that says so (not an error telling to resume it), and ends
    bitwise equal to the uninterrupted run."""
    from rayjobs.errors import TrainingStopped

    kills = tmp_path / "kills"
    reward = ["reward.name=faults:KillAt", f"reward.kwargs={{at_calls: [2], directory: '{kills}'}}"]
    with pytest.raises(TrainingStopped):
        fit_fast(tmp_path, "only", *KILLED[:2], "ray.max_failures=0", *reward)
    ckpt = tmp_path / "only" / "checkpoints" / "step_000001"
    weights = ckpt / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capfd.readouterr()
    run = fit_fast(tmp_path, "only", *KILLED, *reward)  # KillAt has used its one kill
    err = capfd.readouterr().err
    assert "removed the torn checkpoint step_000001" in err and "it starts again from step 0" in err
    assert not [m for m in read_metrics(run) if "resumed_from_step" in m]
    _check_consistent_and_equal(run, straight)


def test_record_naming_a_missing_checkpoint_resumes_from_the_newest_on_disk(straight, tmp_path, capfd):
    """Ray's record names a checkpoint directory that is gone (Ray deleted a live directory of a reused name, or
    the storage lost it): Ray's TrainController refuses such a record on every start. The driver sets it aside and
    the run resumes from the newest complete checkpoint on disk, ending bitwise equal."""
    from rayjobs.errors import TrainingStopped

    kills = tmp_path / "kills"
    reward = ["reward.name=faults:KillAt", f"reward.kwargs={{at_calls: [4], directory: '{kills}'}}"]
    with pytest.raises(TrainingStopped):
        fit_fast(tmp_path, "gone", *KILLED[:2], "ray.max_failures=0", *reward)
    held, latest = _record(tmp_path / "gone")
    assert latest == "step_000003", held
    shutil.rmtree(tmp_path / "gone" / "checkpoints" / "step_000002")
    capfd.readouterr()
    run = fit_fast(tmp_path, "gone", *KILLED, *reward)
    assert "names missing step_000002" in capfd.readouterr().err
    assert [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m] == [3]
    _check_consistent_and_equal(run, straight)
