"""The one objective: a weighted sum of per-sample terms (docs/design.md, "The math, once").

    loss = - reward_weight * R(x_0, c) + kl_coeff * KL + denoise_weight * D + prior_weight * P

Each term is a pure function of tensors returning one value per sample [B];
``Objective`` computes only the terms whose weight is non-zero and never
branches on which preset (draftplus, draft, dreambooth, ...) picked the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.components import vae_precision
from models.inpaint import InpaintInputs, is_inpainting_unet
from models.ip2p import dropout_masks, ip2p_denoise_inputs
from models.policy import Policy, unet_eps
from models.sampler import SamplerSettings, sample
from models.schedulers import training_scheduler

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (images [B,3,H,W] in [0,1], prompts) -> [B]


# ---- terms: pure functions, one value per sample -------------------------------------------


def reward_term(rewards: torch.Tensor) -> torch.Tensor:
    """-R per sample: minimising it maximises the reward. rewards [B] -> [B]."""
    return -rewards


def kl_term(eps: torch.Tensor, eps_ref: torch.Tensor) -> torch.Tensor:
    """DRaFT+ KL surrogate: mean over elements of (eps - eps_ref)^2, averaged over the K steps.

    eps, eps_ref [K, B, C, h, w] (CFG-combined) -> [B]. Equal to NeMo-Aligner's
    sum((eps - eps_ref)^2) / numel per step, averaged over steps.
    """
    sq = (eps - eps_ref.detach()).pow(2).flatten(2)  # [K, B, C*h*w]
    return sq.mean(dim=2).mean(dim=0)  # [B]


def denoise_term(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted masked MSE per sample: w * mean_{mask}((pred - target)^2).

    pred, target [B, C, h, w]; weight [B] (e.g. min-SNR) or None; mask [B, 1 or C, h, w]
    in {0, 1} or None (mean over the masked elements; an empty mask gives 0) -> [B].
    """
    sq = (pred.float() - target.float()).pow(2)  # [B, C, h, w]
    if mask is None:
        per_sample = sq.flatten(1).mean(dim=1)
    else:
        mask = mask.float().expand_as(sq)
        per_sample = (sq * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    return per_sample if weight is None else per_sample * weight


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023): min(snr, g)/snr for eps, min(snr, g)/(snr+1) for v."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting needs prediction_type epsilon or v_prediction, got {prediction_type!r}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep. [T], [B] -> [B]."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


# ---- the weighted sum ------------------------------------------------------------------------


@dataclass
class Weights:
    """Term weights; a preset is a choice of these (docs/design.md table)."""

    reward: float = 1.0
    kl_coeff: float = 0.0  # weight of the KL term; 0 is plain DRaFT
    denoise: float = 0.0
    prior: float = 0.0  # DreamBooth prior preservation (lambda)


@dataclass(frozen=True)
class DenoiseSettings:
    """How the supervised terms draw t and noise and what they regress (docs/design.md, supervised terms)."""

    min_snr_gamma: float | None = None  # min-SNR-gamma weight (Hang et al. 2023); None = plain MSE
    noise_offset: float = 0.0  # eps += offset * N(0, 1) per (sample, channel) (Guttenberg's noise offset)
    target: str = "scheduler"  # "scheduler" (its prediction_type), "epsilon" or "v_prediction"
    conditioning_dropout: float = 0.0  # p of InstructPix2Pix dropout (text only, image only, both: p each)
    masked_loss: bool = False  # inpainting: average the denoise error inside the mask only (batch "mask")


