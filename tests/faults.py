"""Rewards that misbehave on purpose, loaded by import path ('faults:CrashOnce') in tests.

Ray workers import this module by name: the tests put this directory on PYTHONPATH.
They count training calls only (calls with grad enabled), so evaluation does not shift them.
"""

import os
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


class CrashOnce(_Counting):
    """Kills its worker process (like an OOM kill) at training call ``at_call``, once per marker file."""

    def __init__(self, at_call: int, marker: str):
        super().__init__(at_call)
        self.marker = Path(marker)

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        if self.calls == self.at_call and not self.marker.exists():
            self.marker.touch()
            # Ray Train V2's controller learns of a reported checkpoint at its next poll of the workers
            # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a kill within that window loses the checkpoint and the run
            # restarts from the one before (seen here once, with steps 0.05 s apart). Wait past it.
            time.sleep(1.0)
            os._exit(1)
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
