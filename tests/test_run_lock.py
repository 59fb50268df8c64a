"""One driver per run name (docs/reliability.md, "One run per run name"): the run directory's lock
(rayjobs/runlock.py), with real processes.

The unit tests take the lock in this process and in helper processes that load only rayjobs/runlock.py (no
torch, no Ray: they start in a fraction of a second). The CLI tests start the real `python -m rayjobs.cli
train` / `sweep` against a lock held by a helper (or left by a SIGKILLed one); the lock is taken before Ray
starts, so neither refusal nor take-over starts Ray here. The two-trainings-at-once test is slow and starts Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayjobs import runlock
from rayjobs.runlock import LOCK_FILE, RunInUse, RunLock, hold_run

ROOT = Path(__file__).parents[1]

# A helper process: loads rayjobs/errors.py and rayjobs/runlock.py without rayjobs/__init__.py (which imports
# torch's companions), takes the lock on argv[1] (optionally at wall time argv[2]), says so on stdout and holds
# it until killed or for argv[3] seconds. $NO_FLOCK: as on a filesystem without flock (the guard file alone).
HELPER = r"""
import os, sys, time, types
pkg = types.ModuleType("rayjobs"); pkg.__path__ = [os.path.join(sys.argv[4], "rayjobs")]; sys.modules["rayjobs"] = pkg
from rayjobs import runlock
if os.environ.get("NO_FLOCK"):
    runlock._try_flock = lambda fd: None
at, hold = float(sys.argv[2]), float(sys.argv[3])
while time.time() < at:
    time.sleep(0.001)
lock = runlock.RunLock([sys.argv[1]], name="r1")
try:
    lock.acquire()
except runlock.RunInUse as err:
    print("REFUSED", err, flush=True)
    sys.exit(0)
