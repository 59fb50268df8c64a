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
``--image --mask`` inpaints with ``StableDiffusionInpaintPipeline`` (SDXL: ``StableDiffusionXLInpaintPipeline``),
which takes a dedicated 9-channel inpainting UNet or a 4-channel text-to-image one; ``--paste-back``
then copies the input's pixels back outside the mask (``paste_back``).
docs/sampling.md and docs/inpainting.md have the plain-diffusers equivalent of each.

The options arrive as a ``SampleRequest``: the CLI builds one from its flags (rayjobs/cli.py), a Python caller
builds one directly, and both go through the same checks and the same pipelines.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args, get_type_hints

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open

from models.components import Components, ModelNotFoundError
from models.export import LORA_FILE
from models.loading import load_components
from models.masks import binarize
from models.textual_inversion import SDXL_TI_KEYS, TI_FILE
from rayjobs.config.base import SEED_LIMIT
from rayjobs.config.data import special_file
from rayjobs.config.load import short_repr
from rayjobs.errors import UserError, first_line

TINY_REFINER = "tiny-refiner"  # models/sdxl.build_tiny_refiner, paired with the tiny SDXL's encoder and VAE
MASK_THRESHOLD = 128  # of 255: >= 0.5 repaints (models.masks.binarize, as diffusers' mask processor)
INPAINT_CHANNELS = (4, 9)  # UNet inputs the inpainting pipelines take: text-to-image, or latents + mask + masked-image latents
Scheduler = Literal["ddim", "pndm", "euler", "euler_a", "dpmsolver++"]  # models/schedulers.py's names
PromptWeighting = Literal["none", "compel"]
SCHEDULERS, PROMPT_WEIGHTINGS = get_args(Scheduler), get_args(PromptWeighting)
# The largest --height/--width: 16x SDXL's native 1024 px, far past any Stable Diffusion model's training size;
# a larger side is a typo, and its latents alone would not fit in memory (the process is killed, not refused).
MAX_SIDE = 16384
ECHO_CHARS = 40  # a bad value is echoed in at most this many characters (a 10**30 seed stays readable)


