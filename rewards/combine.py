"""Weighted sums of normalised rewards, so one kl_coeff means the same whatever the rewards' scales.

    R(x, c) = sum_i weight_i * (scale_i * r_i(x, c) + shift_i)

A normalisation is given either as (scale, shift) or as (mean, std), meaning (r - mean) / std:
PickScore lives near 21 with spread ~1, HPSv2 near 0.27 with spread ~0.02; after (mean, std)
normalisation both move by ~1 per "one noticeably better image", and kl_coeff is relative to that.

``RewardSum.parts`` also returns every component's raw score, so training logs each separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from rewards.registry import build_reward


def affine(scale: float | None = None, shift: float | None = None, mean: float | None = None, std: float | None = None) -> tuple[float, float]:
    """(a, b) of the normalisation r -> a * r + b, from (scale, shift) or from (mean, std)."""
    if mean is not None or std is not None:
        if scale is not None or shift is not None:
            raise ValueError("normalise with either scale/shift or mean/std, not both")
        if mean is None or std is None:
            raise ValueError("mean/std normalisation needs both mean and std")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        return 1.0 / std, -mean / std
    return (1.0 if scale is None else scale), (0.0 if shift is None else shift)


@dataclass
class TermSpec:
    """One reward of a sum: registry name, its settings, weight and affine normalisation (a * r + b)."""

    name: str
    kwargs: dict[str, Any]
    weight: float = 1.0
    scale: float = 1.0
    shift: float = 0.0

    @property
    def trivial(self) -> bool:
        return self.weight == 1.0 and self.scale == 1.0 and self.shift == 0.0


class RewardSum(nn.Module):
    """A Reward: sum_i weight_i * (scale_i * r_i + shift_i) -> [B]; ``parts`` adds the raw r_i."""

    def __init__(self, specs: list[TermSpec], rewards: list[Callable]):
        super().__init__()
        if not specs or len(specs) != len(rewards):
            raise ValueError("a reward sum needs one reward per term, and at least one term")
        self.specs = specs
        self.labels = _labels([s.name for s in specs])
        # Module rewards are children (so .to() moves them); plain callables are kept aside.
        self.modules_ = nn.ModuleList([r for r in rewards if isinstance(r, nn.Module)])
        self.rewards = rewards

    def parts(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B], {label: raw score [B]}) with one forward per component."""
        total, raw = 0.0, {}
        for label, spec, reward in zip(self.labels, self.specs, self.rewards):
            r = reward(images, prompts).float()  # [B]
            raw[label] = r
            total = total + spec.weight * (spec.scale * r + spec.shift)
        return total, raw

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.parts(images, prompts)[0]

    def describe(self) -> str:
        items = []
        for label, spec, reward in zip(self.labels, self.specs, self.rewards):
            desc = reward.describe() if hasattr(reward, "describe") else label
            items.append(f"{spec.weight:g} * ({spec.scale:g} * {desc} + {spec.shift:g})")
        return " + ".join(items)


def _labels(names: list[str]) -> list[str]:
    """Component labels for the logs: the reward names, numbered where one appears twice (hpsv2, hpsv2#2)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def component_labels(specs: list[TermSpec]) -> list[str]:
    """The components a config's reward logs (eval/reward_<label>): none for one bare reward."""
    return [] if len(specs) == 1 and specs[0].trivial else _labels([s.name for s in specs])


def build_reward_sum(specs: list[TermSpec]):
    """The reward of a config: the bare reward for one un-normalised term, else a RewardSum."""
    rewards = [build_reward(s.name, **s.kwargs) for s in specs]
    if not component_labels(specs):
        return rewards[0]
    return RewardSum(specs, rewards)