print("WON", os.getpid(), flush=True)
time.sleep(hold)
lock.release()
"""


def helper(directory: Path, at: float = 0.0, hold: float = 3600.0, no_flock: bool = False) -> subprocess.Popen:
    env = dict(os.environ, NO_FLOCK="1" if no_flock else "")
    args = [sys.executable, "-c", HELPER, str(directory), str(at), str(hold), str(ROOT)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def holding(directory: Path) -> subprocess.Popen:
    """A helper that holds the lock on ``directory`` (until the test kills it)."""
    proc = helper(directory)
    assert proc.stdout.readline().split() == ["WON", str(proc.pid)], proc.stderr.read()
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL (no cleanup: the lock file stays) a helper this test started, by its PID, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def dead_pid() -> int:
    """The pid of a process that ran and has been reaped (not running now)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(directory: Path, **fields) -> Path:
    """A lock file as another process would have left it."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": 1, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "run": directory.name,
              "field": "run.name", "pid_start": None, "machine": runlock._machine(), **fields}  # fmt: skip
    path = directory / LOCK_FILE
    path.write_text(json.dumps(record) + "\n")
    return path


def snapshot(root: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under root; the lock file's bytes only (its holder's
    heartbeat refreshes its mtime)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), None if p.name == LOCK_FILE else p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- the lock, in this process


def test_acquire_refuse_release(tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    with hold_run(run) as lock:
        record = json.loads((run / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["run"] == "r1"
        assert record["started"] and record["pid_start"] == runlock._process_start(os.getpid())
        assert [h.path for h in lock.held] == [run / LOCK_FILE]
        with pytest.raises(RunInUse) as err:  # a second holder, even in the same process
            RunLock([run], name="r1").acquire()
        msg = str(err.value)
        assert msg.startswith(f"run.name r1: in use by pid {os.getpid()} on host {socket.gethostname()}, started {record['started']}")
        assert msg.endswith("wait for that run to end, or choose another run.name") and "\n" not in msg
        assert isinstance(err.value, runlock.UserError)  # one line, exit 2 (rayjobs/cli.py)
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]  # the refusal left nothing behind
    assert not (tmp_path / "runs").exists()  # released: the lock file and the directories it created are gone
    assert capsys.readouterr().err == ""
    (run / "metrics.jsonl").parent.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    with hold_run(run):  # a directory that exists (a resumed run) keeps its files, and is kept
        pass
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]


def test_release_on_error_and_keyboard_interrupt(tmp_path):
    run = tmp_path / "r1"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with hold_run(run):
                (run / "config.yaml").write_text("x")
                raise exc
        assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_all_or_none_and_the_shared_storage_twin(tmp_path):
    """With a ray.storage_path on a filesystem, <storage>/<run name> is locked too; refused there, the local run
    directory is neither locked nor created. An object store gets the local lock only."""
    run, store = tmp_path / "runs" / "r1", tmp_path / "store"
    assert runlock.lock_dirs(run, str(store)) == [run, store / "r1"]
    assert runlock.lock_dirs(run, f"file://{store}") == [run, store / "r1"]
    assert runlock.lock_dirs(run, "s3://bucket/prefix") == [run]
    assert runlock.lock_dirs(run, str(tmp_path / "runs")) == [run]  # storage = output dir: one lock
    with hold_run(tmp_path / "elsewhere" / "r1", str(store)):  # another machine's run dir, the same storage
        with pytest.raises(RunInUse, match=f"lock file {store / 'r1' / LOCK_FILE}"):
            with hold_run(run, str(store)):
                pass
        assert not (tmp_path / "runs").exists()
    with hold_run(run, str(store)):
        assert (run / LOCK_FILE).is_file() and (store / "r1" / LOCK_FILE).is_file()
    assert not (store / "r1").exists()


def test_a_lock_that_cannot_be_written_is_one_user_error(tmpfs):
    """A run directory on a read-only filesystem (a real read-only tmpfs): one line naming the lock, no OSError."""
    ro = tmpfs("ro", readonly=True)
    with pytest.raises(runlock.UserError, match=f"run.name r1: cannot take the lock {ro / 'r1' / LOCK_FILE} .*Read-only file system"):
        RunLock([ro / "r1"]).acquire()


def test_stale_lock_of_a_dead_pid_is_taken_over_with_one_warning(tmp_path, capsys):
    run = tmp_path / "r1"
    pid = dead_pid()
    write_lock(run, pid=pid, pid_start="12345")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with hold_run(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "metrics.jsonl"]  # no guard or temp file left
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"draftray: warning: run.name r1: took over the stale lock {run / LOCK_FILE} (pid {pid} is not running;")
    assert f"held by pid {pid} on host {socket.gethostname()}" in err


def test_stale_lock_whose_pid_now_runs_another_process(tmp_path, capsys):
    """The pid is alive but started at another time than the holder recorded (reused): stale. The same pid and
    start time (a live holder that, here, holds no flock, as on a filesystem without one): refused."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real = runlock._process_start(other.pid)
        write_lock(tmp_path / "live", pid=other.pid, pid_start=real)
        with pytest.raises(RunInUse, match=f"in use by pid {other.pid} "):
            hold_run(tmp_path / "live").__enter__()
        write_lock(tmp_path / "r1", pid=other.pid, pid_start=str(int(real) - 1000))
        with hold_run(tmp_path / "r1"):
            pass
    finally:
        kill(other)
    err = one_line(capsys.readouterr().err)
    assert f"pid {other.pid} now belongs to another process" in err and err.startswith("draftray: warning: ")


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path, capsys):
    """Another machine's pid means nothing here: its lock is live while its mtime (the heartbeat) is fresh."""
    run = tmp_path / "r1"
    path = write_lock(run, pid=os.getpid(), host="node-b", machine="another-boot:1")
    with pytest.raises(RunInUse, match="in use by pid .* on host node-b"):
        RunLock([run]).acquire()
    old = time.time() - runlock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    with hold_run(run):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    err = one_line(capsys.readouterr().err)
    assert re.search(r"no heartbeat for 12\d s, over the 120 s allowed", err) and "host node-b" in err


def test_heartbeat_refreshes_the_lock_and_notices_a_take_over(tmp_path, capsys):
    run = tmp_path / "r1"
    lock = RunLock([run], heartbeat_s=0.05)
    with lock:
        path = run / LOCK_FILE
        os.utime(path, (0, 0))
        deadline = time.time() + 10
        while path.stat().st_mtime < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - path.stat().st_mtime < 10  # beaten again
        stolen = write_lock(run / "x", pid=4242, host="node-b", machine="m")  # another process's file replaces ours
        os.replace(stolen, path)
        deadline = time.time() + 10
        while not lock.held[0].lost and time.time() < deadline:
            time.sleep(0.02)
    assert json.loads(path.read_text())["pid"] == 4242  # not deleted on release: it is not ours
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"draftray: warning: run.name r1: the lock {path} was taken over by pid 4242 on host node-b")


