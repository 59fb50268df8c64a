"""Stable Diffusion XL: the built-in tiny SDXL-architecture model, and what loading a real one needs.

SDXL (Podell et al. 2023) differs from SD 1.x in its conditioning (models/conditioning.py): two
text encoders (CLIP ViT-L and OpenCLIP bigG, the second with a projection whose pooled output
conditions the UNet too), six size/crop "time ids", and a UNet with ``addition_embed_type
"text_time"``. Its released scheduler is EulerDiscreteScheduler; its VAE overflows in float16
(use the fp16-fix VAE through ``model.vae``, or keep the VAE in float32).

``build_tiny_sdxl`` mirrors the architecture at toy size (diffusers' own SDXL pipeline tests use
the same shape): a UNet with a plain DownBlock2D first and cross-attention below it, two resnets
per level, 1 and 2 transformer layers, linear projections; two tiny CLIP text encoders with the
full CLIP BPE vocabulary, the second with a projection. Seeded, random, no download.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.components import Components, frozen
from models.tokenizer import build_clip_tokenizer

TINY_SDXL_SEED = 0  # the tiny SDXL model's weights are a pure function of this seed
TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)
SDXL_VAE_SCALING = 0.13025  # vae/config.json scaling_factor of SDXL (SD 1.x: 0.18215)


def _text_config(hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,  # the full CLIP BPE vocabulary: any prompt tokenises as in SDXL
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # SDXL reads the penultimate hidden states: more than 2 layers keeps that non-trivial
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )


def _tiny_unet(image_size: int, cross_attention_dim: int, time_ids: int, time_dim: int, pooled: int) -> UNet2DConditionModel:
    """The tiny SDXL-shaped UNet: a plain first down block, cross-attention below, 2 resnets per level,
    1 and 2 transformer layers, linear projections, ``text_time`` added conditioning of
    ``time_ids * time_dim + pooled`` inputs. Draws from the global RNG (callers seed it)."""
    return UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_ids * time_dim + pooled,
        norm_num_groups=16,
    )


def build_tiny_sdxl(seed: int = TINY_SDXL_SEED, image_size: int = 32) -> Components:
    """A tiny SDXL-architecture model, seeded, frozen: 32 px images, 4x16x16 latents, text 16 + 32 = 48-d, pooled 32-d."""
    te1, te2, pooled = 16, 32, 32
    time_dim = 8
    with torch.random.fork_rng():  # constructors draw from the global RNG: callers are unaffected
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=image_size,
            scaling_factor=SDXL_VAE_SCALING,
            force_upcast=True,
        )
        unet = _tiny_unet(image_size, cross_attention_dim=te1 + te2, time_ids=TIME_IDS, time_dim=time_dim, pooled=pooled)
        text_encoder = CLIPTextModel(_text_config(te1, te1))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(te2, pooled))
    return frozen(
        Components(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=build_clip_tokenizer(),
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            text_encoder_2=text_encoder_2,
            tokenizer_2=build_clip_tokenizer(),  # its own object: textual inversion adds tokens to each
            force_zeros_for_empty_prompt=True,
        )
    )


REFINER_TIME_IDS = 5  # original (h, w), crop (top, left), aesthetic score: the refiner's add_time_ids


def build_tiny_refiner(seed: int = TINY_SDXL_SEED, image_size: int = 32) -> UNet2DConditionModel:
    """A tiny SDXL-refiner-architecture UNet, seeded, frozen, to pair with ``build_tiny_sdxl``.

    The released refiner conditions on the second text encoder only (cross_attention_dim = its width,
    32 here) and on 5 time ids, the aesthetic score replacing the target size, so
    ``projection_class_embeddings_input_dim = 5 * addition_time_embed_dim + pooled``. It has no text
    encoder, tokenizer or VAE of its own: a refiner pipeline shares the base's ``text_encoder_2``,
    ``tokenizer_2`` and ``vae`` (as diffusers' SDXL docs load it), and needs ``requires_aesthetics_score=True``.
    """
    te2, pooled, time_dim = 32, 32, 8
    with torch.random.fork_rng():  # constructors draw from the global RNG: callers are unaffected
        torch.manual_seed(seed)
        unet = _tiny_unet(image_size, cross_attention_dim=te2, time_ids=REFINER_TIME_IDS, time_dim=time_dim, pooled=pooled)
    return unet.requires_grad_(False).eval()
