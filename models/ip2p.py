"""InstructPix2Pix (Brooks et al. 2023): UNet surgery, conditioning dropout, and the editing sampler.

The UNet sees [noisy latents; source-image latents] stacked along channels (4 + 4 = 8).
The source latents are the VAE posterior's mode, UNSCALED (no ``scaling_factor``), as in
diffusers' ``train_instruct_pix2pix.py`` and ``StableDiffusionInstructPix2PixPipeline``.

Training (supervised "denoise" term): with r ~ U[0, 1) per sample, the text is replaced by
the empty prompt when r < 2p and the image latents by zeros when p <= r < 3p, so "text
only", "both" and "image only" are each dropped with probability p (paper: p = 0.05).

Editing: three-branch classifier-free guidance over the batch [text+image,
uncond-text+image, uncond-text+no-image]:
    eps = eps_u + s_T (eps_text - eps_image) + s_I (eps_image - eps_u).
With the same seed, scheduler and scales, ``edit`` reproduces the pipeline's images.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from models.components import vae_precision
from models.conditioning import Conditioning
from models.policy import Policy
from models.sampler import SamplerSettings, decode
from models.schedulers import scheduler_for, step_kwargs

LATENT_CHANNELS = 4  # SD 1.x VAE latent channels; the source image adds as many again


def expand_unet_inputs(unet, in_channels: int = 2 * LATENT_CHANNELS):
    """Give a 4-channel UNet ``in_channels`` inputs, in place: old conv_in weights in the first 4, zeros after.

    The bias is copied too, so with a zero image the expanded UNet computes exactly what the
    original did (diffusers' script leaves the new conv's random default bias). A UNet that
    already has ``in_channels`` inputs (an InstructPix2Pix base) is returned unchanged.
    """
    current = unet.config.in_channels
    if current == in_channels:
        return unet
    if current != LATENT_CHANNELS or in_channels <= LATENT_CHANNELS:
        raise ValueError(
            f"cannot expand a UNet with {current} input channels to {in_channels}: "
            f"need a {LATENT_CHANNELS}-channel base (or one that already has {in_channels})"
        )
    old = unet.conv_in
    new = torch.nn.utils.skip_init(  # no random init: leaves the global RNG alone
        torch.nn.Conv2d, in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :current].copy_(old.weight)  # [out, 4, k, k] of [out, in_channels, k, k]
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def dropout_masks(batch: int, p: float, generator: torch.Generator | None = None, device=None):
    """Conditioning dropout as diffusers' train_instruct_pix2pix.py: (drop_text [B] bool, drop_image [B] bool).

    r ~ U[0, 1): drop_text = r < 2p, drop_image = p <= r < 3p; P(text only) = P(both) = P(image only) = p.
    """
    if not 0.0 <= p <= 1.0 / 3.0:
        raise ValueError(f"conditioning dropout p must be in [0, 1/3], got {p}")
    r = torch.rand(batch, generator=generator, device=device)  # [B]
    return r < 2 * p, (r >= p) & (r < 3 * p)


def image_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Source-image latents [B, 4, H/f, W/f], unscaled: the VAE posterior mode of ``pixels`` [B, 3, H, W] in [-1, 1]."""
    with vae_precision(vae, pixels) as (pixels,):
        return vae.encode(pixels).latent_dist.mode()


