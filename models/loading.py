"""Loading a model by name: the built-in tiny models, the shipped toy model, or a diffusers-layout directory or hub id
(SD 1.x, or SDXL when it has a second text encoder)."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models import sdxl
from models.components import BUILT_IN, TINY, TINY_INPAINT, TINY_SDXL, TOY, TOY_DIR, Components, ModelNotFoundError, build_tiny, frozen
from models.schedulers import SCHEDULERS


def load_components(name_or_path: str, revision: str | None = None, vae: str | None = None) -> Components:
    """Load components by name: ``tiny``, ``tiny-sdxl``, ``tiny-inpaint``, ``toy``, a local diffusers directory, or a hub id.

    A directory or id with ``text_encoder_2/`` is SDXL (models/sdxl.py). ``vae``: another VAE in
    diffusers layout (a directory with config.json, or a hub id), e.g. the fp16-fix SDXL VAE.
    Hub ids resolve only from the local Hugging Face cache unless the user has
    network access and HF_HUB_OFFLINE is unset; a miss raises ModelNotFoundError.
    """
    if name_or_path in BUILT_IN:
        builders = {TINY: build_tiny, TINY_SDXL: sdxl.build_tiny_sdxl, TINY_INPAINT: lambda: build_tiny(unet_in_channels=9)}
        comps = builders[name_or_path]()
    else:
        check_model_source(name_or_path)
        if name_or_path == TOY:
            name_or_path = str(TOY_DIR)
        comps = _from_pretrained(name_or_path, revision, is_sdxl_source(name_or_path, revision))
    if vae is not None:
        comps.vae = _pretrained(AutoencoderKL, vae, None, None).requires_grad_(False).eval()
    return comps


def _pretrained(cls, name_or_path: str, subfolder: str | None, revision: str | None):
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"model {name_or_path!r} could not be loaded: {first}") from err


def _from_pretrained(name_or_path: str, revision: str | None, is_sdxl: bool) -> Components:
    """SD 1.x loads its scheduler as DDIM (the training sampler's default); SDXL keeps its own
    (EulerDiscreteScheduler in the released model), as the anchor's SDXL DRaFT+ samples with Euler."""
    load = lambda cls, sub: _pretrained(cls, name_or_path, sub, revision)  # noqa: E731
    parts = dict(
        unet=load(UNet2DConditionModel, "unet"),
        vae=load(AutoencoderKL, "vae"),
        text_encoder=load(CLIPTextModel, "text_encoder"),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
    )
    if is_sdxl:
        parts.update(
            text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2"),
            tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
            scheduler=load_scheduler(name_or_path, revision),
            force_zeros_for_empty_prompt=force_zeros(name_or_path, revision),
        )
    else:
        parts["scheduler"] = load(DDIMScheduler, "scheduler")
    return frozen(Components(**parts))


def check_model_source(name_or_path: str) -> None:
    """Cheap check that a model name resolves offline: 'tiny', 'tiny-sdxl', 'toy', or a diffusers-layout directory.

    Hub ids (one '/', no such local path) are left to from_pretrained.
    """
    if name_or_path in BUILT_IN:
        return
    if name_or_path == TOY:
        if not (TOY_DIR / "model_index.json").is_file():
            raise ModelNotFoundError(f"the shipped toy model is missing from {TOY_DIR}; rebuild it with `draftray toy pretrain --out {TOY_DIR}`")
        return
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists()
    if looks_local or name_or_path.count("/") != 1:
        subs = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        if (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir():  # SDXL needs both
            subs += ("text_encoder_2", "tokenizer_2")
        missing = [sub for sub in subs if not (path / sub).is_dir()]
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model path {name_or_path!r} does not exist: give a diffusers-layout directory, a hub id, 'tiny' or 'tiny-sdxl'"
            )
        if missing:
            raise ModelNotFoundError(f"model path {name_or_path!r} lacks {', '.join(missing)}/ (diffusers layout expected)")


def unet_in_channels(name_or_path: str, revision: str | None = None) -> int | None:
    """The UNet's input channels from its config alone (no weights): 4 (text-to-image), 8 (InstructPix2Pix) or
    9 (inpainting); None when the config cannot be read here (a hub id not in the cache)."""
    built_in = {TINY: 4, TINY_SDXL: 4, TINY_INPAINT: 9}
    if name_or_path in built_in:
        return built_in[name_or_path]
    try:
        source = str(TOY_DIR) if name_or_path == TOY else name_or_path
        return int(UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)["in_channels"])
    except (OSError, ValueError, KeyError):
        return None


def model_index(name_or_path: str, revision: str | None) -> dict | None:
    """model_index.json of a local directory or of a hub id ("org/name", from the cache, or fetched where the
    user allows the network, as from_pretrained would), or None when there is none."""
    path = Path(name_or_path).expanduser()
    if (path / "model_index.json").is_file():
        return json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    if path.exists() or path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") != 1:
        return None  # local, or no hub id: nothing to ask the hub
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision)).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - not resolvable offline: from_pretrained reports it
        return None


def is_sdxl_source(name_or_path: str, revision: str | None = None) -> bool:
    """True for the tiny SDXL and for a diffusers layout with a second text encoder."""
    if name_or_path in BUILT_IN or name_or_path == TOY:  # built in code, or shipped
        return name_or_path == TINY_SDXL
    if (Path(name_or_path).expanduser() / "text_encoder_2").is_dir():
        return True
    index = model_index(name_or_path, revision)
    return bool(index and index.get("text_encoder_2") and index["text_encoder_2"][0] is not None)


def force_zeros(name_or_path: str, revision: str | None) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` from model_index.json (diffusers' default: True)."""
    index = model_index(name_or_path, revision) or {}
    return bool(index.get("force_zeros_for_empty_prompt", True))


def load_scheduler(name_or_path: str, revision: str | None):
    """The scheduler the SDXL folder names (Euler for the released base), built from its config."""
    try:
        config = EulerDiscreteScheduler.load_config(name_or_path, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"model {name_or_path!r}: scheduler/ could not be loaded: {err}") from err
    by_class = {cls.__name__: cls for cls in SCHEDULERS.values()}
    return by_class.get(config.get("_class_name"), EulerDiscreteScheduler).from_config(config)
