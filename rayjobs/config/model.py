"""The model and memory sections of the config (rayjobs/config/root.py holds the rest)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayjobs.config.base import Strict


class ModelConfig(Strict):
    name_or_path: str = Field(
        "toy",
        description="'toy' (the shipped pretrained toy-world model), 'tiny' (random SD 1.x-architecture weights, seeded, "
        "built in code), 'tiny-sdxl' (the same for the SDXL architecture: two text encoders, pooled embeddings, "
        "size/crop time ids), a local diffusers-layout directory (SDXL when it has text_encoder_2/), or a hub id",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) when name_or_path is a hub id")
    vae: str | None = Field(
        None,
        description="another VAE (diffusers layout: a directory with config.json, or a hub id) replacing the model's, e.g. "
        "the fp16-fix SDXL VAE (madebyollin/sdxl-vae-fp16-fix): SDXL's own VAE overflows in float16. None = the model's",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="compute dtype of the frozen weights (autocast); trainable weights always stay float32. "
        "float16 adds dynamic loss scaling (torch.amp.GradScaler: a step whose gradients overflow is skipped "
        "and the scale halves) and keeps the VAE in float32 (SD's VAE overflows in float16). bfloat16 is the "
        "better choice on A100/H100",
    )


class MemoryConfig(Strict):
    """Switches that trade compute for memory; none changes the result (tests/test_sdxl_memory.py).

    The UNet's own switch is trainable.gradient_checkpointing (the K gradient steps and the denoise terms).
    At 1024 px (SDXL) the VAE decoder and the reward hold GBs of activations for the backward pass.
    """

    vae_checkpointing: bool = Field(False, description="recompute the VAE decoder's activations in backward (one more decode per step)")
    reward_checkpointing: bool = Field(False, description="recompute the reward model's activations in backward (one more reward forward)")
    vae_slicing: bool = Field(False, description="decode the batch one image at a time (diffusers' enable_slicing): lower peak, same images")
    vae_tiling: bool = Field(
        False, description="decode in overlapping tiles, blended (diffusers' enable_tiling): for large images; seams are blended, "
        "so images differ slightly from an untiled decode"
    )
