"""Masked generation (inpainting), the way diffusers' StableDiffusionInpaintPipeline draws it.

Two kinds of model repaint the white part of a mask (1 = repaint, 0 = keep):
- an inpainting UNet (9 input channels: the noisy latents, the mask at latent size, and the latents of
  the masked image ``pixels * (mask < 0.5)``), conditioned on what it must keep;
- a text-to-image UNet (4 channels) that, after every step, keeps its own latents inside the mask and
  takes the known image's latents noised to the next timestep outside it (the blend of the
  "RePaint"-style sampler the pipeline runs for ``num_channels_unet == 4``).

``prepare`` draws from the generator in the pipeline's order (the image's posterior sample for the
4-channel blend or strength < 1, then the noise, then the masked image's posterior sample), so the
training sampler (models/sampler.py) reproduces the pipeline image for image. Latents do not map
one-to-one onto pixels, so the decoded image differs slightly from the input outside the mask;
``paste_back`` makes it equal there, in pixel space (and is what a reward sees in DRaFT+ on masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from models.components import vae_precision

INPAINT_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


@dataclass
class InpaintInputs:
    """What masked generation starts from, at pixel size."""

    pixels: torch.Tensor  # [B, 3, H, W] in [-1, 1]: the known image
    mask: torch.Tensor  # [B, 1, H, W] in {0, 1}: 1 = repaint
    strength: float = 1.0  # 1: start from pure noise; < 1: from the image noised to that fraction of the schedule
    paste_back: bool = False  # composite the decoded image with the input outside the mask (pixel space)

    def __post_init__(self):
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.pixels.shape[0] != self.mask.shape[0] or self.pixels.shape[2:] != self.mask.shape[2:]:
            raise ValueError(f"image {tuple(self.pixels.shape)} and mask {tuple(self.mask.shape)} differ in batch or size")

    @staticmethod
    def whole_image(batch: int, height: int, width: int, device=None) -> "InpaintInputs":
        """Text-to-image with an inpainting UNet: the whole image is the hole, nothing is known."""
        return InpaintInputs(torch.zeros(batch, 3, height, width, device=device), torch.ones(batch, 1, height, width, device=device))


@dataclass
class Prepared:
    """The latent-size tensors one inpainting pass needs (batch B, latent h x w)."""

    latents: torch.Tensor  # [B, 4, h, w] x at the first timestep
    noise: torch.Tensor  # [B, 4, h, w] the noise x was drawn with (the 4-channel blend re-noises with it)
    mask: torch.Tensor  # [B, 1, h, w] the mask at latent size
    masked_latents: torch.Tensor  # [B, 4, h, w] latents of the masked image (scaled)
    image_latents: torch.Tensor | None  # [B, 4, h, w] the known image's latents (4-channel blend), else None
    unet_channels: int

    def unet_extra(self) -> torch.Tensor | None:
        """Channels appended to the UNet input: cat(mask, masked latents) [B, 5, h, w] for a 9-channel UNet."""
        if self.unet_channels != INPAINT_CHANNELS:
            return None
        return torch.cat([self.mask, self.masked_latents], dim=1)  # [B, 5, h, w]


def is_inpainting_unet(unet) -> bool:
    return unet.config.in_channels == INPAINT_CHANNELS


def encode_sample(vae, pixels: torch.Tensor, generator) -> torch.Tensor:
    """A VAE posterior sample, scaled: pixels [B, 3, H, W] in [-1, 1] -> [B, 4, H/f, W/f] (the pipeline's
    _encode_vae_image with retrieve_latents' default "sample" mode)."""
    with vae_precision(vae, pixels) as (pixels,):
        return vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor


def strength_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The pipeline's get_timesteps: the last round(steps * strength) of the schedule (set_timesteps first)."""
    start = steps - min(int(steps * strength), steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if len(timesteps) < 1:
        raise ValueError(f"strength {strength} leaves no denoising step of {steps}")
    return timesteps


def prepare(inpaint: InpaintInputs, vae, unet_channels: int, scheduler, timesteps: torch.Tensor, generator,
            dtype: torch.dtype, scale_factor: int) -> Prepared:
    """x at the first timestep and the conditioning tensors, drawing from ``generator`` as the pipeline does."""
    pixels = inpaint.pixels.to(dtype)
    b, _, height, width = pixels.shape
    shape = (b, vae.config.latent_channels, height // scale_factor, width // scale_factor)
    full = inpaint.strength == 1.0
    image_latents = None
    if unet_channels != INPAINT_CHANNELS or not full:
        image_latents = encode_sample(vae, pixels, generator).to(dtype)  # [B, 4, h, w]
    noise = randn_tensor(shape, generator=generator, device=pixels.device, dtype=dtype)
    if full:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(b))
    mask = inpaint.mask.to(dtype)
    masked = pixels * (mask < 0.5)  # [B, 3, H, W]: the known part, zero (grey) in the hole
    mask_latent = F.interpolate(mask, size=shape[2:])  # [B, 1, h, w], nearest as the pipeline
    masked_latents = encode_sample(vae, masked, generator).to(dtype)  # [B, 4, h, w]
    keep = image_latents if unet_channels != INPAINT_CHANNELS else None
    return Prepared(latents, noise, mask_latent, masked_latents, keep, unet_channels)


def blend(prepared: Prepared, scheduler, latents: torch.Tensor, timesteps: torch.Tensor, i: int) -> torch.Tensor:
    """4-channel inpainting after step i: own latents inside the mask, the known image's latents noised to the
    next timestep (clean after the last step) outside it. A 9-channel UNet needs no blend: returned as is."""
    if prepared.image_latents is None:
        return latents
    known = prepared.image_latents
    if i < len(timesteps) - 1:
        known = scheduler.add_noise(known, prepared.noise, timesteps[i + 1 : i + 2])  # [1], on its device: no host sync
    return (1 - prepared.mask) * known + prepared.mask * latents


def paste_back(images: torch.Tensor, inpaint: InpaintInputs) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> the same inside the mask, the input image outside it (differentiable in images)."""
    known = (inpaint.pixels.to(images.dtype) / 2 + 0.5).clamp(0, 1)
    mask = inpaint.mask.to(images.dtype)
    return mask * images + (1 - mask) * known
