"""SDXL UNet module paths in the original SGM/LDM naming, which kohya-ss LoRA files for SDXL use.

sd-scripts trains SDXL on its own port of Stability's UNet (``sdxl_original_unet.py``), so an SDXL
kohya file names ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, not diffusers'
``down_blocks.1.attentions.0...``; A1111/ComfyUI expect the same. With ``L = layers_per_block``
(diffusers' up blocks have ``L + 1`` resnets), the SGM UNet is laid out as:

- ``input_blocks.0.0`` = conv_in; level i, layer j: ``input_blocks.{1 + i(L+1) + j}`` holds
  ``.0`` = down_blocks.i.resnets.j and ``.1`` = down_blocks.i.attentions.j; the downsampler is
  ``input_blocks.{(i+1)(L+1)}.0.op``.
- ``middle_block.0`` / ``.1`` / ``.2`` = mid_block.resnets.0 / attentions.0 / resnets.1.
- ``output_blocks.{i(L+1) + j}``: ``.0`` = up_blocks.i.resnets.j, ``.1`` = up_blocks.i.attentions.j;
  the upsampler follows the last layer's modules: ``.2.conv`` after an attention, else ``.1.conv``.
- resnet inner names: conv1 = ``in_layers.2``, conv2 = ``out_layers.3``, time_emb_proj =
  ``emb_layers.1``, conv_shortcut = ``skip_connection``; transformer inner names are diffusers' own.
- time_embedding.linear_1/2 = ``time_embed.0/2``, add_embedding.linear_1/2 = ``label_emb.0.0/0.2``,
  conv_out = ``out.2``.

diffusers reads these back in ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``
(diffusers/loaders/lora_conversion_utils.py); its reader treats inner index 1 of an output block as
an attention always, so an upsampler of an up block *without* attention (``.1.conv``) is not read back
(models/kohya.check_reads_back then refuses the file). The tiny and the released SDXL have their
upsamplers in cross-attention up blocks only.
"""

from __future__ import annotations

import re

RESNET_INNER = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


class SgmNameError(ValueError):
    """A diffusers UNet module with no SGM name (models/kohya turns it into KohyaUnsupportedError)."""


def _layers_per_block(config) -> int:
    layers = config.layers_per_block
    if not isinstance(layers, int):  # per-block counts: diffusers' SGM reader needs one number
        raise SgmNameError(f"layers_per_block {layers!r} is not one integer; SGM block numbering needs one")
    return layers


def _inner(kind: str, rest: str) -> str:
    """Module path inside a resnet or transformer ('conv1' -> 'in_layers.2'; attention paths unchanged)."""
    if kind == "attentions":
        return rest
    if rest not in RESNET_INNER:
        raise SgmNameError(f"resnet module {rest!r} has no SGM name")
    return RESNET_INNER[rest]


def _has_attention(config, level: int) -> bool:
    return "CrossAttn" in config.up_block_types[level]


def sgm_path(path: str, config) -> str:
    """diffusers SDXL UNet module path -> SGM path ('down_blocks.1.attentions.0.proj_in' ->
    'input_blocks.4.1.proj_in' for L = 2). config: the UNet's config (layers_per_block, up_block_types).

    Raises SgmNameError for a module outside the mapping (e.g. a norm, which a LoRA never targets).
    """
    path = path.removeprefix("unet.")
    L = _layers_per_block(config)
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    if m := _BLOCK.match(path):
        side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        slot = "0" if kind == "resnets" else "1"
        index = 1 + level * (L + 1) + j if side == "down_blocks" else level * (L + 1) + j
        prefix = "input_blocks" if side == "down_blocks" else "output_blocks"
        return f"{prefix}.{index}.{slot}.{_inner(kind, rest)}"
    if m := _SAMPLER.match(path):
        level = int(m.group(2))
        if m.group(1) == "down_blocks":
            return f"input_blocks.{(level + 1) * (L + 1)}.0.op"
        slot = 2 if _has_attention(config, level) else 1  # the upsampler follows the last layer's modules
        return f"output_blocks.{level * (L + 1) + L}.{slot}.conv"
    if m := _MID.match(path):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions" and j:
            raise SgmNameError(f"{path!r}: the SGM middle block has one attention")
        index = 2 * j if kind == "resnets" else 1
        return f"middle_block.{index}.{_inner(kind, rest)}"
    raise SgmNameError(f"UNet module {path!r} has no SGM name")
