"""Export trained weights in the layouts diffusers (and the A1111/kohya tools) load. See docs/exports.md.

LoRA: ``pytorch_lora_weights.safetensors`` with diffusers/PEFT keys (``unet.<module>.lora_A.weight``,
``text_encoder.<module>...`` when the text encoder has a LoRA) plus the adapter metadata (rank,
alpha, targets), read by ``StableDiffusionPipeline.load_lora_weights(dir)``; and the same LoRA as
``kohya_lora.safetensors`` (``lora_unet_*``/``lora_te_*``), read by A1111/ComfyUI/kohya and by
``load_lora_weights(dir, weight_name="kohya_lora.safetensors")``.
Textual inversion: ``learned_embeds.safetensors`` (``load_textual_inversion(dir)``).
Fully trained text encoder beside a UNet LoRA: ``text_encoder/`` + ``tokenizer/``
(``CLIPTextModel.from_pretrained(dir, subfolder="text_encoder")``).
Full fine-tuning: a complete pipeline directory (``StableDiffusionPipeline.from_pretrained(dir)``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from models.components import Components
from models.kohya import KOHYA_FILE, KohyaUnsupportedError, kohya_metadata, to_kohya
from models.policy import Policy
from models.textual_inversion import ExtendedEmbedding, export_textual_inversion, trainable_rows

LORA_FILE = "pytorch_lora_weights.safetensors"
EXPORT_INFO = "draftray_export.json"  # what a full export holds: {"trained": ["unet", ...]}


def export(policy: Policy, directory: str | os.PathLike) -> Path:
    """Write the trained weights under ``directory``; returns the path a user loads first.

    Full UNet: the pipeline directory itself (text encoder, new tokens and its LoRA merged in).
    Otherwise each trained part in its own format, side by side: the LoRA files (UNet and/or text
    encoder; returned), ``text_encoder/`` + ``tokenizer/`` for a fully trained text encoder, and the
    textual-inversion file for new tokens (returned when it is the only export).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    comps = policy.components
    if policy.trainable == "full":
        return export_full(comps, directory, text_encoder_trained=_text_encoder_trained(comps.text_encoder))
    written = []
    te_layers = _peft_layers(comps.text_encoder) if _adapter_config(comps.text_encoder) else None
    if policy.trainable == "lora" or te_layers:
        written.append(export_lora(policy, directory, text_encoder_layers=te_layers))
    if _text_encoder_fully_trained(comps.text_encoder):
        written.append(export_text_encoder(comps, directory))
    rows = trainable_rows(comps.text_encoder)
    if rows is not None:
        tokens = getattr(policy, "tokens", None) or placeholder_tokens(comps.tokenizer, comps.text_encoder)
        written.append(export_textual_inversion(directory, tokens, rows))
    if not written:
        raise ValueError("nothing trained to export: no LoRA, no text-encoder weights, no new tokens")
    return written[0]


def _peft_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT LoRA state of ``module`` (keys without the adapter name), float32 on the CPU."""
    layers = get_peft_model_state_dict(module)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}


def _lora_metadata(config: LoraConfig) -> dict:
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # set -> JSON-able list
    return metadata


def _adapter_config(module: torch.nn.Module) -> LoraConfig | None:
    """The module's (first) PEFT LoraConfig, or None without adapters."""
    configs = getattr(module, "peft_config", None) or {}
    return next(iter(configs.values()), None)


def export_lora(policy: Policy, directory: str | os.PathLike, text_encoder_layers: dict | None = None,
                text_encoder_config: LoraConfig | None = None) -> Path:
    """Write the UNet LoRA (if the UNet has one) and ``text_encoder_layers`` (PEFT keys of the text
    encoder, if given) as ``pytorch_lora_weights.safetensors`` + ``kohya_lora.safetensors``; returns
    the diffusers file.

    text_encoder_config: the text-encoder LoRA's LoraConfig (rank, alpha); default: the text
    encoder's own ``peft_config``. If a target cannot be written in kohya layout so that diffusers
    reads it back (models/kohya.py), the kohya file is skipped with a warning, never written wrong.
    """
    directory = Path(directory)
    unet_config = policy.lora_config
    unet_layers = _peft_layers(policy.unet) if unet_config is not None else None
    te_config = text_encoder_config or _adapter_config(policy.components.text_encoder)
    if text_encoder_layers and te_config is None:
        raise ValueError("text_encoder_layers given without a LoraConfig (pass text_encoder_config)")
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=unet_layers,
        unet_lora_adapter_metadata=_lora_metadata(unet_config) if unet_layers else None,
        text_encoder_lora_layers=text_encoder_layers or None,
        text_encoder_lora_adapter_metadata=_lora_metadata(te_config) if text_encoder_layers else None,
        weight_name=LORA_FILE,
    )
    _write_kohya(directory, [(unet_layers, unet_config, ""), (text_encoder_layers, te_config, "text_encoder.")])
    return directory / LORA_FILE


