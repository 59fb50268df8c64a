"""`draftray sample`: plain diffusers inference, so every image is reproducible outside draftray.

Text-to-image runs the model's own pipeline (``Components.pipeline()``: ``StableDiffusionPipeline``, or
``StableDiffusionXLPipeline`` for SDXL); ``--image`` runs ``StableDiffusionInstructPix2PixPipeline``
(three-branch guidance: uncond + gs (text - image) + igs (image - uncond)) over the same components.
A LoRA loads with ``load_lora_weights`` (its strength is ``--lora-scale``), embeddings with
``load_textual_inversion`` (SDXL files hold ``clip_l`` and ``clip_g`` rows, one per encoder),
``--scheduler`` swaps the scheduler (built from the model's schedule) and ``--vae`` the VAE.
``--refiner`` hands the base's latents over at ``--refiner-start`` to ``StableDiffusionXLImg2ImgPipeline``
with the refiner's UNet, as diffusers' SDXL docs do ("ensemble of expert denoisers").
``--prompt-weighting compel`` passes compel's embeddings (models/prompt_weighting.py) instead of the text.
docs/sampling.md has the plain-diffusers equivalent of each.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from models.components import Components, ModelNotFoundError, load_components
from models.export import LORA_FILE
from models.textual_inversion import TI_FILE
from rayjobs.errors import UserError

TINY_REFINER = "tiny-refiner"  # models/sdxl.build_tiny_refiner, paired with the tiny SDXL's encoder and VAE
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # an SDXL embedding file: rows for text_encoder, text_encoder_2


def _local_or_hub(value: str) -> bool:
    """True for an existing path or something shaped like a hub id ("org/name"), which from_pretrained resolves."""
    path = Path(value).expanduser()
    return path.exists() or (value.count("/") == 1 and not path.is_absolute() and not value.startswith("."))


def _check(args) -> None:
    """Everything checkable before loading a model, so bad input costs nothing and writes nothing."""
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
    if args.vae and (not _local_or_hub(args.vae) or (Path(args.vae).exists() and not (Path(args.vae) / "config.json").is_file())):
        raise UserError(f"--vae {args.vae}: no VAE there (give a diffusers-layout VAE directory with config.json, or a hub id)")
    if not 0.0 < args.refiner_start < 1.0:
        raise UserError(f"--refiner-start must be in (0, 1) (the fraction of steps the base denoises), got {args.refiner_start}")
    if args.refiner and args.refiner != TINY_REFINER and not _local_or_hub(args.refiner):
        raise UserError(f"--refiner {args.refiner}: no such directory (give an SDXL refiner in diffusers layout, or {TINY_REFINER!r})")
    if args.prompt_weighting == "compel" and importlib.util.find_spec("compel") is None:
        raise UserError("--prompt-weighting compel needs compel, which is not installed: pip install 'draftray[compel]'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")


def _components(args) -> Components:
    try:
        comps = load_components(args.model, vae=args.vae)
    except ModelNotFoundError as err:
        which = "--vae" if args.vae and repr(args.vae) in str(err) else "--model"
        raise UserError(f"{which}: {err}") from None
    if comps.vae.config.latent_channels != comps.unet.config.out_channels:
        raise UserError(f"--vae {args.vae}: {comps.vae.config.latent_channels} latent channels, the UNet has {comps.unet.config.out_channels}")
    if comps.is_sdxl and args.image:
        raise UserError("--image: InstructPix2Pix editing needs an SD 1.x InstructPix2Pix model; this is an SDXL model")
    if args.refiner and not comps.is_sdxl:
        raise UserError(f"--refiner: a refiner continues an SDXL base; {args.model!r} is SD 1.x")
    return comps


def build_pipeline(args):
    """The diffusers pipeline ``args`` describe (VAE, LoRA, embeddings and scheduler loaded)."""
    comps = _components(args)
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
        _load_embeddings(pipe, Path(path), comps.is_sdxl, args.token)
    return pipe


def _load_embeddings(pipe, path: Path, is_sdxl: bool, token: str | None) -> None:
    """SD 1.x: diffusers reads the file (its key is the token). SDXL: the file's ``clip_l`` rows go to
    the first encoder and ``clip_g`` to the second, under one token (metadata "token", else ``--token``)."""
    from safetensors import safe_open

    file = path / TI_FILE if path.is_dir() else path
    keys, metadata = set(), {}
    if file.suffix == ".safetensors" and file.is_file():
        with safe_open(str(file), framework="pt") as f:
            keys, metadata = set(f.keys()), f.metadata() or {}
    try:
        if not set(SDXL_EMBEDDING_KEYS) <= keys:
            if is_sdxl:
                raise UserError(f"--embeddings {path}: an SDXL model needs a .safetensors file with {' and '.join(SDXL_EMBEDDING_KEYS)} rows")
            pipe.load_textual_inversion(str(path))
            return
        if not is_sdxl:
            raise UserError(f"--embeddings {path}: an SDXL embedding file (clip_l/clip_g), but the model is SD 1.x")
        token = metadata.get("token") or token
        if not token:
            raise UserError(f"--embeddings {path}: the file names no token (safetensors metadata 'token'): give --token")
        from safetensors.torch import load_file

        rows = load_file(str(file))
        pipe.load_textual_inversion(rows["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    except ValueError as err:
        raise UserError(f"--embeddings {path}: {str(err).strip().splitlines()[0]}") from None


def build_refiner(args, base):
    """``StableDiffusionXLImg2ImgPipeline`` with the refiner's UNet (and scheduler), sharing the base's VAE,
    second text encoder and tokenizer; the refiner has no first encoder. Sharing ``tokenizer_2`` (the same
    OpenCLIP tokenizer in the released models) keeps embeddings loaded into the base usable by the refiner."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    shared = dict(vae=base.vae, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    if args.refiner == TINY_REFINER:
        from models.sdxl import SDXL_SCHEDULER, build_tiny_refiner

        refiner = StableDiffusionXLImg2ImgPipeline(
            **shared, text_encoder=None, tokenizer=None, unet=build_tiny_refiner(), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
        )  # fmt: skip
    else:
        try:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(args.refiner, **shared, add_watermarker=False)
        except (OSError, ValueError) as err:
            raise UserError(f"--refiner {args.refiner}: could not be loaded: {str(err).strip().splitlines()[0]}") from None
    width = base.text_encoder_2.config.hidden_size
    if refiner.unet.config.cross_attention_dim != width:
        raise UserError(f"--refiner: its UNet attends to {refiner.unet.config.cross_attention_dim}-d text, the base's text_encoder_2 gives {width}")
    if args.scheduler:
        from models.schedulers import make_scheduler

        refiner.scheduler = make_scheduler(args.scheduler, refiner.scheduler)
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _text(args, pipe, sdxl: bool, lora_scale: float | None) -> dict:
    """The prompt arguments: the text itself, or compel's weighted embeddings. SDXL gets ``None`` for an empty
    negative prompt, so ``force_zeros_for_empty_prompt`` applies as in plain diffusers."""
    negative = (args.negative_prompt or None) if sdxl else args.negative_prompt
    if args.prompt_weighting != "compel":
        return dict(prompt=args.prompt, negative_prompt=negative)
    from models.prompt_weighting import weighted_embeddings

    return weighted_embeddings(pipe, args.prompt, negative, lora_scale=lora_scale)


def generate(args) -> list[Path]:
    """Writes ``--num-images`` PNGs (seed, seed+1, ...) and returns their paths."""
    _check(args)
    pipe = build_pipeline(args)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    refiner = build_refiner(args, pipe) if args.refiner else None
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}  # None: the pipeline's own default
    kwargs = dict(num_inference_steps=args.steps, **guidance)
    lora_scale = args.lora_scale if args.lora and args.lora_scale != 1.0 else None
    if lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
    if args.image:
        kwargs.update(image=_read_image(args.image), image_guidance_scale=args.image_guidance)
    else:
        kwargs.update(height=args.height or native, width=args.width or native)
    text = _text(args, pipe, sdxl, lora_scale)
    refiner_text = _text(args, refiner, True, None) if refiner else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.num_images):
        seed = args.seed + i
        generator = torch.Generator().manual_seed(seed)
        if refiner is None:
            image = pipe(**text, generator=generator, **kwargs).images[0]
        else:
            latents = pipe(**text, generator=generator, denoising_end=args.refiner_start, output_type="latent", **kwargs).images
            image = refiner(**refiner_text, image=latents, denoising_start=args.refiner_start, num_inference_steps=args.steps,
                            generator=generator, **guidance).images[0]  # fmt: skip
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
