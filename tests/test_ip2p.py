"""InstructPix2Pix: UNet surgery, conditioning dropout, image latents, training inputs, editing parity."""

import warnings

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

from models.ip2p import dropout_masks, edit, expand_unet_inputs, image_latents, ip2p_denoise_inputs, ip2p_inputs
from models.policy import Policy
from models.sampler import SamplerSettings
from models.schedulers import make_scheduler

PROMPTS = ["make it red", "turn it into a car"]


def unet_call(unet, x, t=500):
    cond = torch.randn(x.shape[0], 77, 32, generator=torch.Generator().manual_seed(1))  # [B, 77, D]
    return unet(x, t, encoder_hidden_states=cond).sample


def source_pixels(seed=3, batch=2):
    """A random source image [B, 3, 32, 32] in [-1, 1]."""
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ip2p_policy(comps, seed=0):
    """Expanded tiny UNet with random image channels (so the image branch matters) and random LoRA."""
    expand_unet_inputs(comps.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = comps.unet.conv_in.weight
        w[:, 4:].copy_(torch.randn(w[:, 4:].shape, generator=g) * 0.1)  # [out, 4, 3, 3] image channels
    policy = Policy(comps)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


# ---- surgery ---------------------------------------------------------------------------------


def test_surgery_keeps_output_for_zero_image(tiny):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # [B, 4, h, w]
    old_conv = tiny.unet.conv_in
    with torch.no_grad():
        before = unet_call(tiny.unet, x)
        rng = torch.random.get_rng_state()
        unet = expand_unet_inputs(tiny.unet)
        assert torch.equal(torch.random.get_rng_state(), rng)  # no random init drawn
        after = unet_call(unet, ip2p_inputs(x, torch.zeros_like(x)))  # [B, 8, h, w]
    assert unet is tiny.unet and unet.config.in_channels == 8
    assert unet.conv_in.weight.shape[1] == 8 and not unet.conv_in.weight.requires_grad
    assert torch.equal(unet.conv_in.weight[:, :4], old_conv.weight)
    assert torch.equal(unet.conv_in.weight[:, 4:], torch.zeros_like(old_conv.weight))
    assert torch.equal(unet.conv_in.bias, old_conv.bias)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_eight_channel_unet_passes_through(tiny):
    unet = expand_unet_inputs(tiny.unet)
    conv = unet.conv_in
    assert expand_unet_inputs(unet) is unet and unet.conv_in is conv


def test_bad_channel_counts_raise(tiny):
    nine = UNet2DConditionModel.from_config({**tiny.unet.config, "in_channels": 9})  # an inpainting-style UNet
    with pytest.raises(ValueError, match="9 input channels"):
        expand_unet_inputs(nine)
    with pytest.raises(ValueError):
        expand_unet_inputs(tiny.unet, in_channels=3)
    assert tiny.unet.config.in_channels == 4  # untouched


# ---- dropout ---------------------------------------------------------------------------------


def test_dropout_frequencies():
    n, p = 20000, 0.05
    text, image = dropout_masks(n, p, torch.Generator().manual_seed(0))
    assert text.shape == image.shape == (n,) and text.dtype == image.dtype == torch.bool
    freq = lambda m: m.float().mean().item()  # noqa: E731
    sigma = (p * (1 - p) / n) ** 0.5
    for case in (text & ~image, text & image, ~text & image):
        assert abs(freq(case) - p) < 5 * sigma
    assert abs(freq(~text & ~image) - (1 - 3 * p)) < 5 * (3 * p * (1 - 3 * p) / n) ** 0.5


def test_dropout_scheme_is_diffusers():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(1000, generator=torch.Generator().manual_seed(4))
    text, image = dropout_masks(1000, 0.1, g)
    assert torch.equal(text, r < 0.2)
    assert torch.equal(image, (r >= 0.1) & (r < 0.3))
    none_t, none_i = dropout_masks(100, 0.0)
    assert not none_t.any() and not none_i.any()
    with pytest.raises(ValueError):
        dropout_masks(4, 0.5)


# ---- latents and training inputs -------------------------------------------------------------


def test_image_latents_match_pipeline(tiny):
    pixels = source_pixels()
    pipe = StableDiffusionInstructPix2PixPipeline(
        tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.unet, tiny.scheduler, None, None, requires_safety_checker=False
    )
    with torch.no_grad():
        ours = image_latents(tiny.vae, pixels)
        theirs = pipe.prepare_image_latents(pixels, 2, 1, torch.float32, torch.device("cpu"), False)
    assert ours.shape == (2, 4, 16, 16)
    assert torch.equal(ours, theirs)


def test_ip2p_inputs_stacks_channels():
    x, img = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    out = ip2p_inputs(x, img)
    assert out.shape == (2, 8, 5, 5)
    assert torch.equal(out[:, :4], x) and torch.equal(out[:, 4:], img)


def test_denoise_inputs_apply_masks():
    x = torch.randn(4, 4, 3, 3)
    img = torch.randn(4, 4, 3, 3)
    text = torch.randn(4, 7, 6)  # [B, L, D]
    null = torch.randn(1, 7, 6)  # the "" prompt
    drop_text = torch.tensor([True, True, False, False])
    drop_image = torch.tensor([False, True, True, False])
    unet_in, hidden = ip2p_denoise_inputs(x, img, text, null, drop_text, drop_image)
    assert unet_in.shape == (4, 8, 3, 3) and hidden.shape == (4, 7, 6)
    assert torch.equal(unet_in[:, :4], x)
    for i in range(4):
        assert torch.equal(unet_in[i, 4:], torch.zeros(4, 3, 3) if drop_image[i] else img[i])
        assert torch.equal(hidden[i], null[0] if drop_text[i] else text[i])


# ---- editing sampler -------------------------------------------------------------------------


def pipeline_edit(comps, scheduler_name, pixels, steps, guidance, image_guidance, seed):
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=make_scheduler(scheduler_name, comps.scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "[-1, 1] tensors are deprecated": exactly what we pass
        return pipe(
            PROMPTS, image=pixels, num_inference_steps=steps, guidance_scale=guidance,
            image_guidance_scale=image_guidance, generator=torch.Generator().manual_seed(seed), output_type="pt",
        ).images  # fmt: skip


@pytest.mark.parametrize(
    "scheduler,steps,guidance,image_guidance",
    [("euler_a", 20, 7.0, 1.5), ("ddim", 20, 7.0, 1.5), ("euler_a", 4, 1.0, 1.5), ("dpmsolver++", 4, 5.0, 0.5)],
)
def test_edit_matches_pipeline(tiny, scheduler, steps, guidance, image_guidance):
    policy = ip2p_policy(tiny)
    pixels = source_pixels()
    s = SamplerSettings(steps=steps, guidance=guidance, scheduler=scheduler, height=32, width=32)
    ours = edit(policy, PROMPTS, pixels, s, image_guidance_scale=image_guidance, generator=torch.Generator().manual_seed(9))
    theirs = pipeline_edit(tiny, scheduler, pixels, steps, guidance, image_guidance, seed=9)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert 0 <= ours.min() and ours.max() <= 1 and not ours.requires_grad
    assert torch.equal(ours, theirs)


def test_edit_depends_on_the_image(tiny):
    policy = ip2p_policy(tiny)
    s = SamplerSettings(steps=4, guidance=7.0, scheduler="euler_a")
    a = edit(policy, PROMPTS, source_pixels(3), s, generator=torch.Generator().manual_seed(0))
    b = edit(policy, PROMPTS, source_pixels(4), s, generator=torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-4


def test_edit_needs_an_expanded_unet(tiny):
    with pytest.raises(ValueError, match="expand_unet_inputs"):
        edit(Policy(tiny), PROMPTS, source_pixels(), SamplerSettings(steps=2))


def test_edit_validates_image(tiny):
    s = SamplerSettings(steps=2)
    policy = ip2p_policy(tiny)
    with pytest.raises(ValueError, match="B = len"):
        edit(policy, PROMPTS, source_pixels(batch=1), s)
    with pytest.raises(ValueError, match="multiples of 2"):
        edit(policy, PROMPTS, source_pixels()[..., :31], s)