@pytest.mark.parametrize("no_flock", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["flock", "guard-only"])  # guard-only: slow tier
def test_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path, no_flock):
    """Four processes find the same stale lock at the same instant: one takes it over, the other three are refused
    and name the winner. Without flock (NO_FLOCK) the take-over guard alone decides."""
    for round_ in range(2):
        run = tmp_path / f"r{round_}"
        write_lock(run, pid=dead_pid())
        at = time.time() + 2.0  # every helper has started (and imported) by then
        procs = [helper(run, at=at, hold=4.0, no_flock=no_flock) for _ in range(4)]
        outs = [p.communicate(timeout=60) for p in procs]
        won = [p.pid for p, (out, _) in zip(procs, outs) if out.startswith("WON")]
        assert len(won) == 1, outs
        refused = [out for out, _ in outs if out.startswith("REFUSED")]
        assert len(refused) == 3 and all(f"in use by pid {won[0]} " in out for out in refused), outs
        assert all(p.returncode == 0 for p in procs), outs
        assert sorted(p.name for p in run.iterdir()) == []  # the winner released it; no guard or temp file left


def test_a_sigkilled_holder_is_taken_over(tmp_path, capsys):
    """A real holder (flock and all) SIGKILLed: the kernel drops its flock, its pid is gone, the lock is stale."""
    run = tmp_path / "r1"
    proc = holding(run)
    with pytest.raises(RunInUse, match=f"in use by pid {proc.pid} "):
        RunLock([run]).acquire()
    kill(proc)
    with hold_run(run):
        pass
    assert f"(pid {proc.pid} is not running;" in one_line(capsys.readouterr().err)


# --- the real CLI, without Ray: the lock comes before Ray starts


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "rayjobs.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def existing_run(run: Path) -> None:
    """The files of a run trained on the tiny model (what a second start would resume)."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name_or_path: tiny\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state.json").write_text('{"step": 2}')


def test_cli_train_refused_while_another_holds_the_run(tmp_path):
    run = tmp_path / "runs" / "r1"
    existing_run(run)
    proc = holding(run)
    before = snapshot(tmp_path)
    try:
        done = cli("train", "optim.lr=3e-4", "run.name=r1", f"run.output_dir={tmp_path / 'runs'}")
    finally:
        kill(proc)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    err = one_line(done.stderr)
    assert err.startswith(f"draftray: error: run.name r1: in use by pid {proc.pid} on host {socket.gethostname()}, started 20"), err
    assert err.endswith("wait for that run to end, or choose another run.name")
    assert snapshot(tmp_path) == before  # the first run's files untouched (the lock file is the helper's)


@pytest.mark.slow  # the fast tier has one CLI refusal; the take-over logic is tested in-process above
def test_cli_train_refused_by_the_lock_on_shared_storage(tmp_path):
    """Two machines, one ray.storage_path: the other driver's lock is on <storage>/<run name> only (its local
    run directory is on its own disk). Refused, and this machine's run directory is not even created."""
    store = tmp_path / "store"
    existing_run(store / "r1")
    proc = holding(store / "r1")
    before = snapshot(store)
    try:
        done = cli("train", "run.name=r1", f"run.output_dir={tmp_path / 'runs'}", f"ray.storage_path={store}")
    finally:
        kill(proc)
    assert done.returncode == 2, done.stderr
    err = one_line(done.stderr)
    assert f"run.name r1: in use by pid {proc.pid} on host" in err and f"lock file {store / 'r1' / LOCK_FILE}" in err
    assert snapshot(store) == before and not (tmp_path / "runs").exists()


