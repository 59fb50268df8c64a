"""Weight-free diversity: mean pairwise distance between images of the same prompt."""

from __future__ import annotations

import torch

from rewards.registry import register_diversity


def mean_pairwise(images_per_prompt: list[torch.Tensor], pair_distance) -> float:
    """Mean over prompts of the mean distance over all unordered pairs of that prompt's images.

    pair_distance(a [P, 3, H, W], b [P, 3, H, W]) -> [P], for the P pairs (a[k], b[k]). No gradient.
    """
    if not images_per_prompt:
        raise ValueError("diversity needs at least one prompt's images")
    per_prompt = []
    with torch.no_grad():
        for imgs in images_per_prompt:
            n = imgs.shape[0]
            if n < 2:
                raise ValueError(f"diversity needs >= 2 images per prompt, got {n}")
            i, j = torch.triu_indices(n, n, offset=1)  # all unordered pairs
            x = imgs.detach().float()
            per_prompt.append(pair_distance(x[i], x[j]).float().mean())
    return float(torch.stack(per_prompt).mean())


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


@register_diversity("lpips")
class LPIPSDiversity:
    """Mean over prompts of the mean pairwise LPIPS (Zhang et al. 2018) between that prompt's images.

    The DRaFT+ write-up's diversity metric (AlexNet LPIPS). Offline by default: the lpips package ships
    its learned linear heads, but AlexNet's ImageNet weights are a download, so ``pretrained_backbone``
    is False unless the user has torchvision's alexnet weights cached (then set it True). A random
    backbone still ranks identical < similar < different images, but its numbers are not comparable
    with published LPIPS values: say which one a report used. Images smaller than ``min_size`` px are
    upsampled (bilinear) first: AlexNet's stride-4 stem leaves almost nothing of a 32 px image.
    """

    def __init__(self, net: str = "alex", pretrained_backbone: bool = False, min_size: int = 64, seed: int = 0):
        import warnings

        import lpips

        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation, inside lpips
            torch.manual_seed(seed)  # the random backbone is a pure function of the seed
            self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False).eval()
        self.model.requires_grad_(False)
        self.min_size = min_size
        self.backbone = "imagenet" if pretrained_backbone else f"random(seed={seed})"

    def __call__(self, images_per_prompt: list[torch.Tensor]) -> float:
        return mean_pairwise(images_per_prompt, self.distance)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS between images a[k] and b[k] in [0, 1] -> [P]."""
        import torch.nn.functional as F

        a, b = a.cpu(), b.cpu()
        if min(a.shape[-2:]) < self.min_size:
            a, b = (F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False) for x in (a, b))
        return self.model(a * 2 - 1, b * 2 - 1).flatten()  # pixels in [-1, 1]; [P, 1, 1, 1] -> [P]
