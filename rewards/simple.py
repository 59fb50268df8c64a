"""Weight-free differentiable rewards that mean something on any image model.

They give the embedded tiny model something real to optimise without any
download. All are nn.Modules without parameters: frozen by construction.
"""

from __future__ import annotations

import torch
from torch import nn

from rewards.registry import check_batch, register_reward

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


@register_reward("colorfulness")
class Colorfulness(nn.Module):
    """Hasler & Suesstrunk (2003) colourfulness M = sigma_rgyb + 0.3 mu_rgyb, on [0,1] RGB.

    Roughly 0 for grey images, ~0.3-0.6 for vivid ones. sqrt is smoothed by eps so
    gradients stay finite on flat images.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        r, g, b = images.float().unbind(1)  # 3 x [B, H, W]
        rg = (r - g).flatten(1)  # [B, H*W]
        yb = (0.5 * (r + g) - b).flatten(1)
        sigma = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + self.eps).sqrt()
        mu = (rg.mean(1).pow(2) + yb.mean(1).pow(2) + self.eps).sqrt()
        return sigma + 0.3 * mu  # [B]


@register_reward("target_color")
class TargetColor(nn.Module):
    """Closeness of every pixel to one RGB colour: -mean squared distance, in [-3, 0]."""

    def __init__(self, color: tuple[float, float, float] = (1.0, 0.0, 0.0)):
        super().__init__()
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"color must be three numbers in [0, 1], got {color}")
        self.register_buffer("color", torch.tensor(color).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        diff = images.float() - self.color.to(images.device)  # [B, 3, H, W]
        return -diff.pow(2).sum(1).flatten(1).mean(1)  # [B]


@register_reward("brightness")
class Brightness(nn.Module):
    """Closeness of mean luma to a target level: -|mean luma - target|, in [-1, 0]."""

    def __init__(self, target: float = 0.8):
        super().__init__()
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target must be in [0, 1], got {target}")
        self.target = target
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        luma = (images.float() * self.luma.to(images.device)).sum(1)  # [B, H, W]
        return -(luma.flatten(1).mean(1) - self.target).abs()  # [B]
