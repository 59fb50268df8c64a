"""LoRA in kohya-ss / A1111 layout (``lora_unet_*`` / ``lora_te_*`` keys), as sd-scripts writes it.

Key scheme (kohya's networks/lora.py on the diffusers SD 1.x UNet): the module path with "." -> "_",
prefixed ``lora_unet_`` (UNet) or ``lora_te_text_model_`` (CLIP text encoder), then
``.lora_down.weight`` (= PEFT lora_A, [r, in(, k, k)]), ``.lora_up.weight`` (= lora_B, [out, r(, 1, 1)])
and ``.alpha`` (0-d float tensor); the LoRA scale is alpha / r, the same as PEFT's lora_alpha / r.

Every file is checked against diffusers' own reader before it is returned: the keys are parsed
with ``StableDiffusionPipeline.lora_state_dict`` (``_convert_non_diffusers_lora_to_diffusers``)
and the PEFT conversions the loaders apply, and any module that would come back under another
name (so be silently dropped or mis-applied) raises :class:`KohyaUnsupportedError` instead.
Known case (diffusers 0.42): a text-encoder LoRA with neither ``out_proj`` nor ``mlp.fc1/fc2``
cannot be read back, because diffusers infers the old key format from ``to_out_lora`` /
``lora_linear_layer`` keys ("Could not automatically infer state dict type"). All UNet kinds of
SD 1.x (attention to_q/k/v/out.0, proj_in/out, ff.net.*, resnet conv1/conv2/conv_shortcut/
time_emb_proj, conv_in/conv_out, down/upsampler convs, time_embedding) read back.

SDXL (``sgm_config`` = the UNet's config): UNet modules take their SGM names (models/kohya_sdxl.py,
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), the text encoders are
``lora_te1_text_model_*`` and ``lora_te2_text_model_*`` (input keys ``text_encoder.`` /
``text_encoder_2.``), and the check runs through ``StableDiffusionXLPipeline.lora_state_dict``
with the UNet config, as ``StableDiffusionXLPipeline.load_lora_weights`` calls it.
"""

from __future__ import annotations

import json

import torch

from models.kohya_sdxl import SgmNameError, sgm_path

KOHYA_FILE = "kohya_lora.safetensors"
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE_INPUT_PREFIX = "text_encoder."  # keys of the text-encoder LoRA in to_kohya's input
TE2_INPUT_PREFIX = "text_encoder_2."  # SDXL's second text encoder
SDXL_TE_PREFIXES = {TE_INPUT_PREFIX: "lora_te1_", TE2_INPUT_PREFIX: "lora_te2_"}
CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm")  # under CLIP's text_model (not text_projection)


class KohyaUnsupportedError(ValueError):
    """Some LoRA modules cannot be written in a form diffusers' kohya loader reads back correctly."""


