"""The one CLIP preprocessing, in torch, differentiable: images in [0,1] -> normalised pixels.

Every CLIP-based reward (PickScore, HPSv2, aesthetic, CLIP score) goes through ``clip_preprocess``
so no PIL step ever cuts the gradient. It follows the official pipelines (transformers'
``CLIPImageProcessor``, open_clip's ``preprocess``, OpenAI CLIP's ``_transform``):

1. resize so the shorter side is ``size`` px, bicubic with antialiasing (PIL's filter: a = -0.5,
   support widened by the scale factor when shrinking; torch's ``antialias=True`` is the same kernel);
2. centre crop ``size`` x ``size``;
3. subtract the CLIP mean and divide by the CLIP std, per channel.

The official paths read uint8 PIL images, so at 224 px (no resize) they differ from this path only
by the input's 8-bit rounding; after a resize from 512 px they differ by PIL's uint8 rounding of the
resized image (tests/test_clip_rewards.py pins both against the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation (docs/references.md: every reward here uses it), RGB order.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H', W'] with min(H', W') = size, aspect kept (long side truncated to int,
    as CLIPImageProcessor and torchvision's Resize do). A no-op when the shorter side already is ``size``."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    if short == size:
        return images
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    return F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size], the middle of the image (offset (H - size) // 2)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} to {size}x{size}: resize first")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> CLIP pixel values [B, 3, size, size] (float32, normalised).

    Differentiable. Resizing runs in float32 whatever the input dtype (bicubic in bf16 rounds visibly);
    the reward casts the result to its own compute dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    x = center_crop(resize_shorter_side(images.float(), size), size)  # [B, 3, size, size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
