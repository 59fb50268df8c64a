"""Giving a sweep's cluster resources back when Tune ends a trial (docs/sweeps.md, "Stopped trials")."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray import tune

from rayjobs.runlog import PLACEMENT_GROUPS


class ReleaseTrainResources(tune.Callback):
    """Once Tune has ended a trial (finished, stopped by the scheduler, or failed for good) and its actor is
    gone, remove the placement groups its Train runs reserved (rayjobs/cluster/worker.py: record_placement_group).

    A finished run removed its own already. A stopped one's lives as long as the job that made it, not
    the Train controller (ray-project/ray#54305); Train's own cleaner frees it only when the state API
    answers, and not at all if the controller outlives the trial, and the next trials then wait for
    CPUs/GPUs that never come back. Tune calls on_trial_complete *before* it stops the trial's actor, so
    the release waits until that actor is dead (or RELEASE_AFTER_S has passed): removing the group under
    a live controller would make it restart its workers.
    """

    RELEASE_AFTER_S = 30.0  # at the latest, after Tune ended the trial
    POLL_S = 1.0
    REAP_EVERY_S = 10.0  # how often the sweep looks for orphaned groups (reap_orphans: two state-API calls)

    def __init__(self, trials_dir: Path):
        self.trials_dir = Path(trials_dir)
        self.pending: dict[Path, tuple[float, object]] = {}  # run dir -> (when ended, the trial's actor handle)
        self.polled = self.reaped = 0.0
        self.empty_since: dict[str, float] = {}  # reap_orphans' bookkeeping
        self.before: frozenset[str] = frozenset()  # the job's placement groups from before the sweep: never reaped

    def setup(self, **info):
        self.before = frozenset(ray.util.placement_group_table())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.pending[self.trials_dir / str(trial)] = (time.monotonic(), trial.temporary_state.ray_actor)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self.reaped > self.REAP_EVERY_S:
            self.reaped = time.monotonic()
            reap_orphans(self.empty_since, exclude=self.before)
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
        # Every trial has ended: a group made during the sweep that still reserves CPUs/GPUs with no actor in it
        # is an orphan now, starved or not (the load bench left one behind once, reserved until the job ends).
        reap_orphans(self.empty_since, orphan_s=0.0, starved_only=False, exclude=self.before)


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


ORPHAN_S = 60.0  # a worker group's placement group without a live actor for this long is an orphan


def reap_orphans(empty_since: dict[str, float], orphan_s: float = ORPHAN_S, now: float | None = None, starved_only: bool = True,
                 exclude: frozenset[str] = frozenset()) -> int:
    """Removes this job's placement groups that reserve CPUs or GPUs, have had no live actor in them for
    ``orphan_s`` seconds, while another of this job's groups waits for resources (``starved_only``); never those
    in ``exclude`` (ids); returns how many.

    The recorded groups (release_placement_groups) miss one case, seen once in 50 tiny trials (bench/sweep_load.py):
    a Train controller whose trial Tune stops can start a new worker group (a new placement group) in the
    moment before it is killed itself, and no worker of that group lives to record it. Nothing frees it, and
    the sweep deadlocks with every CPU reserved and no actor running. A live run's group holds its worker
    actors from seconds after it is created; only while something is starved is an empty one taken back.
    ``empty_since`` (placement group id -> first seen empty) is kept by the caller across calls."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors, list_placement_groups

    now = time.monotonic() if now is None else now
    job = ray.get_runtime_context().get_job_id()
    try:
        groups = [g for g in list_placement_groups(detail=True, limit=10000, timeout=10) if g.creator_job_id == job]
        occupied = {a.placement_group_id for a in list_actors(filters=[("state", "!=", "DEAD")], detail=True, limit=10000, timeout=10)}
    except Exception:  # the state API did not answer: look again next time  # noqa: BLE001
        return 0
    starved = any(g.state in ("PENDING", "RESCHEDULING") for g in groups)
    empty = {g.placement_group_id for g in groups if g.state == "CREATED" and g.placement_group_id not in occupied | exclude
             and any(b["unit_resources"].get(r, 0) > 0 for b in g.bundles for r in ("CPU", "GPU"))}  # fmt: skip
    for gone in set(empty_since) - empty:
        del empty_since[gone]
    removed = 0
    for pg_id in empty:
        first = empty_since.setdefault(pg_id, now)
        if (starved or not starved_only) and now - first >= orphan_s:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            del empty_since[pg_id]
            removed += 1
    return removed
