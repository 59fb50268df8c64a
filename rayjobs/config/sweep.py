"""The `sweep:` section of the config (rayjobs/tune/sweep.py reads it); every field says its meaning."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rayjobs.config.base import DirName, Seed, Strict


class ParamSpec(Strict):
    """How a sweep draws one config key: exactly one of the four fields."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, each in its own trial (Tune grid_search)")
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn uniformly per sample")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly per sample")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] with 0 < low, drawn log-uniformly per sample")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not (bounds[0] < bounds[1] and (self.uniform or bounds[0] > 0)):
            raise ValueError(f"bounds must be low < high (and low > 0 for loguniform), got {list(bounds)}")
        return self


class InferenceKnobs(Strict):
    """Points evaluated on every checkpoint of each trial without more training (models/inference.py);
    they join the front marked by kind. Each costs one evaluation (eval prompts x seeds) per trial."""

    lora_scales: list[float] = Field([], description="LoRA scales s, 0 <= s < 1 (s = 0 is the base model; 1 is the trained point itself)")
    aig: list[str] = Field([], description="annealed importance guidance schedules: linear, power_<p>, step_<f>, e.g. [linear, power_2, step_0.5]")

    @model_validator(mode="after")
    def _valid(self):
        from models.inference import parse_aig

        bad = [s for s in self.lora_scales if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"lora_scales must be in [0, 1), got {bad}")
        for label in self.aig:
            parse_aig(label)
        return self


class ASHAConfig(Strict):
    """Asynchronous successive halving (Tune's ASHAScheduler) on one eval metric: at each rung a trial
    below the top 1/reduction_factor of the trials that reached the rung is stopped. Rungs are at
    grace_period * reduction_factor**k optimizer steps; a trial is only judged at its evaluations, so
    rungs should fall on multiples of train.eval_every."""

    metric: str | None = Field(None, description="the eval metric judged (maximised); None = sweep.reward_metric")
    grace_period: int = Field(..., ge=1, description="optimizer steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the top 1/reduction_factor at each rung")


class SweepConfig(Strict):
    """`draftray sweep`: Ray Tune trials, each a full training run with the swept keys changed.

    trials = (product of grid sizes) * num_samples. Every trial evaluates on the same
    data.eval_prompts x data.eval_seeds every train.eval_every steps; each evaluation is a
    candidate point (reward, diversity) of the Pareto front.
    """

    name: DirName | None = Field(
        None, description="sweep directory name under run.output_dir (letters, digits, ._-; not dots alone); None = sweep-<timestamp>"
    )
    params: dict[str, ParamSpec] = Field(..., min_length=1, description="dotted config key (e.g. objective.kl_coeff) -> how to draw it")
    num_samples: int = Field(1, ge=1, description="Tune samples: repeats of the grid; draws of choice/uniform/loguniform keys")
    seed: Seed = Field(0, description="seed of the random draws, 0 <= seed < 2**32 (numpy's RandomState range)")
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once; None = cluster CPUs (GPUs with ray.use_gpu) // what one trial's workers take"
    )
    search: Literal["basic", "optuna"] = Field(
        "basic",
        description="basic: Tune's grid/random generator (every grid value x num_samples draws); optuna: Optuna's "
        "multi-objective sampler (NSGA-II) maximising reward_metric and diversity_metric together, num_samples trials, "
        "no grid keys (use choice)",
    )
    scheduler: ASHAConfig | None = Field(None, description="early stopping of weak trials (None = every trial runs to train.steps)")
    max_failures: int = Field(
        1, ge=0, description="times a failed trial is restarted (from its last checkpoint) before it is recorded as failed in trials.csv"
    )
    checkpoint_evals: bool = Field(
        True,
        description="checkpoint at every evaluation and keep them all, so every point of the front has its weights (and its "
        "inference-time points); False = train.checkpoint_every and only the last 3 (saves disk with full fine-tuning)",
    )
    reward_metric: str = Field("eval/reward_mean", description="the front's reward axis (maximised)")
    diversity_metric: str | None = Field(None, description="the front's diversity axis (maximised); None = eval/diversity_<diversity.name>")
    inference: InferenceKnobs = InferenceKnobs()

    @model_validator(mode="after")
    def _search_fits(self):
        if self.search == "optuna":
            grid = [k for k, spec in self.params.items() if spec.grid is not None]
            if grid:
                raise ValueError(f"search optuna draws every key; use choice instead of grid for {', '.join(grid)}")
        return self
