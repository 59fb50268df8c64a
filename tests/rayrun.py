"""Helpers of the Ray test modules: the short toy run, its trained steps, killing a process family by PID.

The module-scoped ``cluster`` fixture itself is in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from rayjobs.config import load_config
from rayjobs.runlog import read_metrics

TESTS_DIR = str(Path(__file__).parent)
REPO = Path(__file__).parents[1]
FAST = [
    "sampler.steps=3",
    "sampler.truncation_steps=2",
    "data.eval_prompts=[a red circle]",
    "data.eval_seeds=[0,1]",
    "train.batch_size=1",
    "train.eval_every=0",
]

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
