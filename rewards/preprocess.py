"""The one CLIP preprocessing, in torch, differentiable: images in [0,1] -> normalised pixels.

Every CLIP-based reward (PickScore, HPSv2, aesthetic, CLIP score) goes through ``clip_preprocess``
so no PIL step ever cuts the gradient. It follows the official pipelines (transformers'
``CLIPImageProcessor``, open_clip's ``preprocess``, OpenAI CLIP's ``_transform``):

1. resize so the shorter side is ``size`` px, bicubic with antialiasing (PIL's filter: a = -0.5,
   support widened by the scale factor when shrinking; torch's ``antialias=True`` is the same kernel);
2. centre crop ``size`` x ``size``, the window placed as the reward's official processor places it
   (``crop``: the two disagree by one pixel when the overhang is odd, see ``crop_offset``);
3. subtract the CLIP mean and divide by the CLIP std, per channel.

The official paths read uint8 PIL images and write uint8 images: PIL resizes in two passes
(horizontal, then vertical), rounding to uint8 and clamping to [0, 255] after each. This path resizes
in the same two passes and clamps after each (``resize_shorter_side``) but does not round (rounding has no
gradient), so without a resize it gives the official pixels, and after one it differs by the rounding
of the intermediate image: 0.10-0.21 of a uint8 level on average and 1 level at most (without the
clamps, up to 7 levels next to saturated pixels). tests/test_clip_rewards.py measures it on several
sizes, shows that rounding between the passes accounts for all of it, and that a bilinear or
non-antialiased resize, a single unclamped pass or the other crop rule fails the same check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation (docs/references.md: every reward here uses it), RGB order.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Where a centre crop starts when the overhang (extent - size) is odd, by the official code that crops:
#   "floor": transformers' CLIPImageProcessor (both backends): int((extent - size) / 2)
#   "round": torchvision's CenterCrop, which open_clip's preprocess uses: int(round((extent - size) / 2)),
#            Python's round, half to even: an overhang of 3, 7, 11, ... starts one pixel later than "floor".
CROPS = ("floor", "round")


def shorter_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H', W') with min(H', W') = size, aspect kept, the long side truncated to int (as CLIPImageProcessor
    and torchvision's Resize compute it)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, C, H', W'] (``shorter_side_shape``), bicubic with antialiasing, in PIL's two
    passes: horizontal, clamp to [0, 1], vertical, clamp. The clamps keep a bicubic overshoot at a hard edge out of
    the second pass, as PIL's 8-bit intermediate image does (their gradient is zero only where PIL's output is
    saturated too). A no-op when the shorter side already is ``size``."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    out_h, out_w = shorter_side_shape(h, w, size)
    x = F.interpolate(images, size=(h, out_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)  # [B, C, H, W']
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)  # [B, C, H', W']


def crop_offset(extent: int, size: int, crop: str = "floor") -> int:
    """First row (or column) of a centred ``size`` window in ``extent`` pixels, placed as ``crop`` says (CROPS)."""
    if crop == "floor":
        return (extent - size) // 2
    if crop == "round":
        return int(round((extent - size) / 2))
    raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")


def center_crop(images: torch.Tensor, size: int, crop: str = "floor") -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size], the middle of the image (``crop_offset`` along each side)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} to {size}x{size}: resize first")
    top, left = crop_offset(h, size, crop), crop_offset(w, size, crop)
    return images[..., top : top + size, left : left + size]


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    crop: str = "floor",
) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> CLIP pixel values [B, 3, size, size] (float32, normalised).

    Differentiable. Resizing runs in float32 whatever the input dtype (bicubic in bf16 rounds visibly);
    the reward casts the result to its own compute dtype. ``crop``: the official processor's window
    placement (CROPS; the encoders of rewards/clip.py name theirs).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    x = center_crop(resize_shorter_side(images.float(), size), size, crop)  # [B, 3, size, size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
