"""Helpers of the Ray test modules: the short toy run, its trained steps, killing a process family by PID.

The module-scoped ``cluster`` fixture itself is in conftest.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from shortrun import FAST, SHORT  # noqa: F401  (re-exported: the Ray modules import them from here)

from rayjobs.config import load_config
from rayjobs.data.batches import Batches
from rayjobs.runlog import read_metrics
from rayjobs.training import loop

TESTS_DIR = str(Path(__file__).parent)
REPO = Path(__file__).parents[1]

# The toy default, shortened: 10 steps at a higher lr so DRaFT visibly hacks the reward within them.
SWEEP_FAST = ["train.steps=10", "train.eval_every=5", "optim.lr=3e-3", "data.eval_seeds=[0,1,2,3]"]
SWEEP_YAML = REPO / "configs" / "toy-kl-sweep.yaml"


def sweep_cfg(tmp_path, name, *extra):
    return load_config(SWEEP_YAML, [f"run.output_dir={tmp_path}", f"sweep.name={name}", *SWEEP_FAST, *extra])


def fit_fast(tmp_path, name, *extra):
    from rayjobs.cluster.driver import fit

    return fit(load_config(None, FAST + [f"run.output_dir={tmp_path}", f"run.name={name}", *extra]))


def train_steps(run_dir) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def registered_checkpoint(run_dir: Path) -> bool:
    """Ray Train's controller has registered a checkpoint of this run (its snapshot names it): a kill after this
    resumes from it; a kill between the files' upload and the registration would lose it."""
    snapshot = Path(run_dir) / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):
        return False


def kill_with_children(proc) -> None:
    """SIGKILL a process started by the test and then its children (its own local Ray cluster), by PID only."""
    import signal

    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def checkpoint_state(ckpt: Path) -> tuple[dict, dict]:
    """The trainable weights and the optimizer state (AdamW moments, step counts) of one checkpoint directory."""
    return load_file(ckpt / "trainable.safetensors"), torch.load(ckpt / "optimizer.pt", weights_only=True)


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Tensors torch.equal (same dtype), dicts with the same keys, sequences of the same length, all the way down:
    a missing or extra entry fails instead of being skipped by zip."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |a - b| = {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))[:5]} differ"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} and {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class _RanksAsMicroBatches(Batches):
    """One process standing in for ``ray.num_workers`` ranks: its micro-batch r of a step is rank r's micro-batch 0
    (each rank draws its prompts and noise from (seed, rank, step, micro); rayjobs/data/batches.py)."""

    def __call__(self, step: int, micro: int) -> dict:
        return self._rank(micro)(step, 0)

    @functools.cache
    def _rank(self, rank: int) -> Batches:
        return Batches(self.cfg, self.policy, rank)


def one_process(tmp_path: Path, name: str, *extra: str, ranks: int = 1) -> Path:
    """The run of ``fit_fast(tmp_path, name, *extra)`` in this process, without Ray (LocalContext): the reference
    a Ray run is compared with. ``ranks`` > 1: the ranks' batches become micro-batches of one process, so each
    optimizer step sees the same samples as a DDP step of that many workers (their batches concatenated)."""
    accum = [f"train.grad_accum={ranks}"] if ranks > 1 else []  # one micro-batch per rank (workers with grad_accum 1)
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", f"run.name={name}", *extra, *accum])
    run = tmp_path / name
    batches, loop.Batches = loop.Batches, (_RanksAsMicroBatches if ranks > 1 else Batches)
    try:
        loop.train_loop(cfg, run, loop.LocalContext(run))
    finally:
        loop.Batches = batches
    return run
