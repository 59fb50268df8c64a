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
SDXL: the same files, written for StableDiffusionXLPipeline: the LoRA file adds ``text_encoder_2.*``
keys, the kohya file uses SGM UNet names and ``lora_te1_``/``lora_te2_`` (models/kohya_sdxl.py), the
embedding file holds ``{"clip_l", "clip_g"}`` rows, and ``text_encoder_2/`` + ``tokenizer_2/`` join
the text-encoder and pipeline exports.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from models.components import Components
from models.export_bytes import save_safetensors, sort_metadata_in_place
from models.kohya import KOHYA_FILE, KohyaUnsupportedError, check_reads_back, kohya_metadata, to_kohya
from models.policy import Policy
from models.textual_inversion import (
    SDXL_TI_KEYS,
    ExtendedEmbedding,
    export_textual_inversion,
    export_textual_inversion_sdxl,
    trainable_rows,
)

LORA_FILE = "pytorch_lora_weights.safetensors"
EXPORT_INFO = "draftray_export.json"  # what a full export holds: {"trained": ["unet", ...]}


def export(policy: Policy, directory: str | os.PathLike) -> Path:
    """Write the trained weights under ``directory``; returns the path a user loads first.

    Full UNet: the pipeline directory itself (text encoder, new tokens and its LoRA merged in).
    Otherwise each trained part in its own format, side by side: the LoRA files (UNet and/or text
    encoder; returned), ``text_encoder/`` + ``tokenizer/`` for a fully trained text encoder, and the
    textual-inversion file for new tokens (returned when it is the only export). SDXL: the same with
    both text encoders.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    comps = policy.components
    encoders = comps.text_encoders
    if policy.trainable == "full":
        return export_full(comps, directory, text_encoder_trained=any(_text_encoder_trained(e) for e in encoders))
    written = []
    te_layers = [_peft_layers(e) if _adapter_config(e) else None for e in encoders]  # SDXL: [te1, te2]
    if policy.trainable == "lora" or any(te_layers):
        te2 = dict(text_encoder_2_layers=te_layers[1]) if comps.is_sdxl else {}
        written.append(export_lora(policy, directory, text_encoder_layers=te_layers[0], **te2))
    if any(_text_encoder_fully_trained(e) for e in encoders):
        written.append(export_text_encoder(comps, directory))
    embeddings = export_tokens(policy, directory)
    if embeddings is not None:
        written.append(embeddings)
    if not written:
        raise ValueError("nothing trained to export: no LoRA, no text-encoder weights, no new tokens")
    return written[0]


def export_tokens(policy: Policy, directory: Path) -> Path | None:
    """The textual-inversion file(s) of the new token rows, or None without any (SD 1.x: {token: rows};
    SDXL: {"clip_l": rows of text_encoder, "clip_g": rows of text_encoder_2}, token in the metadata)."""
    comps = policy.components
    rows, names = {}, {}  # SDXL_TI_KEYS key -> rows [sum n, D_i] / {placeholder: n} of that encoder
    for key, tokenizer, encoder in zip(SDXL_TI_KEYS, comps.tokenizers, comps.text_encoders):
        if trainable_rows(encoder) is not None:
            rows[key], names[key] = trainable_rows(encoder), placeholder_tokens(tokenizer, encoder)
    if not rows:
        return None
    tokens = getattr(policy, "tokens", None) or next(iter(names.values()))
    if not comps.is_sdxl:
        return export_textual_inversion(directory, tokens, rows["clip_l"])
    if len({tuple(n.items()) for n in names.values()}) > 1:
        raise ValueError(f"the SDXL text encoders hold different new tokens {names}: add each placeholder to both")
    return export_textual_inversion_sdxl(directory, tokens, rows)


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
                text_encoder_config: LoraConfig | None = None, text_encoder_2_layers: dict | None = None,
                text_encoder_2_config: LoraConfig | None = None) -> Path:
    """Write the UNet LoRA (if the UNet has one) and ``text_encoder_layers`` (PEFT keys of the text
    encoder, if given) as ``pytorch_lora_weights.safetensors`` + ``kohya_lora.safetensors``; returns
    the diffusers file.

    text_encoder_config: the text-encoder LoRA's LoraConfig (rank, alpha); default: the text
    encoder's own ``peft_config``. SDXL: ``text_encoder_2_layers``/``_config`` likewise for the second
    encoder, and the file is written by StableDiffusionXLPipeline so its loader reads all three parts.
    If a target cannot be written in kohya layout so that diffusers reads it back (models/kohya.py),
    the kohya file is skipped with a warning, never written wrong.
    """
    directory = Path(directory)
    comps = policy.components
    if text_encoder_2_layers and not comps.is_sdxl:
        raise ValueError("text_encoder_2_layers given for a model without a second text encoder")
    unet_config = policy.lora_config
    unet_layers = _peft_layers(policy.unet) if unet_config is not None else None
    parts = [(unet_layers, unet_config, "unet", "")]
    for name, layers, config, encoder in (("text_encoder", text_encoder_layers, text_encoder_config, comps.text_encoder),
                                          ("text_encoder_2", text_encoder_2_layers, text_encoder_2_config, comps.text_encoder_2)):
        config = config or (_adapter_config(encoder) if encoder is not None else None)
        if layers and config is None:
            raise ValueError(f"{name}_layers given without a LoraConfig (pass {name}_config)")
        parts.append((layers, config, name, name + "."))
    saver = StableDiffusionXLPipeline if comps.is_sdxl else StableDiffusionPipeline
    kwargs = {}
    for layers, config, name, _prefix in parts:
        if name == "text_encoder_2" and not comps.is_sdxl:
            continue
        kwargs[f"{name}_lora_layers"] = layers or None
        kwargs[f"{name}_lora_adapter_metadata"] = _lora_metadata(config) if layers else None
    saver.save_lora_weights(directory, weight_name=LORA_FILE, **kwargs)
    sort_metadata_in_place(directory / LORA_FILE)  # safetensors writes metadata keys in a random order (models/export_bytes.py)
    sgm_config = policy.unet.config if comps.is_sdxl else None
    _write_kohya(directory, [(layers, config, prefix) for layers, config, _name, prefix in parts], sgm_config)
    return directory / LORA_FILE


def _write_kohya(directory: Path, parts: list[tuple[dict | None, LoraConfig | None, str]], sgm_config=None) -> Path | None:
    """kohya_lora.safetensors from (PEFT layers, their LoraConfig, key prefix) parts, each with its own alpha/rank.

    sgm_config: the SDXL UNet's config (SGM names, lora_te1_/lora_te2_), None for SD 1.x. Each part is
    checked by to_kohya, and an SDXL file once more as a whole, as diffusers' SDXL reader sees it.
    """
    state: dict[str, torch.Tensor] = {}
    paths: list[str] = []
    parts = [(layers, config, prefix) for layers, config, prefix in parts if layers]
    try:
        for layers, config, prefix in parts:
            prefixed = {prefix + k: v for k, v in layers.items()}
            state.update(to_kohya(prefixed, alpha=config.lora_alpha, rank=config.r, sgm_config=sgm_config))
            paths += sorted({k.rsplit(".lora_", 1)[0] for k in prefixed})
        if sgm_config is not None and len(parts) > 1:
            check_reads_back(state, paths, sgm_config)  # the SGM reader looks at all keys together
    except KohyaUnsupportedError as err:
        warnings.warn(f"{KOHYA_FILE} not written: {err}", stacklevel=3)
        return None
    first = parts[0][1]  # the UNet's config when there is a UNet LoRA
    save_safetensors(state, directory / KOHYA_FILE, metadata=kohya_metadata(first.lora_alpha, first.r, state))
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
    under ``directory``, SDXL also ``text_encoder_2/`` + ``tokenizer_2/``; returns the text_encoder folder
    (``CLIPTextModel.from_pretrained(dir, subfolder=...)``; SDXL's second: CLIPTextModelWithProjection)."""
    directory = Path(directory)
    for suffix, encoder, tokenizer in zip(("", "_2"), components.text_encoders, components.tokenizers):
        plain_text_encoder(encoder).save_pretrained(directory / f"text_encoder{suffix}")
        tokenizer.save_pretrained(directory / f"tokenizer{suffix}")
    return directory / "text_encoder"


