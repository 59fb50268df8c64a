"""Name -> builder registries for rewards and diversity metrics."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch


class Reward(Protocol):
    """reward(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]; higher is better."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


class DiversityMetric(Protocol):
    """metric(images_per_prompt: list of [N,3,H,W] in [0,1]) -> float; higher = more diverse. Eval only."""

    def __call__(self, images_per_prompt: list[torch.Tensor]) -> float: ...


def check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    """The Reward contract's input check: images [B, 3, H, W] and one prompt per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it one clean line
        return str(self.args[0])


REWARDS: dict[str, Callable[..., Reward]] = {}
DIVERSITY_METRICS: dict[str, Callable[..., DiversityMetric]] = {}


# Set on every registered builder (and so inherited by subclasses of a registered class): the mark a
# 'module:Attr' plug-in must carry before it is called or instantiated (docs/security.md, "Plug-ins").
KIND_MARK = "__draftray_kind__"


def register_reward(name: str):
    """Registers a reward builder (a class or a function returning a Reward) under ``name``."""

    def deco(builder):
        REWARDS[name] = builder
        setattr(builder, KIND_MARK, "reward")
        return builder

    return deco


def register_diversity(name: str):
    """Registers a diversity-metric builder under ``name``."""

    def deco(builder):
        DIVERSITY_METRICS[name] = builder
        setattr(builder, KIND_MARK, "diversity metric")
        return builder

    return deco


def _lookup(table: dict, kind: str, name: str):
    """A registered name, or 'package.module:Attr' naming a builder to import (user-defined rewards)."""
    if name in table:
        return table[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr)  # importing runs the module: a config naming one is code
        except (ImportError, AttributeError) as err:
            raise UnknownNameError(f"{kind} {name!r}: cannot import ({err})") from None
        # Only what declares itself a builder of this kind is ever called: any other callable (os:system,
        # subprocess:run, builtins:eval) would run with the config's kwargs as its arguments.
        if getattr(builder, KIND_MARK, None) != kind:
            register = "register_reward" if kind == "reward" else "register_diversity"
            raise UnknownNameError(
                f"{kind} {name!r} is not a registered {kind}: decorate it with @rewards.{register}(name) "
                f"or subclass a registered one (docs/rewards.md)"
            )
        return builder
    raise UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))} (or 'module:Attr')")


def _build(table: dict, kind: str, name: str, kwargs: dict[str, Any]):
    builder = _lookup(table, kind, name)
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise ValueError(f"{kind} {name!r}: bad arguments {kwargs}: {err}") from err


def build_reward(name: str, **kwargs) -> Reward:
    """A frozen reward module by registry name; kwargs are the reward's own settings."""
    reward = _build(REWARDS, "reward", name, kwargs)
    if isinstance(reward, torch.nn.Module):
        reward.requires_grad_(False).eval()
    return reward


def build_diversity(name: str, **kwargs) -> DiversityMetric:
    return _build(DIVERSITY_METRICS, "diversity metric", name, kwargs)


def sources_of(name: str, kwargs: dict[str, Any], kind: str = "reward") -> list:
    """The weight locations (rewards.sources.Source) a reward or metric needs with these settings;
    [] for builders that list none (weight-free or shipped weights)."""
    table = REWARDS if kind == "reward" else DIVERSITY_METRICS
    builder = _lookup(table, kind, name)
    list_sources = getattr(builder, "sources", None)
    return list(list_sources(**kwargs)) if list_sources else []


def check(name: str, kwargs: dict[str, Any], kind: str = "reward", where: str = "reward.kwargs") -> None:
    """Start-up check without loading big weights: a builder that lists its weight locations has them
    resolved and probed (MissingWeightsError names ``where``.<setting>); any other builder is built."""
    from dataclasses import replace

    from rewards.sources import probe, resolve

    table = REWARDS if kind == "reward" else DIVERSITY_METRICS
    builder = _lookup(table, kind, name)
    if not hasattr(builder, "sources"):
        _build(table, kind, name, kwargs)
        return
    for src in sources_of(name, kwargs, kind):
        src = replace(src, key=f"{where}.{src.key}")  # messages name the config key
        probe(src, resolve(src))
