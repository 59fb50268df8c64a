"""Rewards that misbehave on purpose, loaded by import path ('faults:CrashOnce') in tests.

Ray workers import this module by name: the tests put this directory on PYTHONPATH.
They count training calls only (calls with grad enabled), so evaluation does not shift them.
"""

import json
import os
import signal
import time
from pathlib import Path

import torch

from rewards.simple import Colorfulness


class _Counting(Colorfulness):
    def __init__(self, at_call: int):
        super().__init__()
        self.at_call, self.calls = at_call, 0

    def forward(self, images, prompts):
        if torch.is_grad_enabled():
            self.calls += 1
        return super().forward(images, prompts)


def _die() -> None:
    """SIGKILL this process, as the kernel's OOM killer or a lost spot node would: no cleanup, no atexit."""
    # Ray Train V2's controller learns of a reported checkpoint at its next poll of the workers
    # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a kill within that window loses the checkpoint and the run
    # restarts from the one before (seen here once, with steps 0.05 s apart). Wait past it.
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


class CrashOnce(_Counting):
    """Kills its worker process (SIGKILL, like an OOM kill) at training call ``at_call``, once per marker file."""

    def __init__(self, at_call: int, marker: str):
        super().__init__(at_call)
        self.marker = Path(marker)

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        if self.calls == self.at_call and not self.marker.exists():
            self.marker.touch()
            _die()
        return out


class KillAt(Colorfulness):
    """SIGKILLs its worker at each training call number in ``at_calls`` once, counting this process's calls:
    the first process dies at its call ``at_calls[0]``, the one Ray restarts at its call ``at_calls[1]`` (counted
    from its resume), and so on. One marker file per kill in ``directory``, holding the pid."""

    def __init__(self, at_calls: list[int], directory: str):
        super().__init__()
        self.at_calls, self.dir, self.calls = list(at_calls), Path(directory), 0

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        if torch.is_grad_enabled():
            self.calls += 1
            done = len(list(self.dir.glob("kill_*"))) if self.dir.exists() else 0
            if done < len(self.at_calls) and self.calls == self.at_calls[done]:
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / f"kill_{done}").write_text(str(os.getpid()))
                _die()
        return out


class TearAndKill(KillAt):
    """KillAt, and before kill i with ``tears[i]`` true it tears the newest checkpoint Ray registered (the latest of
    the run's checkpoint_manager_snapshot.json in ``checkpoints``): its trainable.safetensors cut in half, as a
    storage crash would leave it. The restarted worker then finds its registered checkpoint torn."""

    def __init__(self, at_calls: list[int], tears: list[bool], directory: str, checkpoints: str):
        super().__init__(at_calls, directory)
        self.tears, self.checkpoints = list(tears), Path(checkpoints)

    def forward(self, images, prompts):
        done = len(list(self.dir.glob("kill_*"))) if self.dir.exists() else 0
        if torch.is_grad_enabled() and done < len(self.at_calls) and self.calls + 1 == self.at_calls[done] and self.tears[done]:
            time.sleep(1.0)  # the controller registers the last reported checkpoint at its next poll (see _die)
            snapshot = json.loads((self.checkpoints / "checkpoint_manager_snapshot.json").read_text())
            weights = self.checkpoints / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] / "trainable.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"torn_{done}").write_text(weights.parent.name)
        return super().forward(images, prompts)


class NodeHold(Colorfulness):
    """Logs the Ray node of every training call to ``log`` (one line each); at training call ``at_call`` of the
    first process it writes its node id to ``marker`` and waits (up to ``timeout`` s) for the test to remove
    that node."""

    def __init__(self, at_call: int, marker: str, log: str, timeout: float = 120.0):
        super().__init__()
        self.at_call, self.marker, self.log, self.timeout, self.calls = at_call, Path(marker), Path(log), timeout, 0

    def forward(self, images, prompts):
        import ray

        out = super().forward(images, prompts)
        if torch.is_grad_enabled():
            self.calls += 1
            node = ray.get_runtime_context().get_node_id()
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "node": node}) + "\n")
            if self.calls == self.at_call and not self.marker.exists():
                time.sleep(1.0)  # let the controller register the last checkpoint (see _die)
                self.marker.write_text(node)
                time.sleep(self.timeout)
        return out


class NaNFrom(_Counting):
    """Returns NaN rewards from training call ``at_call`` on."""

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        return out * float("nan") if self.calls >= self.at_call else out


class NaNAt(_Counting):
    """NaN rewards at training call ``at_call`` only (a transient fault)."""

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        return out * float("nan") if self.calls == self.at_call else out


class RaiseAt(_Counting):
    """Raises ValueError (a deterministic error: docs/reliability.md, "Errors inside a worker") at training call
    ``at_call``, every time. Each training call appends "pid time" to ``log``: a retry would show a second pid."""

    def __init__(self, at_call: int, log: str, message: str = "RaiseAt: this reward rejects its input"):
        super().__init__(at_call)
        self.log, self.message = Path(log), message

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        if torch.is_grad_enabled():
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {time.time()}\n")
            if self.calls == self.at_call:
                raise ValueError(self.message)
        return out


class Rendezvous(Colorfulness):
    """Waits at its first training call until ``parties`` workers have arrived (one file each in
    ``directory``): it passes only if that many trials train at the same time, else it fails after
    ``timeout`` seconds."""

    def __init__(self, directory: str, parties: int, timeout: float = 180.0):
        super().__init__()
        self.dir, self.parties, self.timeout, self.arrived = Path(directory), parties, timeout, False

    def forward(self, images, prompts):
        if torch.is_grad_enabled() and not self.arrived:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / str(os.getpid())).touch()
            end = time.monotonic() + self.timeout
            while (arrived := len(list(self.dir.iterdir()))) < self.parties:
                if time.monotonic() > end:
                    raise RuntimeError(f"rendezvous: {arrived} of {self.parties} trials arrived within {self.timeout} s")
                time.sleep(0.1)
            self.arrived = True
        return super().forward(images, prompts)


class Slow(Colorfulness):
    """Colourfulness that takes ``seconds`` longer per training call: a run long enough to be killed midway."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, images, prompts):
        if torch.is_grad_enabled():
            time.sleep(self.seconds)
        return super().forward(images, prompts)


def fill(directory) -> Path:
    """Writes a ballast file into ``directory`` until its filesystem is full (the kernel's ENOSPC); returns it."""
    ballast = Path(directory) / "ballast"
    with open(ballast, "wb", buffering=0) as out:
        try:
            while True:
                out.write(bytes(1 << 16))
        except OSError:
            pass
    return ballast


class FillDisk(Colorfulness):
    """At training call ``at_call`` (once: while no ballast is there) fills the filesystem of ``directory``; with
    ``free_after`` it deletes the ballast again that many seconds later (a transient outage)."""

    def __init__(self, at_call: int, directory: str, free_after: float | None = None):
        super().__init__()
        self.at_call, self.dir, self.free_after, self.calls = at_call, Path(directory), free_after, 0

    def forward(self, images, prompts):
        import threading

        out = super().forward(images, prompts)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at_call and not (self.dir / "ballast").exists() and not (self.dir / "freed").exists():
                ballast = fill(self.dir)
                if self.free_after is not None:
                    def free():
                        ballast.unlink()
                        (self.dir / "freed").touch()
                    threading.Timer(self.free_after, free).start()
        return out
