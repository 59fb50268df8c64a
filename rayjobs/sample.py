"""`draftray sample`: plain diffusers inference, so every image is reproducible outside draftray.

Text-to-image runs ``StableDiffusionPipeline``; ``--image`` runs ``StableDiffusionInstructPix2PixPipeline``
(three-branch guidance: uncond + gs (text - image) + igs (image - uncond)) over the same components.
A LoRA loads with ``load_lora_weights`` (its strength is ``--lora-scale``), embeddings with
``load_textual_inversion``, and ``--scheduler`` swaps the scheduler (built from the model's schedule).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from models.components import ModelNotFoundError, load_components
from models.export import LORA_FILE
from rayjobs.errors import UserError


def _check(args) -> None:
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.lora and not (Path(args.lora) / LORA_FILE).is_file():
        raise UserError(f"--lora {args.lora}: no {LORA_FILE} there (give a run's export/ directory)")
    for path in args.embeddings:
        if not Path(path).exists():
            raise UserError(f"--embeddings {path}: no such file or directory (give learned_embeds.safetensors or its directory)")
    if args.image and not Path(args.image).is_file():
        raise UserError(f"--image {args.image}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")


def build_pipeline(args):
    """The diffusers pipeline ``args`` describe (LoRA, embeddings and scheduler loaded)."""
    try:
        comps = load_components(args.model)
    except ModelNotFoundError as err:
        raise UserError(f"--model: {err}") from None
    if args.scheduler:
        from models.schedulers import make_scheduler

        comps.scheduler = make_scheduler(args.scheduler, comps.scheduler)
    pipe = comps.pipeline()
    if args.image:
        if comps.unet.config.in_channels != 8:
            raise UserError(f"--image: the model's UNet has {comps.unet.config.in_channels} input channels; editing needs an InstructPix2Pix model (8)")
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline(**pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    if args.lora:
        pipe.load_lora_weights(args.lora, weight_name=LORA_FILE)
    for path in args.embeddings:
        pipe.load_textual_inversion(str(path))
    return pipe


def generate(args) -> list[Path]:
    """Writes ``--num-images`` PNGs (seed, seed+1, ...) and returns their paths."""
    _check(args)
    pipe = build_pipeline(args)
    comps_unet = pipe.unet
    native = comps_unet.config.sample_size * pipe.vae_scale_factor
    kwargs = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.lora and args.lora_scale != 1.0:
        kwargs["cross_attention_kwargs"] = {"scale": args.lora_scale}
    if args.image:
        kwargs.update(image=_read_image(args.image), image_guidance_scale=args.image_guidance)
    else:
        kwargs.update(height=args.height or native, width=args.width or native)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.num_images):
        seed = args.seed + i
        image = pipe(args.prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        path = out / f"{i:03d}_seed{seed}.png"
        image.save(path)
        paths.append(path)
    return paths


def _read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"--image {path}: cannot read the image ({err})") from None
