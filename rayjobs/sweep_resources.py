"""Giving a sweep's cluster resources back when Tune ends a trial (docs/sweeps.md, "Stopped trials")."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray import tune

from rayjobs.runlog import PLACEMENT_GROUPS


class ReleaseTrainResources(tune.Callback):
    """Once Tune has ended a trial (finished, stopped by the scheduler, or failed for good) and its actor is
    gone, remove the placement groups its Train runs reserved (rayjobs/train.py: record_placement_group).

    A finished run removed its own already. A stopped one's lives as long as the job that made it, not
    the Train controller (ray-project/ray#54305); Train's own cleaner frees it only when the state API
    answers, and not at all if the controller outlives the trial, and the next trials then wait for
    CPUs/GPUs that never come back. Tune calls on_trial_complete *before* it stops the trial's actor, so
    the release waits until that actor is dead (or RELEASE_AFTER_S has passed): removing the group under
    a live controller would make it restart its workers.
    """

    RELEASE_AFTER_S = 30.0  # at the latest, after Tune ended the trial
    POLL_S = 1.0

    def __init__(self, trials_dir: Path):
        self.trials_dir = Path(trials_dir)
        self.pending: dict[Path, tuple[float, object]] = {}  # run dir -> (when ended, the trial's actor handle)
        self.polled = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.pending[self.trials_dir / str(trial)] = (time.monotonic(), trial.temporary_state.ray_actor)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)

    def on_step_begin(self, iteration, trials, **info):
        if not self.pending or time.monotonic() - self.polled < self.POLL_S:
            return
        self.polled = time.monotonic()
        for run_dir, (ended, actor) in list(self.pending.items()):
            if time.monotonic() - ended > self.RELEASE_AFTER_S or not _alive(actor):
                release_placement_groups(run_dir)
                del self.pending[run_dir]

    def on_experiment_end(self, trials, **info):
        for run_dir in list(self.pending):
            release_placement_groups(run_dir)
        self.pending.clear()


def _alive(actor) -> bool:
    if actor is None:
        return False
    from ray.util.state import get_actor

    try:
        state = get_actor(actor._actor_id.hex(), timeout=5)
    except Exception:  # the state API did not answer: judge again at the next poll
        return True
    return state is not None and state.state != "DEAD"


def release_placement_groups(run_dir: Path) -> int:
    """Remove the run's recorded placement groups that still hold resources; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = run_dir / PLACEMENT_GROUPS
    ids = path.read_text(encoding="utf-8").split() if path.is_file() else []
    removed = 0
    for hex_id in ids:
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))
        if ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            removed += 1
    return removed
