"""One driver per run directory: an exclusive lock file that `draftray train` and `draftray sweep` hold for the
whole run (docs/reliability.md, "One run per run name").

Two drivers with the same run.name (or sweep.name) would otherwise write the same metrics.jsonl, config.yaml
and checkpoints. The lock is ``<run dir>/.draftray.lock``, created atomically (``O_CREAT | O_EXCL``) and holding
JSON ``{pid, host, started, run, ...}``; the holder also keeps an ``flock`` on it where the filesystem supports
that, and refreshes its mtime every HEARTBEAT_S seconds from a daemon thread. A lock whose holder is gone is
stale and taken over with one warning line:

    same machine     the flock is free and the pid is not running, or runs another process (its start time
                     differs from the one recorded: the pid was reused)
    another machine  its pid cannot be checked from here: the heartbeat is older than STALE_AFTER_S

Take-over is serialised by a guard file created with ``O_EXCL`` next to the lock (and by the flock of the
stale lock file while it is inspected), and the new lock replaces the stale one with ``os.replace`` only if
the file is still the one judged stale: of several processes finding the same stale lock, exactly one wins.

Ray-free (the driver and the sweep driver call it before Ray starts): stdlib only, plus psutil where there is
no /proc.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

from rayjobs.errors import UserError

LOCK_FILE = ".draftray.lock"  # a dot file: rank 0's copy to ray.storage_path skips it (rayjobs/cluster/storage.py)
GUARD_SUFFIX = ".takeover"  # <lock>.takeover: exists only while one process takes a stale lock over
HEARTBEAT_S = 10.0  # the holder touches its lock file this often
# Another machine's lock is stale after this long without a heartbeat: 12 missed beats, room for an NFS client's
# attribute cache (acregmax, 60 s by default) and for clocks a little apart (docs/reliability.md).
STALE_AFTER_S = 120.0
GUARD_STALE_S = 30.0  # a take-over guard this old was left by a process killed in the milliseconds it holds one
SETTLE_S = 2.0  # how long to wait for a lock that is being written or taken over before naming its holder


class RunInUse(UserError):
    """Another live process holds the run directory's lock (exit 2 with one line, like every UserError)."""


def lock_dirs(run_dir: Path, storage_path: str | None, name: str | None = None) -> list[Path]:
    """The directories to lock for a run: its local directory and, for a ray.storage_path on a filesystem
    (a shared mount), <storage_path>/<name> too. An object store (s3://, gs://) has no atomic create
    that pyarrow exposes: there only the local directory is locked (docs/reliability.md)."""
    dirs = [Path(run_dir).resolve()]
    if storage_path:
        local = storage_path[len("file://"):] if storage_path.startswith("file://") else storage_path
        if "://" not in local:
            shared = (Path(local).expanduser().resolve() / (name or Path(run_dir).name))
            if shared not in dirs:  # ray.storage_path = run.output_dir: one directory, one lock
                dirs.append(shared)
    return dirs


@contextlib.contextmanager
def hold_run(run_dir: Path, storage_path: str | None = None, field: str = "run.name", name: str | None = None):
    """``with hold_run(run_dir, cfg.ray.storage_path):`` the run directory (and its shared-storage twin) are
    this process's until the block ends, however it ends. Raises RunInUse naming the holder otherwise."""
    lock = RunLock(lock_dirs(run_dir, storage_path, name), field=field, name=name or Path(run_dir).name)
    with lock:
        yield lock


class RunLock:
    """Locks every directory of ``dirs`` (all or none); ``release()`` (or the end of a ``with``) frees them."""

    def __init__(self, dirs: list[Path], field: str = "run.name", name: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):  # fmt: skip
        self.dirs = [Path(d) for d in dirs]
        self.field, self.name = field, name or self.dirs[0].name
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.held: list[_Held] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            for d in self.dirs:
                try:
                    self.held.append(_acquire(d, self))
                except OSError as err:  # e.g. a read-only run directory inside a writable run.output_dir
                    raise UserError(f"{self.field} {self.name}: cannot take the lock {d / LOCK_FILE} ({err.strerror or err}); "
                                    "make that directory writable, or choose another run.output_dir") from None  # fmt: skip
        except BaseException:
            self.release()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="draftray-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        while self.held:
            self.held.pop().release()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for held in list(self.held):
                held.beat(self)


