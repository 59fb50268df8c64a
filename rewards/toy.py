"""The toy world's reward model and classifier: one small CNN, shipped as rewards/weights/toy_net.safetensors.

ToyNet reads images [B, 3, H, W] in [0, 1] (resized to 32 px) and predicts the
scene's shape, colour, background and size (classification heads) and its
appeal (regression head; rewards.toyworld.Scene.appeal: large, centred,
high-contrast shapes). It is trained on freshly drawn toy scenes with noise and
blur augmentation (`draftray toy reward`), so it also reads slightly imperfect
generated images.

Registered, all differentiable with respect to the images:
    toy_appeal    predicted appeal, about 0.5-3: a prompt-agnostic "preference" (like LAION aesthetic)
    toy_caption   log p(caption's attributes | image), <= 0: image-text agreement (like CLIP score)
    toy_lpips     diversity: LPIPS-style distance on ToyNet's features (a backbone trained on the world)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.diversity import mean_pairwise
from rewards.registry import check_batch, register_diversity, register_reward
from rewards.toyworld import COLOR_NAMES, SHAPES, SIZE_NAMES, parse_caption

WEIGHTS = Path(__file__).parent / "weights" / "toy_net.safetensors"
INPUT_SIZE = 32  # pixels per side the net sees
HEADS = {"shape": len(SHAPES), "color": len(COLOR_NAMES), "background": len(COLOR_NAMES), "size": len(SIZE_NAMES), "appeal": 1}
VOCAB = {"shape": SHAPES, "color": COLOR_NAMES, "background": COLOR_NAMES, "size": SIZE_NAMES}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ToyNet(nn.Module):
    """Conv features at 32, 16, 8, 4 px -> flattened 4x4 map (keeps position, for appeal) -> five heads."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([_block(3, 32, 1), _block(32, 64, 2), _block(64, 128, 2), _block(128, 128, 2)])
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, n) for name, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> the four stage outputs [B, C_l, 32/2^l, ...]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = x * 2 - 1  # pixels in [-1, 1]
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> logits per head {shape [B,4], color [B,8], background [B,8], size [B,2]} and appeal [B]."""
        h = self.trunk(self.features(images)[-1])  # [B, 256]
        out = {name: head(h) for name, head in self.heads.items()}
        out["appeal"] = out["appeal"].squeeze(1)  # [B]
        return out


def load_toy_net(weights: str | Path | None = None) -> ToyNet:
    """ToyNet with the shipped (or given) weights, frozen, in eval mode."""
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"toy reward weights {path} not found (make them with `draftray toy reward --out {path}`)")
    net = ToyNet()
    net.load_state_dict(load_file(str(path)))
    return net.requires_grad_(False).eval()


class _ToyNetReward(nn.Module):
    """A reward read off the frozen ToyNet (shipped weights unless ``weights`` names a file)."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.net = load_toy_net(weights)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        return self.score(self.net(images), prompts)

    def score(self, outputs: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor: ...


@register_reward("toy_appeal")
class ToyAppeal(_ToyNetReward):
    """Predicted appeal of each image (prompt-agnostic): higher for large, centred, high-contrast shapes."""

    def score(self, outputs: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
        return outputs["appeal"]  # [B]


@register_reward("toy_caption")
class ToyCaption(_ToyNetReward):
    """Sum over the attributes the caption names (shape, colour, and size / background when said) of log p(attribute)."""

    def score(self, outputs: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
        logp = {head: logits.float().log_softmax(-1) for head, logits in outputs.items() if head in VOCAB}
        scores = []
        for i, prompt in enumerate(prompts):
            said = [(head, VOCAB[head].index(value)) for head, value in parse_caption(prompt).items() if value is not None]
            scores.append(torch.stack([logp[head][i, k] for head, k in said]).sum())
        return torch.stack(scores)  # [B]


def caption_match(net: ToyNet, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Does the classifier read the caption's attributes off the image? -> {"shape", "color", "both"} bool [B].

    "both" (shape AND colour right) is the caption accuracy `draftray toy check` reports.
    """
    check_batch(images, prompts)
    with torch.no_grad():
        logits = net(images)
    want = [parse_caption(p) for p in prompts]
    out = {head: logits[head].argmax(-1) == torch.tensor([VOCAB[head].index(w[head]) for w in want]) for head in ("shape", "color")}
    out["both"] = out["shape"] & out["color"]
    return out


@register_diversity("toy_lpips")
class ToyLPIPS:
    """Mean pairwise LPIPS-style distance within each prompt's images, on ToyNet's four feature maps.

    As LPIPS (Zhang et al. 2018): unit-normalise each feature vector over channels, squared difference,
    mean over space, then (uniform weights, no learned heads) mean over the four layers. 0 = identical images.
    """

    def __init__(self, weights: str | None = None):
        self.net = load_toy_net(weights)

    def __call__(self, images_per_prompt: list[torch.Tensor]) -> float:
        return mean_pairwise(images_per_prompt, self.distance)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance between images a[k] and b[k] -> [P]."""
        fa, fb = ([F.normalize(f, dim=1) for f in self.net.features(x)] for x in (a, b))  # each [P, C_l, h, w]
        per_layer = [(x - y).pow(2).sum(1).mean((1, 2)) for x, y in zip(fa, fb)]  # each [P]
        return torch.stack(per_layer).mean(0)  # [P]
