"""Export trained weights in the layouts diffusers (and other tools) load.

LoRA: ``pytorch_lora_weights.safetensors`` with diffusers/PEFT keys
(``unet.<module>.lora_A.weight`` ...) plus the adapter metadata (rank, alpha,
targets), read by ``StableDiffusionPipeline.load_lora_weights(dir)``.
Full fine-tuning: ``unet/`` in diffusers layout (``UNet2DConditionModel.from_pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict

from models.policy import Policy

LORA_FILE = "pytorch_lora_weights.safetensors"


def export(policy: Policy, directory: str | os.PathLike) -> Path:
    """Write the trained weights under ``directory``; returns the path a user loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if policy.trainable == "lora":
        return export_lora(policy, directory)
    policy.unet.save_pretrained(directory / "unet")
    return directory / "unet"


def export_lora(policy: Policy, directory: Path) -> Path:
    layers = get_peft_model_state_dict(policy.unet)  # PEFT keys without the adapter name
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    metadata = policy.lora_config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # set -> JSON-able list
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=metadata,
        weight_name=LORA_FILE,
    )
    return directory / LORA_FILE