def _module_paths(peft_state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths that carry a LoRA ("down_blocks.0....to_q", "text_encoder.encoder.layers.0....q_proj")."""
    paths = {k.rsplit(".lora_", 1)[0] for k in peft_state}
    bad = sorted(k for k in peft_state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if bad:
        raise KohyaUnsupportedError(f"only plain LoRA A/B weights convert to kohya, got {bad[:3]}")
    return sorted(paths)


def _te_name(inner: str, prefix: str) -> str:
    """CLIP module path -> kohya name; the text_model level is always spelled (transformers 5 flattens CLIPTextModel)."""
    if inner.startswith(CLIP_TEXT_MODEL_PARTS):
        inner = "text_model." + inner
    return prefix + inner.replace(".", "_")


def _kohya_name(path: str, sgm_config=None) -> str:
    """'down_blocks.0.resnets.0.conv1' -> 'lora_unet_down_blocks_0_resnets_0_conv1';
    'text_encoder.encoder.layers.0.self_attn.q_proj' -> 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'.
    SDXL (sgm_config given): 'lora_unet_input_blocks_1_0_in_layers_2', 'lora_te1_...' / 'lora_te2_...'."""
    if sgm_config is not None:
        for input_prefix, prefix in SDXL_TE_PREFIXES.items():
            if path.startswith(input_prefix):
                return _te_name(path[len(input_prefix):], prefix)
        try:
            return UNET_PREFIX + sgm_path(path, sgm_config).replace(".", "_")
        except SgmNameError as err:
            raise KohyaUnsupportedError(str(err)) from err
    if path.startswith(TE2_INPUT_PREFIX):
        raise KohyaUnsupportedError(f"{path}: a second text encoder needs the SDXL layout (pass sgm_config)")
    if path.startswith(TE_INPUT_PREFIX):
        return _te_name(path[len(TE_INPUT_PREFIX):], TE_PREFIX)
    return UNET_PREFIX + path.removeprefix("unet.").replace(".", "_")


def to_kohya(peft_state: dict[str, torch.Tensor], alpha: float, rank: int, sgm_config=None) -> dict[str, torch.Tensor]:
    """Convert a PEFT LoRA state (UNet keys bare or ``unet.``-prefixed, text-encoder keys ``text_encoder.``-prefixed,
    SDXL's second ``text_encoder_2.``) to kohya keys; ``alpha``/``rank`` are the LoRA's lora_alpha and r (scale
    alpha / rank). sgm_config: the SDXL UNet's config for SDXL naming; None for SD 1.x.

    Raises KohyaUnsupportedError if a module would not load back under its own name in diffusers.
    """
    out: dict[str, torch.Tensor] = {}
    for path in _module_paths(peft_state):
        down, up = peft_state[f"{path}.lora_A.weight"], peft_state[f"{path}.lora_B.weight"]
        if down.shape[0] != rank or up.shape[1] != rank:
            raise ValueError(f"{path}: LoRA rank {down.shape[0]} differs from rank={rank}")
        name = _kohya_name(path, sgm_config)
        out[f"{name}.lora_down.weight"] = down.detach().to("cpu").contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to("cpu").contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))  # 0-d, as kohya's register_buffer("alpha")
    check_reads_back(out, _module_paths(peft_state), sgm_config)
    return out


def _normalise(path: str) -> str:
    """Compare module paths without the 'unet.' prefix and CLIP's optional 'text_model.' level."""
    path = path.removeprefix("unet.")
    for prefix in (TE_INPUT_PREFIX, TE2_INPUT_PREFIX):
        path = path.replace(f"{prefix}text_model.", prefix)
    return path


def _text_encoder_paths(state: dict[str, torch.Tensor], prefix: str) -> set[str]:
    """PEFT module paths ('<prefix><path>') the text-encoder loader (_load_lora_into_text_encoder) makes of ``state``."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    te = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not te:
        return set()
    try:
        te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
    except ValueError as err:
        raise KohyaUnsupportedError(
            f"diffusers cannot read back this text-encoder LoRA in kohya layout ({err}); it needs out_proj "
            "or mlp.fc1/fc2 among its targets. Use the diffusers file instead."
        ) from err
    return {prefix + k.rsplit(".lora_", 1)[0] for k in te}


def read_back(kohya: dict[str, torch.Tensor], sgm_config=None) -> set[str]:
    """Module paths (PEFT naming, text encoders as 'text_encoder.<path>' / 'text_encoder_2.<path>') diffusers'
    loader gives ``kohya``: StableDiffusionPipeline's, or with sgm_config StableDiffusionXLPipeline's."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    try:
        if sgm_config is None:
            state, _alphas = StableDiffusionPipeline.lora_state_dict(dict(kohya))  # pops from its argument: a copy
        else:
            state, _alphas = StableDiffusionXLPipeline.lora_state_dict(dict(kohya), unet_config=sgm_config)
    except (ValueError, KeyError, IndexError) as err:  # the SGM block parser raises on names it cannot place
        raise KohyaUnsupportedError(f"diffusers' kohya reader rejects this file: {err!r}") from err
    unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    paths = {k.rsplit(".lora_", 1)[0] for k in convert_unet_state_dict_to_peft(unet)}
    return paths | _text_encoder_paths(state, TE_INPUT_PREFIX) | _text_encoder_paths(state, TE2_INPUT_PREFIX)


def check_reads_back(kohya: dict[str, torch.Tensor], expected_paths: list[str], sgm_config=None) -> None:
    """KohyaUnsupportedError unless diffusers maps ``kohya`` back onto exactly ``expected_paths``."""
    got = {_normalise(p) for p in read_back(kohya, sgm_config)}
    want = {_normalise(p) for p in expected_paths}
    if got != want:
        lost = sorted(want - got)
        raise KohyaUnsupportedError(
            f"diffusers' kohya loader would not map {len(lost)} LoRA module(s) back to themselves "
            f"(e.g. {lost[:3]}; it reads {sorted(got - want)[:3]}); keep the diffusers file for these targets"
        )


def kohya_metadata(alpha: float, rank: int, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """safetensors metadata as sd-scripts writes it (all values strings)."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    if any(v.ndim == 4 and v.shape[-1] > 1 for k, v in state.items() if k.endswith("lora_down.weight")):
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)})  # LoCon-style 3x3
    return meta
