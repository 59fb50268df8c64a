"""Scheduler choice: names, config inheritance, step kwargs, pipeline parity, truncated backprop."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from test_sampler import lora_policy  # a LoRA policy with non-zero adapters

from models.policy import Policy
from models.sampler import SamplerSettings, sample
from models.schedulers import SCHEDULERS, make_scheduler, scheduler_for, step_kwargs
from rewards import build_reward

PROMPTS = ["a red apple", "a blue car"]
STEPS = 4


def settings(**kw):
    base = dict(steps=STEPS, guidance=3.0, eta=0.0, truncation_steps=1, height=32, width=32)
    return SamplerSettings(**{**base, **kw})


def test_make_scheduler_keeps_the_noise_schedule(tiny):
    for name, cls in SCHEDULERS.items():
        sched = make_scheduler(name, tiny.scheduler)
        assert type(sched) is cls
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset"):
            assert sched.config[key] == tiny.scheduler.config[key], (name, key)
    assert make_scheduler("dpmsolver++", tiny.scheduler).config.algorithm_type == "dpmsolver++"


def test_unknown_name_lists_the_choices(tiny):
    with pytest.raises(ValueError, match="ddim, dpmsolver\\+\\+, euler, euler_a, pndm"):
        make_scheduler("lms", tiny.scheduler)
    with pytest.raises(ValueError, match="unknown scheduler"):
        settings(scheduler="lms")


def test_scheduler_for_caches_per_base(tiny):
    assert scheduler_for(tiny.scheduler, None) is tiny.scheduler
    first = scheduler_for(tiny.scheduler, "euler")
    assert scheduler_for(tiny.scheduler, "euler") is first
    assert scheduler_for(DDIMScheduler(**tiny.scheduler.config), "euler") is not first


def test_step_kwargs_only_what_step_accepts(tiny):
    g = torch.Generator()
    assert step_kwargs(tiny.scheduler, 0.5, g) == {"eta": 0.5, "generator": g}
    assert step_kwargs(make_scheduler("euler_a", tiny.scheduler), 0.5, g) == {"generator": g}
    assert step_kwargs(make_scheduler("pndm", tiny.scheduler), 0.5, g) == {}
    assert isinstance(make_scheduler("dpmsolver++", tiny.scheduler), DPMSolverMultistepScheduler)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_parity_with_pipeline_per_scheduler(tiny, name):
    policy = lora_policy(tiny)
    ours = sample(policy, PROMPTS, settings(scheduler=name), torch.Generator().manual_seed(7), track_grad=False)
    pipe = tiny.pipeline()
    pipe.scheduler = make_scheduler(name, tiny.scheduler)
    with torch.no_grad():
        theirs = pipe(
            PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, height=32, width=32,
            generator=torch.Generator().manual_seed(7), output_type="pt",
        ).images
    assert ours.images.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.equal(ours.images, theirs)


def test_repeated_sampling_resets_multistep_state(tiny):
    policy = lora_policy(tiny)
    runs = [sample(policy, PROMPTS, settings(scheduler="pndm"), torch.Generator().manual_seed(1), track_grad=False)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0].images, runs[1].images)


def test_default_scheduler_unchanged(tiny):
    policy = lora_policy(tiny)
    own = sample(policy, PROMPTS, settings(), torch.Generator().manual_seed(2), track_grad=False).images
    ddim = sample(policy, PROMPTS, settings(scheduler="ddim"), torch.Generator().manual_seed(2), track_grad=False).images
    assert torch.equal(own, ddim)  # "ddim" from the DDIM config is the same solver


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_truncated_backprop_through_euler(tiny, name):
    policy = lora_policy(tiny)
    # an inference pass first: the cached scheduler must still serve gradient passes afterwards
    sample(policy, PROMPTS, settings(scheduler=name), torch.Generator().manual_seed(0), track_grad=False)
    out = sample(policy, PROMPTS, settings(scheduler=name, truncation_steps=2), torch.Generator().manual_seed(0))
    assert out.eps.shape == (2, 2, 4, 16, 16) and out.eps.requires_grad  # [K, B, C, h, w]
    build_reward("colorfulness")(out.images, PROMPTS).sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_euler_a_differs_from_ddim(tiny):
    policy = Policy(tiny)
    a = sample(policy, PROMPTS, settings(scheduler="euler_a"), torch.Generator().manual_seed(0), track_grad=False)
    b = sample(policy, PROMPTS, settings(), torch.Generator().manual_seed(0), track_grad=False)
    assert not torch.equal(a.images, b.images)
    assert isinstance(scheduler_for(tiny.scheduler, "euler_a"), EulerAncestralDiscreteScheduler)
