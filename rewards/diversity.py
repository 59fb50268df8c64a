"""Weight-free diversity: mean pairwise distance between images of the same prompt."""

from __future__ import annotations

import torch

from rewards.registry import register_diversity
from rewards.sources import MissingWeightsError, Source, load_state_dict_file, resolve


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


# torchvision's ImageNet weights for the LPIPS backbones (cached in torch.hub's checkpoints folder).
BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}


@register_diversity("lpips")
class LPIPSDiversity:
    """Mean over prompts of the mean pairwise LPIPS (Zhang et al. 2018) between that prompt's images.

    The DRaFT+ write-up's diversity metric: the lpips package (its shipped linear heads) on an AlexNet
    (``net="alex"``) or VGG16 backbone, inputs scaled to [-1, 1]. ``backbone`` is where the backbone's
    ImageNet weights come from: torchvision's file in torch's hub cache (the default URL), a local
    file, or "random" (seeded, offline; it still ranks identical < similar < different images, but its
    numbers are not comparable with published LPIPS values). Images smaller than ``min_size`` px are
    upsampled (bilinear) first: AlexNet's stride-4 stem leaves almost nothing of a 32 px image.
    """

    def __init__(self, net: str = "alex", backbone: str | None = None, min_size: int = 64, seed: int = 0):
        import warnings

        import lpips

        (src,) = self.sources(net=net, backbone=backbone) or (None,)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation, inside lpips
            torch.manual_seed(seed)  # a random backbone is a pure function of the seed
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        if src is not None:
            path = resolve(src)
            _load_backbone(self.model.net, load_state_dict_file(path, src.key, src.what), path, src)
            self.backbone = f"imagenet weights {path.name}"
        else:
            self.backbone = f"random backbone, seed {seed}: not comparable with published LPIPS"
        self.model.requires_grad_(False)
        self.net, self.min_size = net, min_size

    @classmethod
    def sources(cls, net: str = "alex", backbone: str | None = None, **_) -> list[Source]:
        if net not in BACKBONE_URLS:
            raise ValueError(f"lpips: net must be one of {sorted(BACKBONE_URLS)}, got {net!r}")
        if backbone == "random":
            return []
        return [Source("backbone", backbone or BACKBONE_URLS[net], "file", f"LPIPS {net} ImageNet weights", "lpips")]

    def describe(self) -> str:
        return f"lpips ({self.net}, {self.backbone})"

    def __call__(self, images_per_prompt: list[torch.Tensor]) -> float:
        return mean_pairwise(images_per_prompt, self.distance)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS between images a[k] and b[k] in [0, 1] -> [P]."""
        import torch.nn.functional as F

        a, b = a.cpu(), b.cpu()
        if min(a.shape[-2:]) < self.min_size:
            a, b = (F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False) for x in (a, b))
        return self.model(a * 2 - 1, b * 2 - 1).flatten()  # pixels in [-1, 1]; [P, 1, 1, 1] -> [P]


def _load_backbone(net: torch.nn.Module, sd: dict[str, torch.Tensor], path, src: Source) -> None:
    """torchvision's ``features.<i>.*`` weights into lpips' slices, which keep torchvision's layer indices."""
    mapped = {}
    for slice_name, block in net.named_children():  # slice1 .. sliceN
        for index, layer in block.named_children():
            for pname, _ in layer.named_parameters():
                mapped[f"{slice_name}.{index}.{pname}"] = f"features.{index}.{pname}"
    missing = [v for v in mapped.values() if v not in sd]
    if missing:
        raise MissingWeightsError(f"{src.key}: {src.what}: {path} lacks {missing[0]} (not torchvision {src.what})")
    net.load_state_dict({k: sd[v] for k, v in mapped.items()}, strict=True)
