"""`draftray sample`: plain diffusers inference, so every image is reproducible outside draftray."""

from __future__ import annotations

from pathlib import Path

import torch

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
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")


def generate(args) -> list[Path]:
    """Writes ``--num-images`` PNGs (seed, seed+1, ...) and returns their paths."""
    _check(args)
    try:
        comps = load_components(args.model)
    except ModelNotFoundError as err:
        raise UserError(f"--model: {err}") from None
    pipe = comps.pipeline()
    if args.lora:
        pipe.load_lora_weights(args.lora, weight_name=LORA_FILE)
    native = comps.unet.config.sample_size * comps.vae_scale_factor
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.num_images):
        seed = args.seed + i
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height or native,
            width=args.width or native,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        path = out / f"{i:03d}_seed{seed}.png"
        image.save(path)
        paths.append(path)
    return paths
