"""Stops the processes a private local Ray leaves behind when its driver dies without ``ray.shutdown()``.

A SIGKILLed driver (the OOM killer, ``kill -9``) takes its raylet and GCS with it, but the raylet's
DashboardAgent and RuntimeEnvAgent outlive it, forever (docs/reliability.md, "A private local Ray after
its driver dies"). Two guards share one record per session, a JSON file in a per-user state directory
that names the driver, the watchdog and every process of the session, each with its create time:

- the watchdog (``watch_session``): right after ray.init the driver starts this file as a small process
  (``python leftovers.py RECORD``: no package import, so no torch and no ray; ~0.1 s, ~15 MB). It keeps
  the record up to date, learns of the driver's death at once (EOF on its stdin, whose write end only the
  driver holds) and then stops what is left of the session; it exits by itself once the session is over;
- the reaper (``reap_stale``): the next private start stops the leftovers of every recorded session
  whose driver is dead (for when the watchdog was killed too).

A session's processes are the driver's children whose command line names the session (GCS, raylet,
dashboard, monitors) and all their descendants, snapshotted while the driver lives: once it dies they are
re-parented and nothing else ties them to it. A process is signalled only if its PID, its create time and
its program still match the record, so a reused PID is never touched.

Ray-free and project-free on purpose: the watchdog runs this file as a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

STATE_ENV = "DRAFTRAY_LOCAL_RAY_STATE"  # overrides the state directory (the tests use a temporary one)
POLL_S = 2.0  # how often the watchdog refreshes the record and checks on the driver
SETTLE_S = 2.0  # after the driver is gone: time for a session that is shutting down to finish by itself
GRACE_S = 3.0  # SIGTERM, then SIGKILL after this (the agents linger on SIGTERM without their raylet)
CTIME_SLACK_S = 1.0  # create times are derived from the boot time, which a clock step moves a little
RAY_PROGRAM = re.compile(r"\bray\b")  # ray::IDLE, ray-dashboard-*, .../site-packages/ray/..., ['ray', ...]

_WATCHDOGS: list[subprocess.Popen] = []  # the driver's watchdogs: their stdin pipes must stay open


def state_dir() -> Path:
    """Per user: $XDG_RUNTIME_DIR (emptied at logout, like the processes) else ~/.cache."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path.home() / ".cache"
    return base / "draftray" / "local-ray"


def entry(proc: psutil.Process) -> dict | None:
    """What identifies the process later; None while its command line reads empty (it is still exec'ing:
    a later snapshot records it)."""
    cmdline = proc.cmdline()
    return {"pid": proc.pid, "create_time": proc.create_time(), "cmdline": cmdline} if cmdline else None


def entries(procs) -> list[dict]:
    """The entries of those still alive and past their exec."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(entry(p))
    return [e for e in out if e]


def same_program(recorded: list[str], current: list[str]) -> bool:
    """Ray workers and agents rename themselves (``python .../default_worker.py`` becomes ``ray::IDLE``):
    the same command line, or Ray's on both sides."""
    if current == recorded:
        return True
    return bool(current) and all(RAY_PROGRAM.search(" ".join(c)) for c in (recorded, current))


