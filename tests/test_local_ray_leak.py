"""A private local Ray leaves no process behind when its driver is SIGKILLed (rayjobs/cluster/leftovers.py).

The Ray tests start a real driver as draftray does (``start_local_ray`` in a subprocess), wait until the
session's record names every one of its processes, kill only the driver's PID (and in one test its watchdog's
too) and check that every former descendant is gone, while a process the driver started outside Ray (a
``sleep``) lives on. The unit tests feed the reaper hand-made records: a reused PID is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rayjobs.cluster import leftovers
from rayjobs.cluster.leftovers import STATE_ENV, entry, reap_stale, same_program

REPO = Path(__file__).parents[1]

# The driver: a bystander child outside Ray first (its pid on the first line), then the private cluster.
DRIVER = """
import subprocess, sys, time
print(subprocess.Popen(["sleep", "120"]).pid, flush=True)
from rayjobs.cluster.driver import start_local_ray
start_local_ray(num_cpus=1)
print("ready", flush=True)
if sys.argv[1:] == ["shutdown"]:
    import ray
    ray.shutdown()
    print("shut down", flush=True)
time.sleep(600)
"""


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a killed process may wait a moment for its new parent to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def described(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
    return out


class Driver:
    """A driver process of its own private local Ray, and what the test saw of it."""

    def __init__(self, state: Path, log: Path, *args: str):
        env = dict(os.environ, **{STATE_ENV: str(state)})
        self.state, self.log = state, log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.bystander = psutil.Process(int(self.proc.stdout.readline()))
        self.family: list[psutil.Process] = []

    def expect(self, line: str) -> None:
        got = self.proc.stdout.readline().strip()
        assert got == line, f"driver said {got!r} (log: {self.log.name})"

    def record(self) -> dict | None:
        paths = list(self.state.glob("session_*.json"))
        return json.loads(paths[0].read_text(encoding="utf-8")) if paths else None

    def wait_recorded(self, timeout: float = 30.0) -> dict:
        """Waits until the record names the watchdog and every descendant of the driver (bar the bystander),
        the agents among them; keeps those descendants in ``self.family``."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.record()
            family = [p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.pid != self.bystander.pid]
            self.family = family
            if record and record["watchdog"]:
                known = {e["pid"] for e in record["processes"]} | {record["watchdog"]["pid"]}
                agents = [e for e in record["processes"] if "Agent" in " ".join(e["cmdline"])]
                if {p.pid for p in family} <= known and len(agents) >= 2:
                    return record
            assert time.monotonic() < deadline, f"the record never covered the session: {record} vs {described(family)}"
            time.sleep(0.5)

    def close(self) -> None:
        """Whatever happened, nothing of this test outlives it (each process by its PID, create time checked)."""
        self.proc.kill()
        self.proc.wait()
        for p in [*self.family, self.bystander]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def driver(tmp_path):
    started = []

    def start(*args: str) -> Driver:
        started.append(Driver(tmp_path / "state", tmp_path / f"driver{len(started)}.log", *args))
        return started[-1]

    yield start
    for d in started:
        d.close()


@pytest.mark.ray
@pytest.mark.slow
def test_the_watchdog_stops_the_session_of_a_sigkilled_driver(driver):
    d = driver()
    d.expect("ready")
    d.wait_recorded()
    d.proc.kill()  # SIGKILL, to the driver's PID only
    d.proc.wait()
    left = wait_gone(d.family, timeout=30)
    assert not left, f"outlived their driver: {described(left)}"
    assert d.record() is None  # the watchdog removed the record
    assert alive(d.bystander)  # the driver's child outside Ray is none of the session's


@pytest.mark.ray
@pytest.mark.slow
def test_the_next_start_reaps_a_session_whose_driver_and_watchdog_were_killed(driver, capsys):
    d = driver()
    d.expect("ready")
    record = d.wait_recorded()
    psutil.Process(record["watchdog"]["pid"]).kill()
    d.proc.kill()
    d.proc.wait()
    time.sleep(3)  # the raylet and GCS die with the driver; the agents stay
    leaked = [p for p in d.family if alive(p)]
    assert leaked, "nothing leaked: this test no longer shows the reaper at work"
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        assert reap_stale(d.state) >= 1
        left = wait_gone(d.family, timeout=5)
        assert not left, f"left after the reap: {described(left)}"
        assert d.record() is None
        assert unrelated.poll() is None and alive(d.bystander)
    finally:
        unrelated.kill()
        unrelated.wait()
    err = capsys.readouterr().err
    assert "leftover processes of local Ray session_" in err and f"pid {d.proc.pid}" in err