def _echo(value) -> str:
    return short_repr(value, ECHO_CHARS)


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """What to sample: one field per `draftray sample` option (``--num-images`` is ``num_images``), with the CLI's
    defaults. ``generate(request)`` checks it as the CLI does, so errors name the flag (``--steps must be >= 1``).
    Paths may be ``str`` or ``os.PathLike``; they are kept as ``str``, as the flags give them."""

    model: str  # 'tiny', 'tiny-sdxl', 'tiny-inpaint', 'toy', a diffusers-layout directory (SD 1.x or SDXL), or a hub id
    prompt: str  # the text prompt
    out: str  # output directory for the PNGs (created if missing)
    lora: str | None = None  # directory holding pytorch_lora_weights.safetensors (a run's export/)
    negative_prompt: str | None = None  # text for the unconditional branch
    seed: int = 0  # seed of the first image; image i uses seed + i (each in 0 .. 2**32 - 1)
    steps: int = 50  # denoising steps, 1 .. the model's training timesteps (1000)
    guidance: float | None = None  # classifier-free guidance scale; None: the pipeline's (7.5 SD 1.x, 5.0 SDXL)
    height: int | None = None  # pixels, a multiple of 8 up to MAX_SIDE; None: the model's native size
    width: int | None = None  # pixels, a multiple of 8 up to MAX_SIDE; None: the model's native size
    num_images: int = 1  # how many images
    scheduler: Scheduler | None = None  # sampling scheduler; None: the model's
    lora_scale: float = 1.0  # strength of the LoRA (0 = the base model)
    embeddings: tuple[str, ...] = ()  # textual-inversion safetensors files or directories (SDXL: files of clip_l and clip_g rows)
    token: str | None = None  # SDXL embeddings: the token to load them under when the file's metadata names none
    vae: str | None = None  # a VAE in diffusers layout replacing the model's (e.g. the fp16-fix SDXL VAE)
    refiner: str | None = None  # SDXL: a refiner in diffusers layout (or 'tiny-refiner') finishing the base's denoising
    refiner_start: float = 0.8  # with refiner: the fraction of the steps the base runs, in (0, 1)
    prompt_weighting: PromptWeighting = "none"  # 'compel': weighted prompts like '(word)1.3' (needs draftray[compel])
    image: str | None = None  # InstructPix2Pix: the image to edit (8-channel UNet); with mask: the image to inpaint
    image_guidance: float = 1.5  # InstructPix2Pix image guidance scale (with image)
    mask: str | None = None  # inpainting: repaint its white part over image (black = keep; grey thresholded at 0.5)
    strength: float | None = None  # with mask: how much noise covers the masked region, in (0, 1]; None: 1.0
    paste_back: bool = False  # with mask: copy the input's pixels back outside the mask, so only the white part changes

    def __post_init__(self) -> None:
        # The checks and the error messages work on strings (hub ids are strings), so a caller's Path becomes one
        # here; a list of embeddings becomes a tuple so the frozen request stays immutable and comparable.
        for name in ("model", "out", "lora", "vae", "refiner", "image", "mask"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        embeddings = (self.embeddings,) if isinstance(self.embeddings, (str, os.PathLike)) else self.embeddings
        object.__setattr__(self, "embeddings", tuple(os.fspath(p) for p in embeddings))


# The numeric fields, by type: each int reaches torch as a seed, a step count or a tensor side, each float as a
# scale the pipelines multiply by (a NaN guidance scale silently gives an unguided image), so _check refuses
# non-integers and non-finite floats in all of them (tests/test_cli.py checks these lists against the fields).
_HINTS = get_type_hints(SampleRequest)
INT_FIELDS = tuple(f.name for f in fields(SampleRequest) if _HINTS[f.name] in (int, int | None))
FLOAT_FIELDS = tuple(f.name for f in fields(SampleRequest) if _HINTS[f.name] in (float, float | None))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: the pipelines would turn it into inf
        return False


def _check_numbers(request: SampleRequest) -> None:
    """Every int field an integer, every float field a finite number (None where the field allows it)."""
    for name in INT_FIELDS:
        value = getattr(request, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise UserError(f"{_flag(name)} must be an integer, got {_echo(value)}")
    for name in FLOAT_FIELDS:
        value = getattr(request, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"{_flag(name)} must be a number, got {_echo(value)}")
        if not _finite(value):
            raise UserError(f"{_flag(name)} must be a finite number, got {_echo(value)}")


def _local_or_hub(value: str) -> bool:
    """True for an existing path or something shaped like a hub id ("org/name"), which from_pretrained resolves."""
    path = Path(value).expanduser()
    return path.exists() or (value.count("/") == 1 and not path.is_absolute() and not value.startswith("."))


def _check(request: SampleRequest) -> None:
    """Everything checkable before loading a model, so bad input costs nothing and writes nothing."""
    # argparse enforces these choices for the CLI; a Python caller's request has not been through it
    if request.scheduler is not None and request.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {request.scheduler!r}")
    if request.prompt_weighting not in PROMPT_WEIGHTINGS:
        raise UserError(f"--prompt-weighting must be one of {', '.join(PROMPT_WEIGHTINGS)}, got {request.prompt_weighting!r}")
    _check_numbers(request)
    if request.steps < 1:
        raise UserError(f"--steps must be >= 1, got {_echo(request.steps)}")
    if request.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {_echo(request.num_images)}")
    # the config's seed range (rayjobs/config/base.py Seed), for every image's seed + i: torch wraps a negative
    # seed round and fails past 2**64 with a traceback, and a run's config could not name such a seed
    if not 0 <= request.seed < SEED_LIMIT:
        raise UserError(f"--seed must be in 0 <= seed < 2**32 ({SEED_LIMIT}), got {_echo(request.seed)}")
    last = request.seed + request.num_images - 1
    if last >= SEED_LIMIT:
        raise UserError(f"--seed {request.seed} with --num-images {_echo(request.num_images)}: image i uses seed + i, and the last "
                        f"seed, {_echo(last)}, is not below 2**32 ({SEED_LIMIT}); lower --seed or --num-images")  # fmt: skip
    for name in ("height", "width"):
        value = getattr(request, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {_echo(value)}")
        if value is not None and value > MAX_SIDE:
            raise UserError(f"--{name} must be at most {MAX_SIDE} pixels, got {_echo(value)}")
    if request.lora and not (Path(request.lora) / LORA_FILE).is_file():
        raise UserError(f"--lora {request.lora}: no {LORA_FILE} there (give a run's export/ directory)")
    for path in request.embeddings:
        embeddings_file(path)
    if request.image and not Path(request.image).is_file():
        raise UserError(f"--image {request.image}: no such file")
    if request.mask is None:
        for flag, given in (("--strength", request.strength is not None), ("--paste-back", request.paste_back)):
            if given:
                raise UserError(f"{flag} applies to inpainting: give --image and --mask")
    else:
        if not request.image:
            raise UserError("--mask: give the image to inpaint with --image")
        if request.height is not None or request.width is not None:
            raise UserError("--height/--width: an inpainted image has the size of --image; drop them (resize the image and mask instead)")
        if request.refiner:
            raise UserError("--refiner: not supported with --mask (inpainting runs the base model only)")
        strength = 1.0 if request.strength is None else request.strength
        if not 0.0 < strength <= 1.0:
            raise UserError(f"--strength must be in (0, 1], got {strength}")
        if int(request.steps * strength) < 1:
            raise UserError(f"--strength {strength} with --steps {request.steps} leaves no denoising step (int(steps * strength) = 0): raise either")
    if request.vae and (not _local_or_hub(request.vae) or (Path(request.vae).exists() and not (Path(request.vae) / "config.json").is_file())):
        raise UserError(f"--vae {request.vae}: no VAE there (give a diffusers-layout VAE directory with config.json, or a hub id)")
    if not 0.0 < request.refiner_start < 1.0:
        raise UserError(f"--refiner-start must be in (0, 1) (the fraction of steps the base denoises), got {request.refiner_start}")
    if request.refiner and request.refiner != TINY_REFINER and not _local_or_hub(request.refiner):
        raise UserError(f"--refiner {request.refiner}: no such directory (give an SDXL refiner in diffusers layout, or {TINY_REFINER!r})")
    if request.prompt_weighting == "compel" and importlib.util.find_spec("compel") is None:
        raise UserError("--prompt-weighting compel needs compel, which is not installed: pip install 'draftray[compel]'")
    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")


def _components(request: SampleRequest) -> Components:
    try:
        comps = load_components(request.model, vae=request.vae)
    except ModelNotFoundError as err:
        which = "--vae" if request.vae and repr(request.vae) in str(err) else "--model"
        raise UserError(f"{which}: {err}") from None
    if comps.vae.config.latent_channels != comps.unet.config.out_channels:
        raise UserError(f"--vae {request.vae}: {comps.vae.config.latent_channels} latent channels, the UNet has {comps.unet.config.out_channels}")
    if comps.is_sdxl and request.image and not request.mask:
        raise UserError("--image: InstructPix2Pix editing needs an SD 1.x InstructPix2Pix model; this is an SDXL model")
    if request.refiner and not comps.is_sdxl:
        raise UserError(f"--refiner: a refiner continues an SDXL base; {request.model!r} is SD 1.x")
    _check_steps(request, comps.scheduler, "--model")
    return comps


def _check_steps(request: SampleRequest, scheduler, which: str) -> None:
    """No more steps than the timesteps the model was trained on: diffusers' DDIM raises past them (a traceback),
    the other schedulers repeat or interpolate timesteps, and a huge count would allocate its schedule first."""
    limit = scheduler.config.num_train_timesteps
    if request.steps > limit:
        raise UserError(f"--steps must be <= {limit} ({which}'s scheduler has num_train_timesteps {limit}), got {_echo(request.steps)}")


def build_pipeline(request: SampleRequest):
    """The diffusers pipeline ``request`` describes (VAE, LoRA, embeddings and scheduler loaded)."""
    comps = _components(request)
    if request.scheduler:
        from models.schedulers import make_scheduler

        comps.scheduler = make_scheduler(request.scheduler, comps.scheduler)
    pipe = comps.pipeline()
    channels = comps.unet.config.in_channels
    if request.mask:
        pipe = _inpaint_pipeline(pipe, comps)
    elif channels == 9:
        raise UserError("--model: an inpainting model (its UNet has 9 input channels): give --image and --mask")
    elif request.image:
        if comps.unet.config.in_channels != 8:
            raise UserError(f"--image: the model's UNet has {comps.unet.config.in_channels} input channels; editing needs an InstructPix2Pix model (8); to inpaint, add --mask")
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline(**pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    if request.lora:
        try:
            pipe.load_lora_weights(request.lora, weight_name=LORA_FILE)
        except Exception as err:  # noqa: BLE001  (diffusers/peft/safetensors raise ValueError, KeyError, RuntimeError, SafetensorError)
            why = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise UserError(f"--lora {request.lora}: {LORA_FILE} does not fit this model ({why}); give the export/ of a run on --model") from None
    for path in request.embeddings:
        _load_embeddings(pipe, Path(path), comps.is_sdxl, request.token)
    return pipe


def _inpaint_pipeline(pipe, comps: Components):
    """diffusers' inpainting pipeline over the same modules; it takes a 9-channel inpainting UNet (latents, mask,
    masked-image latents) or a 4-channel one (the known region's noised latents are blended in at each step)."""
    channels = comps.unet.config.in_channels
    if channels == 8:
        raise UserError("--mask: this is an InstructPix2Pix model (8 input channels); inpaint with a 4- or 9-channel model, or drop --mask to edit")
    if channels not in INPAINT_CHANNELS:
        raise UserError(f"--mask: the model's UNet has {channels} input channels; inpainting needs 4 (text-to-image) or 9 (an inpainting model)")
    if comps.is_sdxl:
        from diffusers import StableDiffusionXLInpaintPipeline

        pipe = StableDiffusionXLInpaintPipeline(**pipe.components, force_zeros_for_empty_prompt=comps.force_zeros_for_empty_prompt,
                                                add_watermarker=False)  # fmt: skip
    else:
        from diffusers import StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings_file(path: str) -> Path:
    """The safetensors file an ``--embeddings`` value names: the file itself, or ``learned_embeds.safetensors`` in a
    directory; UserError unless it is a readable safetensors file. Embeddings are read as safetensors only, never
    unpickled (docs/security.md); the header is read without opening a FIFO or loading a model."""
    given = Path(path)
    hint = f"safetensors expected (give {TI_FILE}, or a run's export/ directory)"
    if not given.exists():
        raise UserError(f"--embeddings {path}: no such file or directory; {hint}")
    file = given / TI_FILE if given.is_dir() else given
    if given.is_dir() and not file.exists():
        several = sorted(p.name for p in given.glob("learned_embeds_*.safetensors"))
        if several:  # an export of several placeholders: one file each (models/textual_inversion.py)
            hint = f"safetensors expected (several placeholders: give each file, --embeddings {given / several[0]} ...)"
        raise UserError(f"--embeddings {path}: no {TI_FILE} in this directory; {hint}")
    kind = special_file(file)
    if kind is not None or not file.is_file():  # a FIFO would block the read until something writes to it
        raise UserError(f"--embeddings {file}: {kind or 'not a regular file'}, not a file to read; {hint}")
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001  (SafetensorError for a pickle, garbage or a cut-off file; OSError)
        raise UserError(f"--embeddings {path}: not a readable .safetensors file ({first_line(err)}); {hint}") from None
    return file


def _load_embeddings(pipe, path: Path, is_sdxl: bool, token: str | None) -> None:
    """SD 1.x: diffusers reads the file (its key is the token). SDXL: the file's ``clip_l`` rows go to
    the first encoder and ``clip_g`` to the second, under one token (metadata "token", else ``--token``)."""
    file = embeddings_file(str(path))
    with safe_open(str(file), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata() or {}
    try:
        if not set(SDXL_TI_KEYS) <= keys:
            if is_sdxl:
                raise UserError(f"--embeddings {path}: an SDXL model needs a .safetensors file with {' and '.join(SDXL_TI_KEYS)} rows")
            if len(keys) != 1:  # diffusers' own error would print the tensors
                names = ", ".join(sorted(keys)[:4]) + (", ..." if len(keys) > 4 else "")
                raise UserError(f"--embeddings {path}: {len(keys)} tensors ({names or 'none'}); an SD 1.x embedding file holds one, named by its token")
            pipe.load_textual_inversion(str(file), use_safetensors=True)  # safetensors only: no fallback to a pickle
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
        raise UserError(f"--embeddings {path}: {first_line(err)}; give embeddings trained for --model's text encoder") from None


def build_refiner(request: SampleRequest, base):
    """``StableDiffusionXLImg2ImgPipeline`` with the refiner's UNet (and scheduler), sharing the base's VAE,
    second text encoder and tokenizer; the refiner has no first encoder. Sharing ``tokenizer_2`` (the same
    OpenCLIP tokenizer in the released models) keeps embeddings loaded into the base usable by the refiner."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    shared = dict(vae=base.vae, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    if request.refiner == TINY_REFINER:
        from models.sdxl import SDXL_SCHEDULER, build_tiny_refiner

        refiner = StableDiffusionXLImg2ImgPipeline(
            **shared, text_encoder=None, tokenizer=None, unet=build_tiny_refiner(), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
        )  # fmt: skip
    else:
        try:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(request.refiner, **shared, add_watermarker=False)
        except (OSError, ValueError) as err:
            raise UserError(f"--refiner {request.refiner}: could not be loaded: {str(err).strip().splitlines()[0]}") from None
    width = base.text_encoder_2.config.hidden_size
    if refiner.unet.config.cross_attention_dim != width:
        raise UserError(f"--refiner: its UNet attends to {refiner.unet.config.cross_attention_dim}-d text, the base's text_encoder_2 gives {width}")
    if request.scheduler:
        from models.schedulers import make_scheduler

        refiner.scheduler = make_scheduler(request.scheduler, refiner.scheduler)
    _check_steps(request, refiner.scheduler, "--refiner")
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _text(request: SampleRequest, pipe, sdxl: bool, lora_scale: float | None) -> dict:
    """The prompt arguments: the text itself, or compel's weighted embeddings. SDXL gets ``None`` for an empty
    negative prompt, so ``force_zeros_for_empty_prompt`` applies as in plain diffusers."""
    negative = (request.negative_prompt or None) if sdxl else request.negative_prompt
    if request.prompt_weighting != "compel":
        return dict(prompt=request.prompt, negative_prompt=negative)
    from models.prompt_weighting import weighted_embeddings

    return weighted_embeddings(pipe, request.prompt, negative, lora_scale=lora_scale)


def generate(request: SampleRequest) -> list[Path]:
    """Writes ``request.num_images`` PNGs (seed, seed+1, ...) to ``request.out`` and returns their paths."""
    _check(request)
    inpaint = read_inpaint_inputs(request.image, request.mask) if request.mask else None  # before the model: bad files cost nothing
    pipe = build_pipeline(request)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    refiner = build_refiner(request, pipe) if request.refiner else None
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    guidance = {} if request.guidance is None else {"guidance_scale": request.guidance}  # None: the pipeline's own default
    kwargs = dict(num_inference_steps=request.steps, **guidance)
    lora_scale = request.lora_scale if request.lora and request.lora_scale != 1.0 else None
    if lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
    if inpaint is not None:
        if inpaint.image.width % pipe.vae_scale_factor or inpaint.image.height % pipe.vae_scale_factor:
            raise UserError(f"--image {request.image}: {inpaint.image.width}x{inpaint.image.height}, not a multiple of the VAE's {pipe.vae_scale_factor}")
        strength = 1.0 if request.strength is None else request.strength
        kwargs.update(image=inpaint.image, mask_image=inpaint.mask, strength=strength, height=inpaint.image.height, width=inpaint.image.width)
    elif request.image:
        kwargs.update(image=_read_image(request.image), image_guidance_scale=request.image_guidance)
    else:
        kwargs.update(height=request.height or native, width=request.width or native)
    text = _text(request, pipe, sdxl, lora_scale)
    refiner_text = _text(request, refiner, True, None) if refiner else None
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(request.num_images):
        seed = request.seed + i
        generator = torch.Generator().manual_seed(seed)
        if refiner is None:
            image = pipe(**text, generator=generator, **kwargs).images[0]
        else:
            latents = pipe(**text, generator=generator, denoising_end=request.refiner_start, output_type="latent", **kwargs).images
            image = refiner(**refiner_text, image=latents, denoising_start=request.refiner_start, num_inference_steps=request.steps,
                            generator=generator, **guidance).images[0]  # fmt: skip
        if inpaint is not None and request.paste_back:
            image = paste_back(image, inpaint.image, inpaint.mask)
        path = out / f"{i:03d}_seed{seed}.png"
        image.save(path)
        paths.append(path)
    return paths


def _read_image(path: str, flag: str = "--image", mode: str = "RGB") -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"{flag} {path}: cannot read the image ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from None


@dataclass
class InpaintFiles:
    image: Image.Image  # RGB
    mask: Image.Image  # "L", binarised: 255 = repaint, 0 = keep; the size of image


def binarize_mask(mask: Image.Image) -> tuple[Image.Image, bool]:
    """The mask in grey levels ("L", as diffusers' mask processor converts it), thresholded at 0.5 like diffusers
    (>= 128 of 255 -> 255 = repaint, else 0 = keep); and whether it held grey values (anything but 0 and 255)."""
    grey = torch.from_numpy(np.asarray(mask.convert("L")).astype(np.float32) / 255)  # [H, W] in [0, 1]
    binary, was_binary = binarize(grey)  # models/masks.py: the threshold the training masks use too
    return Image.fromarray((binary.numpy() * 255).astype(np.uint8)), not was_binary


def read_inpaint_inputs(image_path: str, mask_path: str) -> InpaintFiles:
    """Read and check ``--image`` and ``--mask`` (one UserError line each); says on stderr when grey is thresholded."""
    if not Path(mask_path).is_file():
        raise UserError(f"--mask {mask_path}: no such file")
    image = _read_image(image_path)
    mask, had_grey = binarize_mask(_read_image(mask_path, "--mask", "L"))
    if mask.size != image.size:
        raise UserError(f"--mask {mask_path}: {mask.width}x{mask.height}, but --image is {image.width}x{image.height}; they must match")
    if image.width % 8 or image.height % 8:
        raise UserError(f"--image {image_path}: {image.width}x{image.height}; inpainting needs both sides a multiple of 8 (resize image and mask)")
    values = np.asarray(mask)
    if not values.any():
        raise UserError(f"--mask {mask_path}: no white pixel, nothing to repaint (white = repaint, black = keep)")
    if values.all():
        raise UserError(f"--mask {mask_path}: all white, the whole image would be repainted: use text-to-image (drop --image and --mask) instead")
    if had_grey:
        print(f"draftray: note: --mask {mask_path} has grey values; thresholded at 0.5 (>= {MASK_THRESHOLD}/255 repaints, below keeps)", file=sys.stderr)
    return InpaintFiles(image, mask)


def paste_back(generated: Image.Image, image: Image.Image, mask: Image.Image) -> Image.Image:
    """``mask * generated + (1 - mask) * image`` in pixel space, with ``mask`` binarised at 0.5 (white = 1): outside
    the mask the result is ``image`` exactly. The latents cover 8x8 pixel cells (the VAE's factor) and the VAE
    re-encodes the known region lossily, so without this the kept region only approximates the input. For a binary
    mask this equals diffusers' ``VaeImageProcessor.apply_overlay(mask, image, generated)``."""
    if not generated.size == image.size == mask.size:
        raise ValueError(f"paste_back: sizes differ: generated {generated.size}, image {image.size}, mask {mask.size}")
    keep = np.asarray(binarize_mask(mask)[0])[..., None] == 0  # [H, W, 1]
    out = np.where(keep, np.asarray(image.convert("RGB")), np.asarray(generated.convert("RGB")))
    return Image.fromarray(out.astype(np.uint8))
