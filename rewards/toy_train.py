"""Training the toy reward model / classifier (rewards.toy.ToyNet): `draftray toy reward`.

Fresh scenes every step from rewards.toyworld (a different stream from the
diffusion model's), with augmentation that mimics generated images: Gaussian
blur (soft edges of a small VAE) and pixel noise. Loss = cross-entropy on the
four attribute heads + MSE on appeal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewards.toy import ToyNet
from rewards.toyworld import ToyWorld, labels


@dataclass
class RewardTrainSettings:
    seed: int = 1  # init + data stream (the diffusion model uses seed 0's stream)
    steps: int = 2500  # optimizer steps
    batch: int = 96  # images per step
    lr: float = 2e-3  # AdamW, cosine to 0
    max_noise: float = 0.06  # pixel noise std drawn uniformly in [0, max_noise] per image
    p_blur: float = 0.5  # fraction of images blurred with a 3x3 Gaussian (sigma ~0.8 px)
    threads: int = 2


def augment(images: torch.Tensor, s: RewardTrainSettings, gen: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)  # [3, 1, 3, 3] depthwise
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < s.p_blur).float()
    out = pick * blurred + (1 - pick) * images
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * s.max_noise
    return (out + sigma * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def train_toy_net(s: RewardTrainSettings = RewardTrainSettings()) -> tuple[ToyNet, dict]:
    """Train from scratch; returns the net (eval, frozen) and held-out accuracies / appeal error."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    world = ToyWorld(seed=s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    net = ToyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps)
    t0 = time.time()
    bar = tqdm(range(s.steps), desc="toy reward", mininterval=5)
    for step in bar:
        images, _, scenes = world.batch(s.batch, index=step)
        y = labels(scenes)
        out = net(augment(images, s, gen))
        loss = sum(F.cross_entropy(out[k], y[k]) for k in ("shape", "color", "background", "size"))
        loss = loss + F.mse_loss(out["appeal"], y["appeal"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    net.requires_grad_(False).eval()
    report = evaluate_toy_net(net, ToyWorld(seed=s.seed + 1000))
    report["train_minutes"] = (time.time() - t0) / 60
    return net, report


@torch.no_grad()
def evaluate_toy_net(net: ToyNet, world: ToyWorld, n: int = 2048) -> dict:
    """Held-out accuracy per head and appeal RMSE / correlation on n fresh scenes."""
    images, _, scenes = world.batch(n, index=0)
    y = labels(scenes)
    out = net(images)
    report = {f"acc_{k}": float((out[k].argmax(-1) == y[k]).float().mean()) for k in ("shape", "color", "background", "size")}
    report["appeal_rmse"] = float((out["appeal"] - y["appeal"]).pow(2).mean().sqrt())
    report["appeal_corr"] = float(torch.corrcoef(torch.stack([out["appeal"], y["appeal"]]))[0, 1])
    return report