class _Held:
    """One directory's lock as held by this process: the open (and, where supported, flocked) lock file."""

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path, self.fd, self.created, self.lost = path, fd, created, False

    def ours(self) -> bool:
        """The lock file at the path is still the one this process created (not taken over by another)."""
        try:
            a, b = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def beat(self, lock: RunLock) -> None:
        if self.lost:
            return
        if not self.ours():
            self.lost = True
            holder = _describe(_read_record(self.path))
            print(f"draftray: warning: {lock.field} {lock.name}: the lock {self.path} was taken over by {holder} (no heartbeat "
                  f"from here for {lock.stale_after_s:.0f} s?); two runs now write the same files: stop one of them", file=sys.stderr)  # fmt: skip
            return
        with contextlib.suppress(OSError):  # a storage hiccup: the next beat tries again
            os.utime(self.path)

    def release(self) -> None:
        try:
            if self.ours():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # drops the flock
            _remove_created(self.created)


def _acquire(directory: Path, lock: RunLock) -> _Held:
    path = directory / LOCK_FILE
    settle_until = time.monotonic() + SETTLE_S
    created = _make_dirs(directory)
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            pass
        except FileNotFoundError:  # the directory was removed by a holder releasing it: again
            continue
        else:
            _flock_own(fd)
            _write_record(fd, lock)
            return _Held(path, fd, created)
        verdict = _inspect(path, lock.stale_after_s)
        if verdict is None:  # released (or replaced) meanwhile: try again
            continue
        if not verdict.stale:
            os.close(verdict.fd)  # and with it the flock this look took
            if verdict.settling and time.monotonic() < settle_until:
                time.sleep(0.05)
                continue
            _remove_created(created)
            raise RunInUse(f"{lock.field} {lock.name}: in use by {_describe(verdict.record)} (lock file {path}); wait for "
                           f"that run to end, or choose another {lock.field}")  # fmt: skip
        try:
            fd = _take_over(path, verdict, lock)
        finally:
            os.close(verdict.fd)
        if fd is None:  # another process is taking it over, or did: look again
            time.sleep(0.05)
            continue
        print(f"draftray: warning: {lock.field} {lock.name}: took over the stale lock {path} ({verdict.reason}; it was held by "
              f"{_describe(verdict.record)}, which ended without releasing it)", file=sys.stderr)  # fmt: skip
        return _Held(path, fd, created)


class _Verdict:
    def __init__(self, fd: int, ident: tuple, record: dict | None, stale: bool, reason: str = "", settling: bool = False):
        self.fd, self.ident, self.record, self.stale, self.reason, self.settling = fd, ident, record, stale, reason, settling