def export_full(components: Components, directory: str | os.PathLike, text_encoder_trained: bool) -> Path:
    """Write a complete diffusers pipeline directory (model_index.json, unet, vae, text_encoder,
    tokenizer, scheduler; no safety checker; SDXL adds text_encoder_2, tokenizer_2); returns ``directory``.

    ``StableDiffusionPipeline.from_pretrained(directory)`` (SDXL: ``StableDiffusionXLPipeline``) loads
    it offline. text_encoder_trained: whether the text encoders are part of the result (new token rows
    and a text-encoder LoRA are merged in; the tokenizers keep the added tokens); recorded in
    draftray_export.json. False while a text encoder holds trained weights is an error, so the record
    never claims less than the files hold.
    """
    directory = Path(directory)
    if not text_encoder_trained and any(_text_encoder_trained(e) for e in components.text_encoders):
        raise ValueError("the text encoder holds trained weights (new tokens, LoRA or full): "
                         "pass text_encoder_trained=True")
    directory.mkdir(parents=True, exist_ok=True)
    plain = dataclasses.replace(components, text_encoder=plain_text_encoder(components.text_encoder))
    if components.is_sdxl:
        plain.text_encoder_2 = plain_text_encoder(components.text_encoder_2)
    plain.pipeline().save_pretrained(directory)
    encoders = ["text_encoder"] + (["text_encoder_2"] if components.is_sdxl else [])
    trained = ["unet"] + (encoders if text_encoder_trained else [])
    (directory / EXPORT_INFO).write_text(json.dumps({"trained": trained}) + "\n", encoding="utf-8")
    return directory
