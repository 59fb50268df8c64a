"""Sampler: parity with diffusers' pipeline, truncated backprop (DRaFT-K), checkpointing, validation."""

import pytest
import torch

from models.policy import Policy
from models.sampler import SamplerSettings, sample
from rewards import build_reward

PROMPTS = ["a red apple", "a blue car"]
T = 3


def settings(**kw):
    base = dict(steps=T, guidance=7.5, eta=0.0, truncation_steps=1, height=32, width=32)
    return SamplerSettings(**{**base, **kw})


def lora_policy(comps, seed=0, scale=0.05):
    """A LoRA policy whose adapters are non-zero (so it differs from the base and A gets gradient)."""
    policy = Policy(comps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return policy


def pipeline(comps):
    return comps.pipeline()


def grads(policy):
    out = {n: p.grad.clone() for n, p in policy.named_trainable().items()}
    for p in policy.parameters():
        p.grad = None
    return out


def assert_grads_close(a, b, rtol=1e-5, atol=1e-8):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=atol), name


# ---- (1) parity with StableDiffusionPipeline -------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_parity_with_diffusers_pipeline(tiny, eta, guidance):
    policy = lora_policy(tiny)  # the pipeline shares the (LoRA-adapted) UNet
    s = settings(eta=eta, guidance=guidance)
    ours = sample(policy, PROMPTS, s, torch.Generator().manual_seed(11)).images
    with torch.no_grad():
        theirs = pipeline(tiny)(
            PROMPTS, num_inference_steps=T, guidance_scale=guidance, eta=eta, height=32, width=32,
            generator=torch.Generator().manual_seed(11), output_type="pt",
        ).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.equal(ours.detach(), theirs)


def test_parity_num_images_per_prompt(tiny):
    policy = lora_policy(tiny)
    s = settings(eta=1.0)
    ours = sample(policy, ["a cat", "a cat"], s, torch.Generator().manual_seed(3)).images
    with torch.no_grad():
        theirs = pipeline(tiny)(
            "a cat", num_images_per_prompt=2, num_inference_steps=T, guidance_scale=7.5, eta=1.0,
            height=32, width=32, generator=torch.Generator().manual_seed(3), output_type="pt",
        ).images
    assert torch.equal(ours.detach(), theirs)
    assert not torch.equal(ours[0], ours[1])  # two different images, not one repeated


# ---- (2) truncated backprop against a hand-written loop -------------------------------------


def manual_grads(policy, K, seed=5, guidance=7.5):
    """Straightforward sampler: the last K steps with grad, plain scheduler.step, VAE decode."""
    comps, sched = policy.components, policy.components.scheduler

    def embed(texts):
        ids = comps.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return comps.text_encoder(ids.input_ids)[0]  # [B, 77, D]

    cond = torch.cat([embed([""] * len(PROMPTS)), embed(PROMPTS)])  # [2B, 77, D]
    x = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(seed))  # x_T
    x = x * sched.init_noise_sigma
    sched.set_timesteps(T)
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i >= T - K):
            out = policy.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample  # [2B, 4, 16, 16]
            eps_u, eps_c = out.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    pixels = comps.vae.decode(x / comps.vae.config.scaling_factor).sample
    images = (pixels / 2 + 0.5).clamp(0, 1)
    build_reward("colorfulness")(images, PROMPTS).sum().backward()
    return grads(policy)


def sampler_grads(policy, seed=5, **kw):
    out = sample(policy, PROMPTS, settings(**kw), torch.Generator().manual_seed(seed))
    build_reward("colorfulness")(out.images, PROMPTS).sum().backward()
    return grads(policy)


@pytest.mark.parametrize("K", [T, 2])
def test_truncated_backprop_matches_hand_loop(tiny, K):
    policy = lora_policy(tiny)
    ours = sampler_grads(policy, truncation_steps=K)
    assert_grads_close(ours, manual_grads(policy, K))
    assert all(g.abs().sum() > 0 for g in ours.values())


def test_k1_differs_from_full_backprop(tiny):
    policy = lora_policy(tiny)
    full = sampler_grads(policy, truncation_steps=T)
    one = sampler_grads(policy, truncation_steps=1)
    diff = sum((full[n] - one[n]).abs().sum() for n in full)
    scale = sum(full[n].abs().sum() for n in full)
    assert diff > 1e-3 * scale


# ---- (3) gradient checkpointing ---------------------------------------------------------------


def test_gradient_checkpointing_same_grads_and_recomputes(tiny):
    policy = lora_policy(tiny)
    calls = []
    # hook the UNet's first layer: checkpoint's recompute stops early, before the UNet's own forward returns
    policy.unet.conv_in.register_forward_hook(lambda *_: calls.append(1))
    plain = sampler_grads(policy, truncation_steps=2)
    n_plain = len(calls)
    ckpt = sampler_grads(policy, truncation_steps=2, gradient_checkpointing=True)
    assert_grads_close(plain, ckpt, rtol=1e-5, atol=1e-9)
    assert n_plain == T  # one batched CFG call per step
    assert len(calls) - n_plain == T + 2  # checkpointing re-runs the K=2 gradient steps in backward


# ---- (4) which steps carry gradient -----------------------------------------------------------


def test_only_last_k_steps_carry_gradient(tiny):
    policy = lora_policy(tiny)
    tiny.scheduler.set_timesteps(4)
    last_two = [int(t) for t in tiny.scheduler.timesteps[-2:]]
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = sample(policy, PROMPTS, settings(steps=4, truncation_steps=2), latents=x_T)
    assert out.eps.shape == (2, 2, 4, 16, 16)  # [K, B, C, h, w]
    assert out.eps.requires_grad and out.timesteps == last_two
    out.images.sum().backward()
    assert x_T.grad is None  # the no-grad steps T..K+1 cut the graph from x_T

    x_T.grad = None
    full = sample(policy, PROMPTS, settings(steps=4, truncation_steps=4), latents=x_T)
    full.images.sum().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0  # K = T reaches x_T


def test_track_grad_false_builds_no_graph(tiny):
    policy = lora_policy(tiny)
    out = sample(policy, PROMPTS, settings(truncation_steps=2), torch.Generator().manual_seed(0), track_grad=False)
    assert not out.images.requires_grad and not out.eps.requires_grad
    assert out.eps.shape[0] == 2 and out.eps_ref is None


# ---- (5) validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(steps=0), dict(truncation_steps=0), dict(steps=3, truncation_steps=4)])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        settings(**kw)


def test_height_not_multiple_of_vae_factor_raises(tiny):
    policy = Policy(tiny)
    assert tiny.vae_scale_factor == 2
    with pytest.raises(ValueError, match="multiples of 2"):
        sample(policy, PROMPTS, settings(height=33), torch.Generator().manual_seed(0))