class Objective:
    """objective(policy, batch) -> (loss, metrics).

    batch keys: ``prompts`` (list[str]) and ``generator`` for the reward terms; ``latents`` [B,C,h,w]
    (VAE-scaled), ``captions`` and optionally ``cond_latents`` [B,C,h,w] (an InstructPix2Pix input
    image, unscaled) for denoise; ``class_latents`` and ``class_prompts`` for prior. Inpainting
    (rayjobs/data/batches.py): ``mask`` / ``masked_latents`` (and ``class_*`` ones) for the denoise terms,
    ``inpaint_pixels`` / ``inpaint_mask`` for the reward terms. Metrics are detached scalars (no host sync).
    """

    def __init__(
        self,
        weights: Weights,
        sampler: SamplerSettings,
        reward: Reward | None = None,
        denoise: DenoiseSettings = DenoiseSettings(),
        reward_checkpointing: bool = False,
    ):
        """``reward_checkpointing``: keep no activations of the reward model for backward, recompute
        them there (a ViT-H reward on a batch of 224 px crops holds GBs; one more reward forward)."""
        if not (weights.reward or weights.kl_coeff or weights.denoise or weights.prior):
            raise ValueError("at least one term weight must be non-zero")
        if (weights.reward or weights.kl_coeff) and reward is None:
            raise ValueError("reward and kl terms need a reward function")
        self.w = weights
        self.sampler = sampler
        self.reward = reward
        self.denoise = denoise
        self.reward_checkpointing = reward_checkpointing

    def __call__(self, policy: Policy, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, metrics = 0.0, {}
        if self.w.reward or self.w.kl_coeff:
            total, metrics = self._sampled_terms(policy, batch)
        if self.w.denoise:
            d = denoise_loss(policy, batch["latents"], batch["captions"], batch["generator"], self.denoise, batch.get("cond_latents"),
                             inpaint_mask=batch.get("mask"), masked_latents=batch.get("masked_latents"))
            total = total + self.w.denoise * d  # [B]; the reward batch has the same B (train.batch_size)
            metrics["denoise"] = d.detach().mean()
        if self.w.prior:
            p = denoise_loss(policy, batch["class_latents"], batch["class_prompts"], batch["generator"], self.denoise,
                             inpaint_mask=batch.get("class_mask"), masked_latents=batch.get("class_masked_latents"))
            total = total + self.w.prior * p.mean()  # class batch size may differ: mean first
            metrics["prior"] = p.detach().mean()
        loss = total.mean()
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _sampled_terms(self, policy: Policy, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inpaint = None
        if "inpaint_pixels" in batch:  # DRaFT+ on masks: repaint the hole; the reward sees the composite
            s = self.sampler
            inpaint = InpaintInputs(batch["inpaint_pixels"], batch["inpaint_mask"], s.inpaint_strength, s.paste_back)
        out = sample(policy, batch["prompts"], self.sampler, batch["generator"], with_ref=self.w.kl_coeff > 0, inpaint=inpaint)
        if self.reward_checkpointing and torch.is_grad_enabled():
            rewards, parts = checkpoint(score_parts, self.reward, out.images, batch["prompts"], use_reentrant=False)
        else:
            rewards, parts = score_parts(self.reward, out.images, batch["prompts"])  # [B], {name: [B]}
        total = self.w.reward * reward_term(rewards)
        metrics = {"reward": rewards.detach().mean(), "reward_std": rewards.detach().std(unbiased=False)}
        metrics.update({f"reward/{name}": r.detach().mean() for name, r in parts.items()})
        if self.w.kl_coeff:
            kl = kl_term(out.eps, out.eps_ref)  # [B]
            total = total + self.w.kl_coeff * kl
            metrics["kl"] = kl.detach().mean()
        return total, metrics


def score_parts(reward: Reward, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(R [B], {component: raw score [B]}). A reward made of several (rewards.combine.RewardSum) offers
    ``parts``; any other reward is its own single component, reported as {} (nothing extra to log)."""
    parts = getattr(reward, "parts", None)
    if parts is not None:
        return parts(images, prompts)
    return reward(images, prompts), {}


def denoise_loss(
    policy: Policy,
    latents: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator | None,
    settings: DenoiseSettings = DenoiseSettings(),
    cond_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    inpaint_mask: torch.Tensor | None = None,
    masked_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised diffusion loss on data latents (already scaled by the VAE factor): [B, C, h, w] -> [B].

    Draws, in this order from ``generator``: eps ~ N(0, I) [B,C,h,w], the noise offset N(0, 1) [B,C,1,1]
    (if any), t ~ U{0..T_train-1} [B], then the dropout draw (with ``cond_latents``).
    x_t = add_noise(x_0, eps, t); target eps or v; optional min-SNR weight. ``cond_latents``: the
    InstructPix2Pix conditioning image's latents, concatenated to x_t along channels, with the
    text / image / both dropped per ``settings.conditioning_dropout``. ``inpaint_mask`` [B, 1, H, W]
    (pixel size, 1 = hole) and ``masked_latents`` [B, 4, h, w]: an inpainting UNet (9 channels) gets
    cat(x_t, mask at latent size, masked latents), as diffusers' inpainting training builds it; with
    ``settings.masked_loss`` the error is averaged inside the mask only (else over ``mask``, if given).
    """
    sched = training_scheduler(policy.components.scheduler)  # DDPM form, whatever the sampler (SDXL: Euler)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if settings.noise_offset:
        offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype).to(latents.device)
        noise = noise + settings.noise_offset * offset  # [B, C, h, w] + [B, C, 1, 1]
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    kind = sched.config.prediction_type if settings.target == "scheduler" else settings.target
    target = noise if kind == "epsilon" else sched.get_velocity(latents, noise, t)
    f = policy.components.vae_scale_factor
    # SDXL micro-conditioning: the training image's size, uncropped (the data layer resizes and centre-crops)
    cond = policy.encode_prompts(list(prompts)).with_size(latents.shape[2] * f, latents.shape[3] * f)  # [B]
    if cond_latents is not None:
        drop_text, drop_image = (m.to(latents.device) for m in dropout_masks(b, settings.conditioning_dropout, generator))  # [B], [B]
        null = policy.encode_prompts([""])  # [1]
        noisy, cond = ip2p_denoise_inputs(noisy, cond_latents.to(noisy.dtype), cond, null, drop_text, drop_image)  # [B, 2C, h, w]
    if inpaint_mask is not None:
        mask_latent = F.interpolate(inpaint_mask.to(noisy.dtype), size=latents.shape[2:])  # [B, 1, h, w]
        if is_inpainting_unet(policy.unet):
            noisy = torch.cat([noisy, mask_latent, masked_latents.to(noisy.dtype)], dim=1)  # [B, 9, h, w]
        if settings.masked_loss:
            mask = mask_latent
    if policy.gradient_checkpointing and torch.is_grad_enabled():  # recompute the UNet's activations in backward
        pred = checkpoint(unet_eps, policy.net, noisy, t, cond, use_reentrant=False)
    else:
        pred = unet_eps(policy.net, noisy, t, cond)
    weight = None if settings.min_snr_gamma is None else min_snr_weight(snr(sched.alphas_cumprod, t), settings.min_snr_gamma, kind)
    return denoise_term(pred, target, weight, mask)


def encode_pixels(policy: Policy, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Data latents for the denoise terms: a draw from the frozen VAE's posterior, scaled as in training
    scripts (diffusers' train_text_to_image). pixels [B, 3, H, W] in [-1, 1] -> [B, 4, H/f, W/f]."""
    vae = policy.components.vae
    with torch.no_grad(), vae_precision(vae, pixels) as (pixels,):
        return vae.encode(pixels, return_dict=False)[0].sample(generator) * vae.config.scaling_factor