def ip2p_inputs(noisy_latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """UNet input: [B, 4, h, w] noisy latents and [B, 4, h, w] image latents -> [B, 8, h, w]."""
    return torch.cat([noisy_latents, image_latents], dim=1)  # [B, 8, h, w]


def ip2p_denoise_inputs(
    noisy_latents: torch.Tensor,
    image_latents: torch.Tensor,
    text_embeds: torch.Tensor,
    null_text_embeds: torch.Tensor,
    drop_text: torch.Tensor,
    drop_image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-step inputs with the dropout masks applied: (unet_input [B, 8, h, w], encoder_hidden_states [B, L, D]).

    A dropped image becomes zeros (multiplied by 0, as diffusers does); a dropped text becomes
    ``null_text_embeds``, the "" prompt's embedding ([1, L, D] or [B, L, D]).
    """
    keep_image = (~drop_image).to(image_latents.dtype).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
    unet_input = ip2p_inputs(noisy_latents, keep_image * image_latents)  # [B, 8, h, w]
    if isinstance(text_embeds, Conditioning):  # the training step's: every text part of a dropped row is null
        return unet_input, text_embeds.where(drop_text, null_text_embeds)
    null = null_text_embeds.to(text_embeds.dtype)
    hidden = torch.where(drop_text.reshape(-1, 1, 1), null, text_embeds)  # [B, L, D]
    return unet_input, hidden


def _check_edit_inputs(policy: Policy, prompts, pixels: torch.Tensor) -> None:
    comps = policy.components
    if comps.is_sdxl:
        raise ValueError("InstructPix2Pix editing is implemented for SD 1.x models; this one is SDXL")
    f = comps.vae_scale_factor
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] != len(prompts):
        raise ValueError(
            f"image_pixels must be [B, 3, H, W] with B = len(prompts) = {len(prompts)}, got {tuple(pixels.shape)}"
        )
    if pixels.shape[2] % f or pixels.shape[3] % f:
        raise ValueError(f"image height and width must be multiples of {f}, got {pixels.shape[2]}x{pixels.shape[3]}")
    need = 2 * comps.vae.config.latent_channels
    if comps.unet.config.in_channels != need:
        raise ValueError(
            f"an InstructPix2Pix UNet takes {need} input channels, this one {comps.unet.config.in_channels}: "
            "run models.ip2p.expand_unet_inputs on it (then train it) first"
        )


def _branches(embeds: torch.Tensor, source: torch.Tensor, three: bool):
    """Text embeddings and image latents in the pipeline's batch order: 3 branches [3B, ...] or just [B, ...].

    embeds [2B, L, D] = cat(prompt embeds, negative-prompt embeds); source [B, 4, h, w] image latents.
    """
    text, uncond = embeds.chunk(2)  # 2 x [B, L, D]
    if not three:
        return text, source
    cond = torch.cat([text, uncond, uncond])  # [3B, L, D]: text+image, uncond+image, uncond+no image
    conditioning = torch.cat([source, source, torch.zeros_like(source)])  # [3B, 4, h, w]
    return cond, conditioning


@torch.inference_mode()
def edit(
    policy: Policy,
    prompts: list[str],
    image_pixels: torch.Tensor,
    settings: SamplerSettings,
    image_guidance_scale: float = 1.5,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Edit ``image_pixels`` [B, 3, H, W] in [-1, 1] by the instructions ``prompts``: images [B, 3, H, W] in [0, 1].

    Uses ``policy.net`` (so a trained LoRA or DDP wrapper is used) and ``policy.encode_prompts``.
    From ``settings``: steps, guidance (the text scale s_T), eta, scheduler, negative_prompt; the output
    size is the input's. Three-branch guidance runs when s_T > 1 and s_I >= 1 (as the pipeline decides),
    otherwise one conditional branch. Inference only.
    """
    _check_edit_inputs(policy, prompts, image_pixels)
    comps = policy.components
    device = next(comps.unet.parameters()).device
    scheduler = scheduler_for(comps.scheduler, settings.scheduler)
    three = settings.guidance > 1.0 and image_guidance_scale >= 1.0
    batch = len(prompts)
    embeds = policy.encode_prompts(list(prompts) + [settings.negative_prompt] * batch).states  # [2B, L, D]
    source = image_latents(comps.vae, image_pixels.to(device=device, dtype=embeds.dtype))  # [B, 4, h, w]
    cond, conditioning = _branches(embeds, source, three)
    scheduler.set_timesteps(settings.steps, device=device)  # also resets multistep state
    shape = (batch, comps.vae.config.latent_channels, *source.shape[-2:])  # [B, 4, h, w], as prepare_latents
    latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    extra = step_kwargs(scheduler, settings.eta, generator)
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 3) if three else latents  # [3B or B, 4, h, w]
        model_in = ip2p_inputs(scheduler.scale_model_input(model_in, t), conditioning)  # [3B or B, 8, h, w]
        eps = policy.net(model_in, t, encoder_hidden_states=cond, return_dict=False)[0]
        if three:
            eps_text, eps_image, eps_uncond = eps.chunk(3)  # 3 x [B, 4, h, w]
            text_term = settings.guidance * (eps_text - eps_image)
            eps = eps_uncond + text_term + image_guidance_scale * (eps_image - eps_uncond)
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    return decode(policy, latents, generator)
