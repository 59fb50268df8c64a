"""Differentiable rewards and diversity metrics behind one contract and a registry.

Reward: ``reward(images, prompts) -> Tensor[B]``, images float [B, 3, H, W] in [0, 1].
Differentiable by default (no ``no_grad`` inside), frozen weights, no device named:
the caller picks the device and the grad mode. Never imports ray or models.
"""

import _draftray_compat  # noqa: F401  (must run before torchvision/transformers import)
from rewards import diversity, preference, simple, toy  # noqa: E402,F401  (registers the built-ins)
from rewards.combine import RewardSum, TermSpec, affine, build_reward_sum, component_labels  # noqa: E402
from rewards.registry import (  # noqa: E402
    DIVERSITY_METRICS,
    REWARDS,
    UnknownNameError,
    build_diversity,
    build_reward,
    check,
    check_batch,
    register_diversity,
    register_reward,
    sources_of,
)
from rewards.sources import MissingWeightsError, Source  # noqa: E402

__all__ = [
    "REWARDS",
    "DIVERSITY_METRICS",
    "UnknownNameError",
    "build_reward",
    "build_diversity",
    "register_reward",
    "register_diversity",
    "check",
    "check_batch",
    "sources_of",
    "RewardSum",
    "TermSpec",
    "affine",
    "build_reward_sum",
    "component_labels",
    "MissingWeightsError",
    "Source",
]