def matching(rec: dict, strict: bool = True) -> psutil.Process | None:
    """The live process a record entry names, or None. ``strict``: create time and program must both match
    (before a signal); otherwise either does (is a driver still alive: a wrong "dead" would kill its cluster)."""
    try:
        proc = psutil.Process(rec["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        same_time = abs(proc.create_time() - rec["create_time"]) <= CTIME_SLACK_S
        same = same_program(rec["cmdline"], proc.cmdline())
    except (psutil.Error, KeyError, TypeError):
        return None
    return proc if (same_time and same if strict else same_time or same) else None


def session_processes(driver: psutil.Process, session: str) -> list[psutil.Process]:
    """The driver's children whose command line names the session, and their descendants."""
    found = []
    for child in driver.children():
        try:
            if any(session in arg for arg in child.cmdline()):
                found += [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
    return [p for p in found if p.pid != os.getpid()]


def write_record(path: Path, record: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def stop(procs: list[psutil.Process], grace: float = GRACE_S) -> int:
    """SIGTERM, then SIGKILL what is left after ``grace``; returns how many were signalled."""
    procs = [p for p in procs if p.pid != os.getpid()]
    signalled = []
    for p in procs:
        try:
            p.terminate()
            signalled.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(signalled, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2.0)
    return len(signalled)


def say(line: str) -> None:
    try:
        print(f"draftray: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the driver's terminal may be gone
        pass


def reap_stale(directory: Path | None = None) -> int:
    """Stops the leftovers of every recorded session whose driver is dead and removes its record; returns
    how many processes it signalled. Called by the next private start, before ray.init."""
    total = 0
    for path, record in records(directory or state_dir()):
        driver = record.get("driver") if isinstance(record, dict) else None
        if driver and matching(driver, strict=False):
            continue
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        if not driver:  # unreadable: whose it was cannot be told, so nothing is touched
            continue
        owners = [record["watchdog"]] if record.get("watchdog") else []  # first, so it cannot race us
        n = stop([p for e in owners + record.get("processes", []) if (p := matching(e))])
        if n:
            say(f"stopped {n} leftover processes of local Ray {record.get('session')} (its driver, pid {driver.get('pid')}, had died)")
        total += n
    return total


def records(directory: Path) -> list[tuple[Path, dict | None]]:
    """(path, record) of every session recorded there; None for one that does not parse. A state directory
    that cannot be read holds nothing: the start it serves must go on."""
    out = []
    with contextlib.suppress(OSError):
        for path in sorted(directory.glob("session_*.json")):
            try:
                out.append((path, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError):
                out.append((path, None))
    return out


def watch_session(session: str) -> None:
    """Driver side: records the session and starts its watchdog. A failure here warns and lets the run go on."""
    _WATCHDOGS[:] = [w for w in _WATCHDOGS if w.poll() is None]  # reaps the watchdogs of ended sessions
    try:
        directory = state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        me = psutil.Process()
        path = directory / f"{session}.json"
        procs = entries(session_processes(me, session))
        write_record(path, {"session": session, "driver": entry(me), "watchdog": None, "processes": procs})
        watchdog = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or hang-up of the driver's terminal must not stop it first
        )
        _WATCHDOGS.append(watchdog)
    except (OSError, psutil.Error) as err:
        say(f"no watchdog for local Ray {session} ({err}); if this driver is killed, the next start stops its leftovers")


class Watchdog:
    """One session's watchdog: refreshes the record every POLL_S until the driver dies or the session ends."""

    def __init__(self, path: Path):
        self.path = path
        self.record = json.loads(path.read_text(encoding="utf-8"))
        self.driver_pid = self.record["driver"]["pid"]
        self.record["watchdog"] = entry(psutil.Process())
        write_record(path, self.record)
        self.refresh()  # what started after the driver's snapshot (the raylet's agents, say) is known from now on

    def driver_gone(self) -> bool:
        return os.getppid() != self.driver_pid  # re-parented: exact, and immune to PID reuse

    def live(self) -> list[psutil.Process]:
        return [p for e in self.record["processes"] if (p := matching(e))]

    def refresh(self) -> bool:
        """Adds new processes of the session, drops ended ones; False once none is left."""
        try:
            found = session_processes(psutil.Process(self.driver_pid), self.record["session"])
        except psutil.Error:
            found = []
        procs = {p.pid: p for p in self.live()}
        for p in found:
            procs.setdefault(p.pid, p)
        recorded = entries(procs.values())
        if recorded != self.record["processes"]:
            self.record["processes"] = recorded
            write_record(self.path, self.record)
        return bool(procs)

    def wait_for_driver(self) -> bool:
        """Blocks until the driver is gone (True) or its session ended while it lives (False)."""
        stdin_open = True
        while not self.driver_gone():
            if stdin_open:
                ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
                stdin_open = not (ready and not os.read(sys.stdin.fileno(), 4096))
                if not stdin_open:  # an exiting process closes its files a moment before its children are re-parented
                    self.wait_reparented(timeout=1.0)
            else:  # the pipe closed but the driver lives: poll
                time.sleep(POLL_S)
            if not self.driver_gone() and not self.refresh():
                return False
        return True

    def wait_reparented(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.driver_gone() and time.monotonic() < deadline:
            time.sleep(0.02)

    def run(self) -> None:
        if self.wait_for_driver():
            deadline = time.monotonic() + SETTLE_S
            while self.live() and time.monotonic() < deadline:
                time.sleep(0.1)
            n = stop(self.live())
            if n:
                say(f"the driver (pid {self.driver_pid}) of local Ray {self.record['session']} died; stopped {n} of its processes")
        self.path.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's death ends it
    try:
        Watchdog(Path(argv[0])).run()
    except (OSError, ValueError, KeyError, psutil.Error) as err:
        say(f"local Ray watchdog: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
