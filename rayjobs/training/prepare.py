"""The model a run trains: components loaded, then changed as the trainable section says.

Before the Policy wraps them: another VAE replaces the model's (model.vae), VAE slicing/tiling
are switched on (memory section), the UNet input grows to 8 channels for InstructPix2Pix
(models/ip2p.expand_unet_inputs, a no-op on an InstructPix2Pix base), and textual-inversion
placeholders join the tokenizer and the text encoder (models/textual_inversion.add_placeholder;
SDXL: both tokenizers and both encoders, exported as clip_l / clip_g).
"""

from __future__ import annotations

import torch

from models.components import Components
from models.inpaint import INPAINT_CHANNELS
from models.ip2p import expand_unet_inputs
from models.loading import load_components
from models.textual_inversion import add_placeholder
from rayjobs.config import Config
from rayjobs.errors import UserError


def prepare_components(cfg: Config) -> tuple[Components, dict[str, int]]:
    """(components, {placeholder: number of vectors}); the same on every rank (seeded by train.seed)."""
    comps = load_components(cfg.model.name_or_path, cfg.model.revision, cfg.model.vae)
    if cfg.memory.vae_slicing:
        comps.vae.enable_slicing()
    if cfg.memory.vae_tiling:
        comps.vae.enable_tiling()
    t = cfg.trainable
    have = comps.unet.config.in_channels
    if comps.is_sdxl and t.unet_in_channels != have:
        raise UserError("trainable.unet_in_channels: InstructPix2Pix training is for SD 1.x models; this model is SDXL")
    check_inpaint_channels(have, t.unet_in_channels)
    if t.unet_in_channels != have:
        try:
            expand_unet_inputs(comps.unet, t.unet_in_channels)
        except ValueError as err:
            raise UserError(f"trainable.unet_in_channels: {err}") from None
        comps.unet.requires_grad_(False)  # the new conv_in is trainable only if the trainable set says so
    generator = torch.Generator().manual_seed(cfg.train.seed)
    tokens = {}
    for i, spec in enumerate(t.tokens):
        try:
            for tok, encoder in zip(comps.tokenizers, comps.text_encoders):  # SDXL: the same token in both encoders
                add_placeholder(tok, encoder, spec.token, spec.num_vectors, spec.init_token, generator)
        except ValueError as err:
            raise UserError(f"trainable.tokens.{i}: {err}") from None
        tokens[spec.token] = spec.num_vectors
    return comps, tokens


def check_inpaint_channels(have: int | None, want: int) -> None:
    """An inpainting UNet (9 channels) is never made from another or turned into one: UserError if either side is 9
    and they differ (``have`` None: unknown before loading, nothing to check)."""
    if have is None or have == want or INPAINT_CHANNELS not in (have, want):
        return
    fix = ("9-channel (inpainting) training needs an inpainting base model (e.g. runwayml/stable-diffusion-inpainting)"
           if have != INPAINT_CHANNELS else "it is an inpainting model: set trainable.unet_in_channels: 9 and data.inpaint: true")
    raise UserError(f"trainable.unet_in_channels: {want}, but the model's UNet takes {have} input channels; {fix}")
