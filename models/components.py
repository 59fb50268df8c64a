"""Stable Diffusion 1.x components: loaded from diffusers layout, or the built-in tiny model.

``load_components("tiny")`` builds a small SD-architecture model in code from a
fixed seed (random weights, no download); ``"toy"`` is the pretrained toy-world
model shipped in models/weights/toy; any other name is a local directory or hub id in
diffusers layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``). All weights come back frozen (``requires_grad=False``); the
adapters module decides what trains.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.tokenizer import build_clip_tokenizer

TINY = "tiny"
TINY_SEED = 0  # the random tiny model's weights are a pure function of this seed
TOY = "toy"
# The toy world's pretrained model, shipped with the package (issue 3; model card in its README.md).
TOY_DIR = Path(__file__).parent / "weights" / "toy"

# SD 1.x noise schedule (scheduler_config.json of runwayml/stable-diffusion-v1-5).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@contextlib.contextmanager
def vae_precision(vae: AutoencoderKL, *tensors: torch.Tensor):
    """Runs the VAE in its own weights' dtype and yields ``tensors`` cast to it.

    Under float16 autocast the VAE stays float32 (``Policy.to``), because SD's VAE overflows in
    float16. This is diffusers' ``force_upcast``. Autocast is therefore switched off around it.
    Otherwise (float32, or bfloat16 weights) it changes nothing but the tensors' dtype.
    """
    device = vae.device.type
    upcast = vae.dtype == torch.float32 and torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    with torch.autocast(device, enabled=False) if upcast else contextlib.nullcontext():
        yield tuple(t.to(vae.dtype) for t in tensors)


class ModelNotFoundError(FileNotFoundError):
    """The configured model path or id cannot be resolved offline."""


@dataclass
class Components:
    """The five pieces of a Stable Diffusion 1.x model."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def pipeline(self):
        """diffusers' StableDiffusionPipeline over these very modules (no safety checker, no progress bar)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def build_small_sd(
    seed: int, vae_channels: tuple[int, ...], unet_channels: tuple[int, ...], image_size: int, text_dim: int, text_ff: int
) -> Components:
    """A small SD 1.x-architecture model with random weights drawn from ``seed`` (trainable, not frozen).

    latents: 4 x (image_size / 2^(len(vae_channels)-1))^2; the UNet cross-attends at every level but the
    deepest; the text encoder has the full CLIP BPE vocabulary, 2 layers of width text_dim.
    """
    n = len(unet_channels)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    # Model constructors draw from the global RNG: fork it so callers are unaffected.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            latent_channels=4,
            norm_num_groups=16,
            sample_size=image_size,
        )
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=text_dim,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        text_config = CLIPTextConfig(
            vocab_size=49408,  # the full CLIP BPE vocabulary: any prompt tokenises as in SD
            hidden_size=text_dim,
            intermediate_size=text_ff,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        text_encoder = CLIPTextModel(text_config)
    return Components(unet, vae, text_encoder, build_clip_tokenizer(), DDIMScheduler(**SD15_SCHEDULER))


def build_tiny(seed: int = TINY_SEED) -> Components:
    """A tiny SD-architecture model, seeded, frozen: 32 px images, 4x16x16 latents, 32-d text."""
    return _frozen(build_small_sd(seed, vae_channels=(32, 64), unet_channels=(32, 64), image_size=32, text_dim=32, text_ff=64))


def _frozen(comps: Components) -> Components:
    for module in comps.modules().values():
        module.requires_grad_(False)
        module.eval()
    return comps


def load_components(name_or_path: str, revision: str | None = None) -> Components:
    """Load SD 1.x components by name: ``tiny``, ``toy``, a local diffusers directory, or a hub id.

    Hub ids resolve only from the local Hugging Face cache unless the user has
    network access and HF_HUB_OFFLINE is unset; a miss raises ModelNotFoundError.
    """
    if name_or_path == TINY:
        return build_tiny()
    check_model_source(name_or_path)
    if name_or_path == TOY:
        name_or_path = str(TOY_DIR)
    kwargs = dict(revision=revision)
    try:
        comps = Components(
            unet=UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kwargs),
            vae=AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kwargs),
            scheduler=DDIMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kwargs),
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"model {name_or_path!r} could not be loaded: {first}") from err
    return _frozen(comps)


def check_model_source(name_or_path: str) -> None:
    """Cheap check that a model name resolves offline: 'tiny', 'toy', or a diffusers-layout directory.

    Hub ids (one '/', no such local path) are left to from_pretrained.
    """
    if name_or_path == TINY:
        return
    if name_or_path == TOY:
        if not (TOY_DIR / "model_index.json").is_file():
            raise ModelNotFoundError(f"the shipped toy model is missing from {TOY_DIR}; rebuild it with `draftray toy pretrain --out {TOY_DIR}`")
        return
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists()
    if looks_local or name_or_path.count("/") != 1:
        missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()]
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model path {name_or_path!r} does not exist: give a diffusers-layout directory, a hub id, or 'tiny'"
            )
        if missing:
            raise ModelNotFoundError(f"model path {name_or_path!r} lacks {', '.join(missing)}/ (diffusers layout expected)")


def save_components(comps: Components, directory: str | os.PathLike) -> None:
    """Write components in diffusers layout, model_index.json included (``StableDiffusionPipeline.from_pretrained``)."""
    comps.pipeline().save_pretrained(directory)
