"""Sampling schedulers by name, built on the model's own noise schedule.

``make_scheduler("euler_a", comps.scheduler)`` returns diffusers'
EulerAncestralDiscreteScheduler configured from the base scheduler's config
(betas, number of training steps, timestep spacing, offset, prediction type),
so only the solver changes, never the noise schedule the model was trained on.
``step_kwargs`` gives the extra ``step`` arguments a scheduler accepts, as
diffusers' ``prepare_extra_step_kwargs`` does (eta only for DDIM-like ones).
"""

from __future__ import annotations

import inspect
import weakref

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
}
# Extra from_config arguments per name (on top of the base scheduler's config).
_EXTRA = {"dpmsolver++": {"algorithm_type": "dpmsolver++"}}

# base scheduler -> {name: scheduler}; entries vanish with their base scheduler.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_scheduler(name: str, base_scheduler):
    """A fresh scheduler of kind ``name`` sharing ``base_scheduler``'s noise schedule (its config)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
    # Built outside inference mode, so its tables (betas, alphas) are usable in later gradient steps.
    with torch.inference_mode(False):
        return SCHEDULERS[name].from_config(base_scheduler.config, **_EXTRA.get(name, {}))


def scheduler_for(base_scheduler, name: str | None):
    """``base_scheduler`` itself when ``name`` is None, else the cached ``make_scheduler(name, base_scheduler)``.

    The cached scheduler keeps step state (PNDM/DPM history, Euler step index) between calls;
    samplers call ``set_timesteps`` at the start of every pass, which resets it.
    """
    if name is None:
        return base_scheduler
    per_base = _CACHE.setdefault(base_scheduler, {})
    if name not in per_base:
        per_base[name] = make_scheduler(name, base_scheduler)
    return per_base[name]


def step_kwargs(scheduler, eta: float, generator) -> dict:
    """The extra ``scheduler.step`` keyword arguments it accepts: ``eta`` (DDIM-like), ``generator`` (stochastic)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def training_scheduler(base_scheduler) -> DDPMScheduler:
    """The DDPM view of ``base_scheduler``'s noise schedule, for the supervised terms (cached per base).

    Training noises x_0 as sqrt(a_t) x_0 + sqrt(1 - a_t) eps at any of the T_train timesteps, the form the
    UNet learned. DDIM's add_noise is that form, but Euler's (SDXL's sampler) is x_0 + sigma eps at the
    timesteps of its last set_timesteps call, which the UNet input would have to be rescaled for; so the
    denoise terms always take this DDPMScheduler (as diffusers' SDXL training scripts do).
    """
    per_base = _CACHE.setdefault(base_scheduler, {})
    if "_training" not in per_base:
        with torch.inference_mode(False):
            per_base["_training"] = DDPMScheduler.from_config(base_scheduler.config)
    return per_base["_training"]