def _write_kohya(directory: Path, parts: list[tuple[dict | None, LoraConfig | None, str]]) -> Path | None:
    """kohya_lora.safetensors from (PEFT layers, their LoraConfig, key prefix) parts, each with its own alpha/rank."""
    state: dict[str, torch.Tensor] = {}
    parts = [(layers, config, prefix) for layers, config, prefix in parts if layers]
    try:
        for layers, config, prefix in parts:
            state.update(to_kohya({prefix + k: v for k, v in layers.items()}, alpha=config.lora_alpha, rank=config.r))
    except KohyaUnsupportedError as err:
        warnings.warn(f"{KOHYA_FILE} not written: {err}", stacklevel=3)
        return None
    first = parts[0][1]  # the UNet's config when there is a UNet LoRA
    save_file(state, str(directory / KOHYA_FILE), metadata=kohya_metadata(first.lora_alpha, first.r, state))
    return directory / KOHYA_FILE


def placeholder_tokens(tokenizer, text_encoder: torch.nn.Module) -> dict[str, int]:
    """{placeholder: number of vectors} of the rows an ExtendedEmbedding added, in row order.

    Recovered from the tokenizer: ``<cat>, <cat>_1, <cat>_2`` (consecutive ids) is one placeholder of 3 vectors.
    """
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(embedding, ExtendedEmbedding):
        return {}
    names = tokenizer.convert_ids_to_tokens(list(range(embedding.num_base, embedding.num_embeddings)))
    tokens: dict[str, int] = {}
    head = None
    for name in names:
        if head is not None and name == f"{head}_{tokens[head]}":
            tokens[head] += 1
        else:
            head = name
            tokens[head] = 1
    return tokens


def _text_encoder_trained(text_encoder: torch.nn.Module) -> bool:
    """Any trained text-encoder weight: new token rows, a LoRA, or trainable base weights."""
    if isinstance(text_encoder.get_input_embeddings(), ExtendedEmbedding):
        return True
    return any(p.requires_grad for p in text_encoder.parameters())


def _text_encoder_fully_trained(text_encoder: torch.nn.Module) -> bool:
    """Trainable text-encoder weights other than LoRA matrices and new token rows."""
    rows = trainable_rows(text_encoder)
    return any(p.requires_grad and "lora_" not in n and p is not rows for n, p in text_encoder.named_parameters())


def plain_text_encoder(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """``text_encoder`` as a plain transformers model: LoRA merged into the weights, new token rows
    merged into an ``nn.Embedding`` [V + n_new, D]. A copy when anything is merged; else the model itself."""
    has_lora = any(isinstance(m, BaseTunerLayer) for m in text_encoder.modules())
    if not has_lora and not isinstance(text_encoder.get_input_embeddings(), ExtendedEmbedding):
        return text_encoder
    plain = copy.deepcopy(text_encoder)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()  # W += scale B A for the active adapters
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, module.get_base_layer())
    embedding = plain.get_input_embeddings()
    if isinstance(embedding, ExtendedEmbedding):
        plain.set_input_embeddings(embedding.merged())
    plain._hf_peft_config_loaded = False  # else save_pretrained writes only the adapter
    plain.__dict__.pop("peft_config", None)
    return plain


def export_text_encoder(components: Components, directory: str | os.PathLike) -> Path:
    """``text_encoder/`` (plain, see plain_text_encoder) and ``tokenizer/`` (with any added tokens)
    under ``directory``; returns the text_encoder folder (``CLIPTextModel.from_pretrained(dir, subfolder=...)``)."""
    directory = Path(directory)
    plain_text_encoder(components.text_encoder).save_pretrained(directory / "text_encoder")
    components.tokenizer.save_pretrained(directory / "tokenizer")
    return directory / "text_encoder"


def export_full(components: Components, directory: str | os.PathLike, text_encoder_trained: bool) -> Path:
    """Write a complete diffusers pipeline directory (model_index.json, unet, vae, text_encoder,
    tokenizer, scheduler; no safety checker); returns ``directory``.

    ``StableDiffusionPipeline.from_pretrained(directory)`` loads it offline. text_encoder_trained:
    whether the text encoder is part of the result (new token rows and a text-encoder LoRA are
    merged in; the tokenizer keeps the added tokens); recorded in draftray_export.json. False while
    the text encoder holds trained weights is an error, so the record never claims less than the files hold.
    """
    directory = Path(directory)
    if not text_encoder_trained and _text_encoder_trained(components.text_encoder):
        raise ValueError("the text encoder holds trained weights (new tokens, LoRA or full): "
                         "pass text_encoder_trained=True")
    directory.mkdir(parents=True, exist_ok=True)
    plain = dataclasses.replace(components, text_encoder=plain_text_encoder(components.text_encoder))
    plain.pipeline().save_pretrained(directory)
    trained = ["unet"] + (["text_encoder"] if text_encoder_trained else [])
    (directory / EXPORT_INFO).write_text(json.dumps({"trained": trained}) + "\n", encoding="utf-8")
    return directory
