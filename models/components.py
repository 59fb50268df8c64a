"""Stable Diffusion 1.x and SDXL components: loaded from diffusers layout, or the built-in tiny models.

``load_components("tiny")`` builds a small SD-architecture model in code from a
fixed seed (random weights, no download); ``"toy"`` is the pretrained toy-world
model shipped in models/weights/toy; ``"tiny-sdxl"`` is a small SDXL-architecture model built in
code (models/sdxl.py); any other name is a local directory or hub id in diffusers layout
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, and for SDXL
``text_encoder_2/`` + ``tokenizer_2/``). All weights come back frozen (``requires_grad=False``);
the adapters module decides what trains.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.tokenizer import build_clip_tokenizer

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"  # models/sdxl.build_tiny_sdxl
TINY_INPAINT = "tiny-inpaint"  # build_tiny(unet_in_channels=9): an inpainting UNet (latents, mask, masked image)
BUILT_IN = (TINY, TINY_SDXL, TINY_INPAINT)  # built in code from a seed: nothing to load
TINY_SEED = 0  # the random tiny model's weights are a pure function of this seed
TOY = "toy"
# The toy world's pretrained model, shipped with the package (model card in its README.md; docs/toy-world.md).
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
    """The pieces of a Stable Diffusion model: SD 1.x has five, SDXL adds a second text encoder and tokenizer."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL: OpenCLIP bigG, with the pooled projection
    tokenizer_2: CLIPTokenizer | None = None  # SDXL
    # SDXL: an empty negative prompt is all-zero states (model_index.json; diffusers' default True)
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return mods | ({"text_encoder_2": self.text_encoder_2} if self.is_sdxl else {})

    def pipeline(self):
        """diffusers' StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over these very modules
        (no safety checker, no watermark, no progress bar)."""
        if self.is_sdxl:
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        else:
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
    seed: int, vae_channels: tuple[int, ...], unet_channels: tuple[int, ...], image_size: int, text_dim: int, text_ff: int,
    unet_in_channels: int = 4,
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
            in_channels=unet_in_channels,
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


def build_tiny(seed: int = TINY_SEED, unet_in_channels: int = 4) -> Components:
    """A tiny SD-architecture model, seeded, frozen: 32 px images, 4x16x16 latents, 32-d text.
    ``unet_in_channels`` 9: the SD inpainting architecture (latents, mask, masked-image latents)."""
    return frozen(build_small_sd(seed, vae_channels=(32, 64), unet_channels=(32, 64), image_size=32, text_dim=32, text_ff=64,
                                 unet_in_channels=unet_in_channels))


def frozen(comps: Components) -> Components:
    for module in comps.modules().values():
        module.requires_grad_(False)
        module.eval()
    return comps


def save_components(comps: Components, directory: str | os.PathLike) -> None:
    """Write components in diffusers layout, model_index.json included (``StableDiffusionPipeline.from_pretrained``,
    ``StableDiffusionXLPipeline.from_pretrained`` for SDXL)."""
    comps.pipeline().save_pretrained(directory)