@pytest.mark.slow  # the fast tier has one CLI refusal; the take-over logic is tested in-process above
def test_cli_train_takes_over_the_lock_of_a_sigkilled_holder(tmp_path):
    """The holder SIGKILLed (no cleanup): the next start takes the lock over with one warning and goes on, here to
    the resume check that comes after the lock (a run of 'tiny' started again on 'toy': refused there, exit 2),
    and releases it again."""
    run = tmp_path / "runs" / "r1"
    existing_run(run)
    proc = holding(run)
    kill(proc)
    assert (run / LOCK_FILE).exists()
    done = cli("train", "run.name=r1", "model.name_or_path=toy", f"run.output_dir={tmp_path / 'runs'}")
    assert done.returncode == 2, done.stderr
    warning, error = done.stderr.strip().splitlines()
    assert warning.startswith(f"draftray: warning: run.name r1: took over the stale lock {run / LOCK_FILE} (pid {proc.pid} is not running;")
    assert error.startswith("draftray: error: run.name r1: its checkpoints") and "'tiny', not 'toy'" in error
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow  # the fast tier has one CLI refusal; the take-over logic is tested in-process above
def test_cli_sweep_refused_then_takes_over(tmp_path):
    """`draftray sweep` with a sweep.name whose driver runs: refused; that driver SIGKILLed: the next start takes
    the lock over and reaches the sweep directory's own check (it holds a sweep: use --resume)."""
    out = tmp_path / "runs" / "toy-kl-sweep"
    (out / "tune").mkdir(parents=True)
    args = ["sweep", str(ROOT / "configs" / "toy-kl-sweep.yaml"), f"run.output_dir={tmp_path / 'runs'}"]
    proc = holding(out)
    try:
        done = cli(*args)
    finally:
        kill(proc)
    assert done.returncode == 2, done.stderr
    err = one_line(done.stderr)
    assert err.startswith(f"draftray: error: sweep.name toy-kl-sweep: in use by pid {proc.pid} on host ")
    assert err.endswith("or choose another sweep.name")
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    warning, error = done.stderr.strip().splitlines()
    assert warning.startswith(f"draftray: warning: sweep.name toy-kl-sweep: took over the stale lock {out / LOCK_FILE} (pid {proc.pid}")
    assert "already holds a sweep; `draftray sweep --resume" in error
    assert sorted(p.name for p in out.iterdir()) == ["tune"]


def test_sweep_resume_refused_while_the_sweep_runs(tmp_path, monkeypatch, capsys):
    """`draftray sweep --resume DIR` while DIR's driver still runs (in-process; Ray is imported, not started)."""
    from ray import tune

    from rayjobs.cli import main
    from rayjobs.config import load_config, to_yaml

    out = tmp_path / "s"
    (out / "tune").mkdir(parents=True)
    (out / "sweep.yaml").write_text(to_yaml(load_config(ROOT / "configs" / "toy-kl-sweep.yaml", [f"run.output_dir={tmp_path}", "sweep.name=s"])))
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: True))
    with hold_run(out):
        assert main(["sweep", "--resume", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"draftray: error: sweep.name s: in use by pid {os.getpid()} on host ")


# --- two real trainings at once


@pytest.mark.slow
@pytest.mark.ray
def test_two_trainings_with_one_run_name_at_once(tmp_path):
    """Two `draftray train` processes started together with one run.name and two learning rates: one trains
    (exit 0), the other is refused (exit 2, naming it); the run holds one record per step, from the winner's lr."""
    sys.path.insert(0, str(Path(__file__).parent))
    from shortrun import FAST

    from rayjobs.config import load_config
    from rayjobs.runlog import read_metrics

    common = ["train", *FAST, "train.steps=3", f"run.output_dir={tmp_path}", "run.name=twin"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {lr: subprocess.Popen([sys.executable, "-m", "rayjobs.cli", *common, f"optim.lr={lr}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for lr in ("1e-4", "2e-4")}  # fmt: skip
    results = {lr: (p.communicate(timeout=600), p.returncode, p.pid) for lr, p in procs.items()}
    codes = sorted(rc for _, rc, _ in results.values())
    assert codes == [0, 2], results
    winner = next(lr for lr, (_, rc, _) in results.items() if rc == 0)
    (_, loser_err), _, _ = next(r for r in results.values() if r[1] == 2)
    assert f"run.name twin: in use by pid {results[winner][2]} " in loser_err
    run = tmp_path / "twin"
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == [1, 2, 3]
    assert load_config(run / "config.yaml").optim.lr == float(winner)
    assert not (run / LOCK_FILE).exists()
