"""Inpainting (issue 10), the model side: the training sampler equals diffusers' StableDiffusionInpaintPipeline
for a 9-channel inpainting UNet and for a 4-channel text-to-image UNet; paste-back keeps the known pixels;
the denoise term builds the 9-channel input as diffusers' inpainting training does."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline

from models.components import load_components
from models.inpaint import InpaintInputs, paste_back
from models.objective import DenoiseSettings, denoise_loss
from models.policy import Policy
from models.sampler import SamplerSettings, sample

PROMPTS = ["a red circle", "a blue square"]


def model(name):
    comps = load_components(name)
    if comps.unet.config.in_channels == 9:  # the mask channels must matter: give them weight
        with torch.no_grad():
            w = comps.unet.conv_in.weight
            w[:, 4:] = torch.randn(w[:, 4:].shape, generator=torch.Generator().manual_seed(2)) * 0.1
    return comps


def lora_policy(comps):
    policy = Policy(comps, "lora", lora_rank=4)
    with torch.no_grad():  # B != 0: the adapted UNet differs from the base
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return policy


def inputs(strength=1.0, paste=False):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1
    return InpaintInputs(pixels, mask, strength, paste)


def pipeline_images(comps, inp, steps=4, guidance=3.0):
    pipe = StableDiffusionInpaintPipeline(**comps.pipeline().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, image=inp.pixels / 2 + 0.5, mask_image=inp.mask, num_inference_steps=steps, guidance_scale=guidance,
                    strength=inp.strength, height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="pt").images  # fmt: skip


@pytest.mark.parametrize("name", ["tiny-inpaint", "tiny"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sampler_equals_the_inpainting_pipeline(name, strength):
    comps = model(name)
    policy = lora_policy(comps)
    inp = inputs(strength)
    ours = sample(policy, PROMPTS, SamplerSettings(steps=4, guidance=3.0, height=32, width=32),
                  torch.Generator().manual_seed(7), track_grad=False, inpaint=inp).images  # fmt: skip
    assert torch.allclose(ours, pipeline_images(comps, inp), atol=1e-5)


def test_the_mask_decides_what_changes():
    """A 9-channel UNet reads the mask: another mask, another image (same seed)."""
    comps = model("tiny-inpaint")
    policy = Policy(comps, "lora")
    s = SamplerSettings(steps=3, guidance=3.0, height=32, width=32)
    a, b = inputs(), inputs()
    b.mask = torch.flip(b.mask, dims=[3])
    one = sample(policy, PROMPTS, s, torch.Generator().manual_seed(0), track_grad=False, inpaint=a).images
    two = sample(policy, PROMPTS, s, torch.Generator().manual_seed(0), track_grad=False, inpaint=b).images
    assert not torch.allclose(one, two, atol=1e-3)


def test_paste_back_keeps_every_known_pixel_and_the_gradient_inside():
    comps = model("tiny")
    policy = lora_policy(comps)
    inp = inputs(paste=True)
    s = SamplerSettings(steps=3, guidance=3.0, height=32, width=32, truncation_steps=2)
    out = sample(policy, PROMPTS, s, torch.Generator().manual_seed(0), with_ref=True, inpaint=inp)
    known = (inp.pixels / 2 + 0.5).clamp(0, 1)
    keep = inp.mask.expand_as(known) == 0
    assert torch.equal(out.images.detach()[keep], known[keep])
    assert not torch.allclose(out.images.detach()[~keep], known[~keep], atol=1e-2)
    out.images.mean().backward()  # the reward of the composite reaches the LoRA through the hole
    assert sum(p.grad.abs().sum() for p in policy.parameters() if p.grad is not None) > 0
    assert out.eps.shape == (2, 2, 4, 16, 16)


def test_paste_back_is_a_pure_composite():
    images = torch.full((1, 3, 4, 4), 0.25)
    inp = InpaintInputs(torch.ones(1, 3, 4, 4), torch.tensor([[[[1.0, 0, 0, 0]] * 4]]))
    out = paste_back(images, inp)
    assert out[0, :, :, 0].eq(0.25).all() and out[0, :, :, 1:].eq(1.0).all()


def test_an_inpainting_unet_without_an_image_draws_whole_images():
    """Text-to-image with a 9-channel UNet: the whole image is the hole (mask all ones, nothing known)."""
    comps = model("tiny-inpaint")
    policy = Policy(comps, "lora")
    s = SamplerSettings(steps=3, guidance=3.0, height=32, width=32)
    plain = sample(policy, PROMPTS, s, torch.Generator().manual_seed(0), track_grad=False).images
    whole = InpaintInputs.whole_image(2, 32, 32, torch.zeros(1))
    assert torch.equal(plain, sample(policy, PROMPTS, s, torch.Generator().manual_seed(0), track_grad=False, inpaint=whole).images)


def test_bad_inpaint_inputs_raise():
    with pytest.raises(ValueError, match="strength"):
        InpaintInputs(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8), strength=0.0)
    with pytest.raises(ValueError, match="differ"):
        InpaintInputs(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 16, 16))
    policy = Policy(model("tiny"), "lora")
    with pytest.raises(ValueError, match="truncation_steps"):  # strength 0.5 of 4 steps leaves 2 < K = 3
        sample(policy, PROMPTS, SamplerSettings(steps=4, guidance=3.0, height=32, width=32, truncation_steps=3),
               torch.Generator().manual_seed(0), inpaint=inputs(0.5))  # fmt: skip


def test_denoise_input_is_latents_mask_and_masked_image_latents_as_diffusers_builds_it():
    """diffusers' inpainting training: cat(noisy latents, mask at latent size, masked-image latents) on channels."""
    comps = model("tiny-inpaint")
    policy = Policy(comps, "lora")
    seen = []
    policy.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    masked_latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = inputs().mask
    with torch.no_grad():
        loss = denoise_loss(policy, x0, PROMPTS, torch.Generator().manual_seed(0), DenoiseSettings(),
                            inpaint_mask=mask, masked_latents=masked_latents)  # fmt: skip
    x = seen[0]
    assert x.shape == (2, 9, 16, 16) and loss.shape == (2,)
    assert torch.equal(x[:, 4:5], F.interpolate(mask, size=(16, 16))) and torch.equal(x[:, 5:], masked_latents)


def test_masked_loss_averages_inside_the_mask_only():
    comps = model("tiny")
    policy = Policy(comps, "lora")
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    mask = inputs().mask
    args = (policy, x0, PROMPTS)
    with torch.no_grad():
        inside = denoise_loss(*args, torch.Generator().manual_seed(0), DenoiseSettings(masked_loss=True), inpaint_mask=mask)
        by_hand = denoise_loss(*args, torch.Generator().manual_seed(0), DenoiseSettings(), mask=F.interpolate(mask, size=(16, 16)))
        everywhere = denoise_loss(*args, torch.Generator().manual_seed(0), DenoiseSettings(), inpaint_mask=mask)
    assert torch.equal(inside, by_hand) and not torch.allclose(inside, everywhere)
