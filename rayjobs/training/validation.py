"""InstructPix2Pix validation edits during training (data.eval_images), as diffusers'
train_instruct_pix2pix.py logs them: a fixed input image edited by fixed instructions with a fixed seed.

Rows of the grid: one per input image, the input first, then its edit by each eval prompt.
"""

from __future__ import annotations

import torch

from models.ip2p import edit
from models.policy import Policy
from models.sampler import SamplerSettings
from rayjobs.config import Config
from rayjobs.data.images import eval_pixels


@torch.no_grad()
def validation_edits(cfg: Config, policy: Policy, settings: SamplerSettings) -> list[torch.Tensor]:
    """One row [1 + P, 3, S, S] in [0, 1] per eval image: the input, then its P edits. [] without eval_images.
    The caller picks the network (``policy.net``) and the autocast."""
    prompts = list(cfg.data.eval_prompts)
    rows = []
    for pixels in eval_pixels(cfg):
        batch = pixels[None].expand(len(prompts), -1, -1, -1)  # [P, 3, S, S]: one instruction per copy
        gen = torch.Generator().manual_seed(cfg.data.eval_seeds[0])
        edited = edit(policy, prompts, batch, settings, cfg.data.eval_image_guidance, gen)  # [P, 3, S, S] in [0, 1]
        rows.append(torch.cat([(pixels[None] + 1) / 2, edited.float().cpu()]))  # [1 + P, 3, S, S]
    return rows
