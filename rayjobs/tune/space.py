"""The search space of a sweep, trial by trial: what Tune draws, known before Tune draws it.

trials.csv lists every trial of the space, those that never started included (a sweep interrupted
between trials), so the trials must be known without Tune's own state: ``planned_trials`` replays
the draws of Tune's BasicVariantGenerator (the same generator, seeded by sweep.seed, in the same
order), and a trial's run directory is matched to its place by the index Tune ends its name with
(``_trial_7783a_00002`` is the third trial).
"""

from __future__ import annotations

import re

import numpy as np
from ray import tune
from ray.tune.search.variant_generator import generate_variants

from rayjobs.config.sweep import ParamSpec, SweepConfig

_INDEX = re.compile(r"_(\d{5,})$")  # BasicVariantGenerator names trial i "<trainable>_<uuid prefix>_%05d"


def tune_space(params: dict[str, ParamSpec]) -> dict:
    """SweepConfig.params -> Tune param_space, keyed by the dotted config key."""
    space = {}
    for key, spec in params.items():
        if spec.grid is not None:
            space[key] = tune.grid_search(list(spec.grid))
        elif spec.choice is not None:
            space[key] = tune.choice(list(spec.choice))
        elif spec.uniform is not None:
            space[key] = tune.uniform(*spec.uniform)
        else:
            space[key] = tune.loguniform(*spec.loguniform)
    return space


def planned_trials(sweep: SweepConfig) -> list[dict | None]:
    """Every trial of the space in Tune's order, as {dotted key: value}; None for each of search optuna's
    trials, whose values Optuna draws only when the trial starts (from the results before it).

    BasicVariantGenerator(random_state=seed) draws from numpy's default_rng(seed), one generate_variants
    pass per sample (each grid point draws the random keys again), so the same calls give the same values.
    """
    if sweep.search == "optuna":
        return [None] * sweep.num_samples
    rng = np.random.default_rng(sweep.seed)
    spec = {"config": tune_space(sweep.params)}
    return [dict(resolved["config"]) for _ in range(sweep.num_samples) for _, resolved in generate_variants(spec, random_state=rng)]


def trial_index(name: str) -> int | None:
    """The place in ``planned_trials`` of the trial of this run directory name (None: not a basic-search name)."""
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None
