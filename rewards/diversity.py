"""Weight-free diversity: mean pairwise distance between images of the same prompt."""

from __future__ import annotations

import torch

from rewards.registry import register_diversity


@register_diversity("pairwise_rms")
class PairwiseRMS:
    """Mean over prompts of the mean pairwise RMS pixel distance between that prompt's N images.

    images in [0, 1], so the value lies in [0, 1]; 0 = all images of a prompt identical
    (mode collapse). Needs N >= 2 images per prompt.
    """

    def __call__(self, images_per_prompt: list[torch.Tensor]) -> float:
        if not images_per_prompt:
            raise ValueError("diversity needs at least one prompt's images")
        per_prompt = []
        for imgs in images_per_prompt:
            if imgs.shape[0] < 2:
                raise ValueError(f"diversity needs >= 2 images per prompt, got {imgs.shape[0]}")
            flat = imgs.detach().float().flatten(1)  # [N, 3*H*W]
            dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # [N, N] RMS distances
            n = flat.shape[0]
            per_prompt.append(dist.sum() / (n * (n - 1)))  # diagonal is 0
        return float(torch.stack(per_prompt).mean())