@pytest.mark.ray
@pytest.mark.slow
def test_the_watchdog_exits_with_its_session_after_a_shutdown(driver):
    d = driver("shutdown")
    d.expect("ready")
    watchdogs = [p for p in psutil.Process(d.proc.pid).children() if "leftovers.py" in " ".join(p.cmdline())]
    assert len(watchdogs) == 1
    d.expect("shut down")
    assert not wait_gone(watchdogs, timeout=30), "the watchdog outlived the session it guards"
    assert d.record() is None
    assert d.proc.poll() is None  # while the driver goes on


@pytest.mark.slow
def test_the_watchdog_stops_only_the_session_without_ray(tmp_path):
    """The watchdog's own path with stand-ins: a fake driver whose child names the session (as the GCS and
    raylet do), and a child that does not; SIGKILL the driver: the first goes, the second stays."""
    session = "session_2000-01-01_00-00-00_000000_1"
    fake = f"""
import importlib.util, subprocess, sys, time
spec = importlib.util.spec_from_file_location("leftovers", {str(Path(leftovers.__file__))!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--session-dir=/tmp/ray/{session}"])
other = subprocess.Popen(["sleep", "120"])
time.sleep(0.2)
mod.watch_session({session!r})
print(ours.pid, other.pid, flush=True)
time.sleep(120)
"""
    env = dict(os.environ, **{STATE_ENV: str(tmp_path)})
    proc = subprocess.Popen([sys.executable, "-c", fake], env=env, stdout=subprocess.PIPE, text=True)
    ours, other = (psutil.Process(int(pid)) for pid in proc.stdout.readline().split())
    try:
        deadline = time.monotonic() + 10
        while not (record := json.loads((tmp_path / f"{session}.json").read_text())).get("watchdog"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        watchdog = psutil.Process(record["watchdog"]["pid"])
        proc.kill()
        proc.wait()
        assert not wait_gone([ours, watchdog], timeout=15)
        assert alive(other)
        assert not (tmp_path / f"{session}.json").exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        for p in (ours, other):
            with contextlib.suppress(psutil.Error):
                p.kill()


def write(directory: Path, session: str, driver: dict, processes: list[dict]) -> Path:
    path = directory / f"{session}.json"
    path.write_text(json.dumps({"session": session, "driver": driver, "watchdog": None, "processes": processes}))
    return path


def test_the_reaper_never_signals_a_process_that_does_not_match_its_record(tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        proc = psutil.Process(sleeper.pid)
        while not (real := entry(proc)):  # empty while the child is still exec'ing
            time.sleep(0.01)
        dead_driver = {"pid": sleeper.pid, "create_time": 1.0, "cmdline": ["python", "-m", "rayjobs.cli", "train"]}
        reused = write(tmp_path, "session_a", dead_driver, [{**real, "create_time": real["create_time"] + 100}])
        renamed = write(tmp_path, "session_b", dead_driver, [{**real, "cmdline": ["ray::DashboardAgent"]}])
        live = write(tmp_path, "session_c", entry(psutil.Process()), [real])  # its driver (this process) lives
        garbled = tmp_path / "session_e.json"
        garbled.write_text('{"session": "session_e", "processes": [')
        assert reap_stale(tmp_path) == 0
        assert alive(proc)
        assert not reused.exists() and not renamed.exists() and not garbled.exists() and live.exists()
        assert capsys.readouterr().err == ""
        live.unlink()
        write(tmp_path, "session_d", dead_driver, [real])  # the control: the same process, recorded right
        assert reap_stale(tmp_path) == 1
        assert not alive(proc)
        assert "stopped 1 leftover processes of local Ray session_d" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize(
    "recorded, current, same",
    [
        (["python", "/x/ray/_private/workers/default_worker.py"], ["ray::IDLE"], True),  # a worker renames itself
        (["python", "-c", "from multiprocessing.forkserver import main; main(25, 27, ['ray', 'ray.dashboard'])"], ["ray-dashboard-JobHead-0"], True),
        (["sleep", "60"], ["sleep", "60"], True),
        (["ray::DashboardAgent"], ["sleep", "60"], False),
        (["python", "/x/ray/dashboard/agent.py"], ["python", "array_job.py"], False),
        (["ray::IDLE"], [], False),  # a zombie has no command line
    ],
)
def test_same_program(recorded, current, same):
    assert same_program(recorded, current) is same
