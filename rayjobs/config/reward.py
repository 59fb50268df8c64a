"""The `reward:` and `diversity:` sections: what the objective maximises and how diversity is measured."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from rayjobs.config.base import Strict

DEFAULT_REWARD = "toy_appeal"  # the shipped toy reward (docs/toy-world.md)


class _Normalized(Strict):
    """An affine normalisation of a reward, a * r + b: give scale/shift (a, b) or mean/std ((r - mean) / std)."""

    scale: float | None = Field(None, description="a in a * r + b (default 1)")
    shift: float | None = Field(None, description="b in a * r + b (default 0)")
    mean: float | None = Field(None, description="with std: normalise as (r - mean) / std, e.g. the base model's eval mean")
    std: float | None = Field(None, gt=0, description="with mean: the reward's spread (its units)")

    @model_validator(mode="after")
    def _valid_affine(self):
        from rewards.combine import affine

        affine(self.scale, self.shift, self.mean, self.std)  # ValueError -> one line naming the field
        return self

    def term(self, name: str, kwargs: dict, weight: float = 1.0):
        from rewards.combine import TermSpec, affine

        a, b = affine(self.scale, self.shift, self.mean, self.std)
        return TermSpec(name, dict(kwargs), weight, a, b)


class RewardTerm(_Normalized):
    name: str = Field(description="registered reward name (see rewards.REWARDS)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings (e.g. weight locations)")
    weight: float = Field(1.0, description="weight of this normalised reward in the sum")


class RewardConfig(_Normalized):
    """One reward (name, kwargs, optional normalisation), or a weighted sum of normalised rewards (terms).

    The objective maximises R = sum_i weight_i * (a_i * r_i + b_i); kl_coeff is relative to R's scale,
    so normalise rewards that live far from 1 (PickScore ~21, HPSv2 ~0.27; docs/references.md). Each
    component's raw score is logged as reward/<name> (training) and eval/reward_<name>.
    """

    name: str | None = Field(
        None,
        description="registered reward name (see rewards.REWARDS); toy_appeal when neither name nor terms is given. "
        "With terms it must be null: a preset extending a single-reward base writes name: null and kwargs: null",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings, passed to its builder")
    terms: list[RewardTerm] = Field(default_factory=list, description="a weighted sum of rewards instead of name/kwargs")

    @model_validator(mode="before")
    @classmethod
    def _default_reward(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k == "kwargs" and v is None)}
            if not data.get("terms") and "name" not in data:
                data["name"] = DEFAULT_REWARD
        return data

    @model_validator(mode="after")
    def _one_form(self):
        if not self.terms:
            if self.name is None:
                raise ValueError("give a reward name, or terms (a weighted sum)")
            return self
        single = [k for k in ("name", "kwargs", "scale", "shift", "mean", "std") if getattr(self, k)]
        if single:
            raise ValueError(f"give either one reward (name/kwargs) or terms (a weighted sum), not both (set {single} to null)")
        return self

    def specs(self) -> list:
        """The rewards.combine.TermSpec list this config describes (one item for a single reward)."""
        if self.terms:
            return [t.term(t.name, t.kwargs, t.weight) for t in self.terms]
        assert self.name is not None  # _one_form
        return [self.term(self.name, self.kwargs)]


class DiversityConfig(Strict):
    name: str = Field("toy_lpips", description="registered diversity metric (see rewards.DIVERSITY_METRICS)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the metric's own settings")
    fallback: str | None = Field(
        "pairwise_rms",
        description="metric used instead when this one's default weights are absent (e.g. lpips without AlexNet "
        "weights); the switch is printed and recorded in the run's config.yaml. A location set in kwargs that is "
        "missing is always an error. None = stop with the missing-weights error",
    )
