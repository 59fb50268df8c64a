"""A real `draftray sweep` interrupted by a signal, then resumed (docs/sweeps.md, "Trial states").

The driver is `python -m rayjobs.cli sweep` in its own process group with its own local Ray; Ctrl-C is SIGINT
to that whole group, as a terminal sends it. The promise checked: the driver exits 128 + the signal with one
line naming `draftray sweep --resume <dir>`, trials.csv lists every trial of the space with its state, and the
resume finishes the interrupted and not-started trials without training the done one again.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rayrun import REPO, SWEEP_FAST, SWEEP_YAML, TESTS_DIR, kill_with_children, registered_checkpoint, train_steps

from rayjobs.runlog import read_metrics, read_status
from rayjobs.tune.pareto import read_csv

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GRID = [0.0, 1.0, 10.0]
# faults:Slow (tests/faults.py): 1 s more per training step, so the trial signalled at its step-2 checkpoint is
# still short of its last step (6) when Tune has stopped it, a few seconds later.
SETTINGS = [*SWEEP_FAST, "train.steps=6", "train.eval_every=2", "sweep.max_concurrent=1", "sweep.inference={}",
            "reward.name=faults:Slow", "reward.kwargs={seconds: 1.0}", f"sweep.params={{objective.kl_coeff: {{grid: {GRID}}}}}"]  # fmt: skip


def _cli(tmp_path: Path, log: str, *args: str) -> subprocess.Popen:
    """`python -m rayjobs.cli sweep ...` in a new process group (a terminal's foreground job); output to files,
    so a full pipe never blocks it. The driver and its Ray workers import tests/faults.py."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])))
    with open(tmp_path / f"{log}.out", "w") as out, open(tmp_path / f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "sweep", *args], stdout=out, stderr=err, cwd=REPO, env=env,
                                start_new_session=True)  # fmt: skip


def _states(trials: Path) -> dict[str, str]:
    return {d.name: read_status(d)["status"] for d in trials.glob("*") if (d / "trial.json").exists()}


def _wait_for(driver: subprocess.Popen, ready, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert driver.poll() is None, f"the sweep ended (exit {driver.returncode}) before {what}"
        if time.time() > deadline:
            pytest.fail(f"the sweep did not get to {what} in {seconds:.0f} s")
        time.sleep(0.5)


def _interrupt(driver: subprocess.Popen, signum: int, seconds: float = 180) -> int:
    """``signum`` to the driver's process group, as Ctrl-C does (SIGTERM to the driver alone, as `kill` does); its exit status."""
    if signum == signal.SIGINT:
        os.killpg(driver.pid, signum)
    else:
        driver.send_signal(signum)
    try:
        return driver.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_with_children(driver)
        pytest.fail(f"the sweep did not end within {seconds:.0f} s of {signal.Signals(signum).name}")


def _resume_lines(tmp_path: Path, log: str) -> list[str]:
    """The lines of the driver's stderr that tell how to resume (Tune's own Tuner.restore hint is not shown)."""
    return [ln for ln in (tmp_path / f"{log}.err").read_text().splitlines() if "--resume" in ln or "restore" in ln.lower()]


def test_ctrl_c_then_resume_accounts_for_every_trial(tmp_path):
    """Ctrl-C while the second of three trials trains (one at a time): exit 130, one line with the resume command,
    trials.csv has the three trials done / interrupted / not_started with their kl_coeff. `--resume` then ends
    with all three done; the done one is not trained again, the interrupted one continues from its checkpoint."""
    out = tmp_path / "sw"
    trials = out / "trials"
    driver = _cli(tmp_path, "first", str(SWEEP_YAML), f"run.output_dir={tmp_path}", "sweep.name=sw", *SETTINGS)
    try:
        # a checkpoint counts once Ray Train's controller registered it (tests/test_ray_faults.py: the same wait)
        _wait_for(driver, lambda: "done" in _states(trials).values()
                  and any(s == "running" and registered_checkpoint(trials / n) for n, s in _states(trials).items()), "its second trial")  # fmt: skip
        assert _interrupt(driver, signal.SIGINT) == 130, (tmp_path / "first.err").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            kill_with_children(driver)
    assert _resume_lines(tmp_path, "first") == [
        f"draftray: sweep interrupted (SIGINT): 1 done, 1 interrupted, 1 not started of 3 trials; continue with: draftray sweep --resume {out}"]
    assert (tmp_path / "first.out").read_text().strip().splitlines()[-1:] != [str(out)]  # the success line is not printed
    rows = read_csv(out / "trials.csv")
    state = {r["trial"]: (r["status"], r["config.objective.kl_coeff"]) for r in rows}
    assert sorted(state.values()) == [("done", 0.0), ("interrupted", 1.0), ("not_started", 10.0)], state
    assert "1 done, 1 interrupted, 1 not_started (3 in all)" in (out / "summary.md").read_text()
    done = next(n for n, (s, _) in state.items() if s == "done")
    finished = (trials / done / "metrics.jsonl").read_text()

    again = _cli(tmp_path, "resume", "--resume", str(out))
    try:
        assert again.wait(timeout=420) == 0, (tmp_path / "resume.err").read_text()[-3000:]
    finally:
        if again.poll() is None:
            kill_with_children(again)
    assert (tmp_path / "resume.out").read_text().splitlines()[-1] == str(out)
    rows = read_csv(out / "trials.csv")
    assert {r["status"] for r in rows} == {"done"} and sorted({r["config.objective.kl_coeff"] for r in rows}) == GRID
    assert len({r["trial"] for r in rows}) == 3 and not any(r["trial"].startswith("#") for r in rows)
    assert (trials / done / "metrics.jsonl").read_text() == finished  # not trained again
    interrupted = next(n for n, (s, _) in state.items() if s == "interrupted")
    assert any("resumed_from_step" in m for m in read_metrics(trials / interrupted))
    for d in trials.iterdir():
        assert sorted(set(train_steps(d))) == list(range(1, 7)), d.name
    assert "3 done (3 in all)" in (out / "summary.md").read_text() and (out / "pareto.png").is_file()


def test_sigterm_stops_a_sweep_as_ctrl_c_does(tmp_path):
    """SIGTERM to the driver alone (`kill PID`) while the first trial trains: exit 143, the same
    one line, trials.csv with that trial interrupted and the two others not started, with the values they will get."""
    out = tmp_path / "term"
    trials = out / "trials"
    driver = _cli(tmp_path, "term", str(SWEEP_YAML), f"run.output_dir={tmp_path}", "sweep.name=term", *SETTINGS)
    try:
        _wait_for(driver, lambda: any(registered_checkpoint(d) for d in trials.glob("*")), "its first checkpoint")
        assert _interrupt(driver, signal.SIGTERM) == 143, (tmp_path / "term.err").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            kill_with_children(driver)
    assert _resume_lines(tmp_path, "term") == [
        f"draftray: sweep interrupted (SIGTERM): 1 interrupted, 2 not started of 3 trials; continue with: draftray sweep --resume {out}"]
    state = {r["trial"]: (r["status"], r["config.objective.kl_coeff"]) for r in read_csv(out / "trials.csv")}
    assert sorted(state.values()) == [("interrupted", 0.0), ("not_started", 1.0), ("not_started", 10.0)], state
    assert {n for n, (s, _) in state.items() if s == "not_started"} == {"#1", "#2"}  # their places in the grid