def _inspect(path: Path, stale_after_s: float) -> _Verdict | None:
    """Is the existing lock file's holder alive? None: the file went away while looking."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:  # another user's lock file: readable, not writable
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        flocked = _try_flock(fd)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            return None
        record = _parse(_read_fd(fd))
        stale, reason, settling = _judge(record, time.time() - st.st_mtime, flocked, stale_after_s)
        return _Verdict(fd, ident, record, stale, reason, settling)
    except BaseException:
        os.close(fd)
        raise


def _judge(record: dict | None, age: float, flocked: bool | None, stale_after_s: float) -> tuple[bool, str, bool]:
    """(stale, why, settling): settling = alive for now, but worth another look in a moment (the file is being
    written, or another process is taking a stale lock over)."""
    if flocked is False:  # some live process holds the flock on this very file
        return False, "", record is None or (_same_machine(record) and bool(_pid_gone(record)))
    if record is None:
        if age > stale_after_s:
            return True, f"an unreadable lock file, unchanged for {age:.0f} s", False
        return False, "", True
    if _same_machine(record):
        gone = _pid_gone(record)
        return bool(gone), gone, False
    if age > stale_after_s:
        return True, f"no heartbeat for {age:.0f} s, over the {stale_after_s:.0f} s allowed", False
    return False, "", False


def _pid_gone(record: dict) -> str:
    """Why the recorded process (on this machine) is gone, or "" while it runs."""
    pid = record["pid"]
    start = _process_start(pid)
    if start is None:
        return f"pid {pid} is not running"
    if start != "unknown" and record.get("pid_start") not in (None, "unknown", start):
        return f"pid {pid} now belongs to another process (its start time differs)"
    return ""


def _take_over(path: Path, verdict: _Verdict, lock: RunLock) -> int | None:
    """Replaces the stale lock file with this process's, under the guard; None if another process got there first."""
    guard = path.with_name(path.name + GUARD_SUFFIX)
    try:
        gfd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                guard.unlink()
        return None
    try:
        os.write(gfd, json.dumps(holder_record(lock.name, lock.field)).encode())
        os.close(gfd)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != verdict.ident:
            return None  # taken over (or refreshed) since it was judged: judge again
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}")  # a dot file too
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _flock_own(fd)
            _write_record(fd, lock)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd
    finally:
        guard.unlink(missing_ok=True)


def holder_record(name: str, field: str = "run.name") -> dict:
    """What this process writes into a lock file it takes: who holds it (pid, host, started) and what identifies
    the pid (its start time, this machine's boot and pid namespace)."""
    pid = os.getpid()
    return {
        "pid": pid, "host": socket.gethostname(), "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "run": name, "field": field, "pid_start": _process_start(pid), "machine": _machine(),
    }  # fmt: skip


def _write_record(fd: int, lock: RunLock) -> None:
    data = (json.dumps(holder_record(lock.name, lock.field)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _read_record(path: Path) -> dict | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _describe(record: dict | None) -> str:
    if not record:
        return "a process still writing its lock file"
    return f"pid {record.get('pid')} on host {record.get('host', '?')}, started {record.get('started', '?')}"


def _try_flock(fd: int) -> bool | None:
    """True: this fd now holds the exclusive flock; False: another open file holds it; None: not supported here."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: the pid and heartbeat checks alone
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        # ENOLCK/EOPNOTSUPP/ENOSYS: a filesystem without locks; EBADF: NFS's emulation needs a writable fd
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EINVAL):
            return None
        raise


def _flock_own(fd: int) -> None:
    """The flock on a lock file this process just created: another process's look at it may hold it briefly."""
    deadline = time.monotonic() + SETTLE_S
    while _try_flock(fd) is False and time.monotonic() < deadline:
        time.sleep(0.01)


def _machine() -> str | None:
    """This machine and pid namespace: pids compare only within one (a container on the same host has its own)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _same_machine(record: dict) -> bool:
    mine = _machine()
    if mine is not None and record.get("machine") is not None:
        return record["machine"] == mine
    return record.get("host") == socket.gethostname()


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc; psutil elsewhere); None if it is not
    running (a zombie, killed but not yet reaped, counts as not running)."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        return _psutil_start(pid)
    except OSError:
        return _psutil_start(pid)
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]  # state (field 3), starttime (field 22) of proc(5)


def _psutil_start(pid: int) -> str | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{proc.create_time():.2f}"
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return "unknown"


def _make_dirs(directory: Path) -> list[Path]:
    """Creates the directory (and missing parents); returns the ones created, deepest first."""
    missing = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_created(created: list[Path]) -> None:
    """Removes the directories a lock created if they are still empty: a refused or failed start leaves none."""
    for d in created:
        try:
            d.rmdir()
        except OSError:  # not empty (the run wrote into it), or gone
            return
