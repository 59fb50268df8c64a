"""Inpainting (docs/inpainting.md), the model side: the training sampler equals diffusers' StableDiffusionInpaintPipeline
for a 9-channel inpainting UNet and for a 4-channel text-to-image UNet; paste-back keeps the known pixels;
the denoise term builds the 9-channel input as diffusers' inpainting training does."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline

from models.inpaint import InpaintInputs, paste_back
from models.loading import load_components
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


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sampler_equals_the_sdxl_inpainting_pipeline(strength):
    """SDXL (4-channel blend, pooled embeddings and time ids) against StableDiffusionXLInpaintPipeline."""
    from diffusers import StableDiffusionXLInpaintPipeline

    comps = load_components("tiny-sdxl")
    inp = inputs(strength)
    ours = sample(lora_policy(comps), PROMPTS, SamplerSettings(steps=4, guidance=5.0, height=32, width=32),
                  torch.Generator().manual_seed(7), track_grad=False, inpaint=inp).images  # fmt: skip
    pipe = StableDiffusionXLInpaintPipeline(**comps.pipeline().components, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPTS, image=inp.pixels / 2 + 0.5, mask_image=inp.mask, num_inference_steps=4, guidance_scale=5.0,
                      strength=strength, height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="pt").images  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5)


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
    whole = InpaintInputs.whole_image(2, 32, 32)
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


# ---- through the training loop (LocalContext) ---------------------------------------------

CONFIGS = __import__("pathlib").Path(__file__).parents[1] / "configs"
LOOP = ["sampler.steps=3", "sampler.guidance=3.0", "data.eval_prompts=[a red circle]", "data.eval_seeds=[0,1]",
        "train.batch_size=2", "train.eval_every=0", "optim.warmup_steps=0", "data.resolution=32"]  # fmt: skip


def _worker(tmp_path, *extra):
    from toydata import write_toy_images

    from rayjobs.cluster.preflight import preflight
    from rayjobs.config import load_config
    from rayjobs.training.loop import LocalContext, Worker

    write_toy_images(tmp_path / "data", 2)
    cfg = load_config(None, LOOP + [f"run.output_dir={tmp_path}", f"data.source={tmp_path / 'data'}", *extra])
    return Worker(preflight(cfg), LocalContext(tmp_path / "run"))


def _unet(worker):
    return {n: p.detach().clone() for n, p in worker.policy.unet.named_parameters()}


INPAINT_LORA = ["model.name_or_path=tiny-inpaint", "trainable.unet_in_channels=9", "data.inpaint=true", "objective.preset=finetune"]


def test_inpainting_lora_moves_only_lora_and_reads_the_masks(tmp_path):
    worker = _worker(tmp_path, *INPAINT_LORA, "objective.masked_loss=true")
    seen = []
    worker.policy.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    before = _unet(worker)
    for step in range(2):
        assert worker.train_step(step).finite
    changed = {n for n, p in _unet(worker).items() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed) and set(seen) == {9}


def test_draftplus_on_an_inpainting_model_repaints_data_images(tmp_path):
    """The reward terms repaint the masked part of data.source images; the rest of the image is the input."""
    worker = _worker(tmp_path, "model.name_or_path=tiny-inpaint", "trainable.unet_in_channels=9", "data.inpaint=true",
                     "reward.name=colorfulness", "sampler.truncation_steps=2", "sampler.height=32", "sampler.width=32")  # fmt: skip
    batch = worker.batch(0, 0)
    assert batch["inpaint_pixels"].shape == (2, 3, 32, 32) and batch["inpaint_mask"].shape == (2, 1, 32, 32)
    result = worker.train_step(0)
    assert result.finite and "reward" in result.metrics


def test_dreambooth_on_an_inpainting_model_masks_the_class_images_too(tmp_path):
    worker = _worker(tmp_path, *INPAINT_LORA, "objective.preset=dreambooth", f"data.class_dir={tmp_path / 'class'}",
                     "data.class_prompt=a star", "data.num_class_images=2")  # fmt: skip
    worker.make_class_images()  # drawn by the inpainting model as whole images (the whole image is the hole)
    batch = worker.batch(0, 0)
    assert batch["class_mask"].shape == (2, 1, 32, 32) and batch["class_masked_latents"].shape == (2, 4, 16, 16)
    result = worker.train_step(0)
    assert result.finite and result.metrics["prior"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["trainable.unet_in_channels=9", "data.inpaint=true", "objective.preset=finetune"], "needs an inpainting base model"),
        (["model.name_or_path=tiny-inpaint", "data.inpaint=true", "objective.preset=finetune"], "it is an inpainting model"),
        (["model.name_or_path=tiny-inpaint", "trainable.unet_in_channels=9", "objective.preset=finetune"], "data.inpaint: an inpainting UNet"),
        (["data.inpaint=true", "sampler.height=16"], "sampler.height: masked generation"),
    ],
)
def test_bad_inpainting_configs_are_one_line_before_anything_is_written(tmp_path, extra, message):
    from toydata import write_toy_images

    from rayjobs.cluster.preflight import preflight
    from rayjobs.config import load_config
    from rayjobs.errors import UserError

    write_toy_images(tmp_path / "data", 2)
    with pytest.raises(UserError, match=message):
        preflight(load_config(None, LOOP + [f"run.output_dir={tmp_path / 'runs'}", f"data.source={tmp_path / 'data'}", *extra]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("preset", ["sd15-inpaint-lora.yaml", "sd15-inpaint-dreambooth-lora.yaml", "sd15-inpaint-textual-inversion.yaml",
                                    "sd15-inpaint-draftplus.yaml", "toy-inpaint.yaml"])  # fmt: skip
def test_each_inpainting_preset_runs_one_step(tmp_path, preset):
    """The shipped presets as they are, on the tiny models (9-channel ones on tiny-inpaint) and small sizes."""
    from toydata import write_toy_images

    from rayjobs.cluster.preflight import preflight
    from rayjobs.config import load_config
    from rayjobs.training.loop import LocalContext, train_loop

    write_toy_images(tmp_path / "data", 2)
    model = [] if preset.startswith("toy") else ["model.name_or_path=tiny-inpaint", "model.dtype=float32", "ray.use_gpu=false",
                                                  "reward.name=colorfulness", "reward.kwargs={}"]  # fmt: skip
    extra = [f"data.class_dir={tmp_path / 'class'}", "data.num_class_images=2"] if "dreambooth" in preset else []
    tokens = ["trainable.tokens=[{token: <cat-toy>, num_vectors: 2, init_token: circle}]"] if "inversion" in preset else []
    cfg = load_config(CONFIGS / preset, LOOP + model + extra + tokens + [
        f"run.output_dir={tmp_path}", f"data.source={tmp_path / 'data'}", "sampler.height=32", "sampler.width=32",
        "train.steps=1", "train.grad_accum=1", "ray.num_workers=1", "data.eval_seeds=[0,1]"])  # fmt: skip
    train_loop(preflight(cfg), tmp_path / "run", LocalContext(tmp_path / "run"))
    assert any((tmp_path / "run" / "export").iterdir())
