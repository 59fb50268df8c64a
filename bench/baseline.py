"""DRaFT+ the way a competent user writes it on diffusers' components: the baseline of bench/gpu.py.

No draftray code: diffusers' UNet, VAE, DDIM scheduler and the CLIP text encoder called directly, a peft
LoRA added with ``unet.add_adapter``, the frozen reference a deep copy of the UNet made before that, bf16
autocast with bf16 frozen weights and fp32 LoRA weights (as diffusers' train_text_to_image_lora.py),
diffusers' default attention, no compile, no CUDA graphs, no checkpointing. One step:

    x_T ~ N(0, I);  for t = T..1:  eps = eps_u + w (eps_c - eps_u);  x_{t-1} = DDIM(x_t, eps)
    (no grad for the first T-K steps; the last K with grad, and the reference's eps_ref on the same x_t)
    loss = mean_b( -R(decode(x_0), prompt) + kl_coeff * mean_K mean((eps - eps_ref)^2) )

tests/test_bench.py checks that on the tiny model it gives our loss on the same seed.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig


@dataclass(frozen=True)
class Settings:
    steps: int = 50  # T
    guidance: float = 7.5  # w
    truncation_steps: int = 1  # K
    kl_coeff: float = 0.1
    size: int = 512  # pixels per side


class BaselineDraftPlus:
    """A LoRA UNet trained by DRaFT+ against ``reward(images, prompts) -> [B]``, images in [0, 1]."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, reward, rank: int = 4,
                 targets=("to_q", "to_k", "to_v", "to_out.0"), dtype: torch.dtype = torch.bfloat16, lr: float = 1e-4):
        self.vae, self.text_encoder, self.tokenizer, self.scheduler, self.reward = vae, text_encoder, tokenizer, scheduler, reward
        self.dtype = dtype
        self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()  # the frozen reference: a second UNet
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
        self.unet = unet
        for module in (unet, self.ref_unet, vae, text_encoder):
            module.to(dtype=dtype)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # fp32 master weights for what trains
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[uncond; cond] text states [2B, 77, D] (empty negative prompt, as the pipeline's default)."""
        ids = self.tokenizer([""] * len(prompts) + list(prompts), padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def eps(self, unet, latents, t, states, guidance: float) -> torch.Tensor:
        doubled = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)  # [2B, 4, h, w]
        eps_u, eps_c = unet(doubled, t, encoder_hidden_states=states).sample.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def loss(self, prompts: list[str], generator: torch.Generator, s: Settings) -> torch.Tensor:
        """The DRaFT+ loss of one batch (graph attached to the LoRA weights through the last K steps)."""
        states = self.encode(prompts)
        self.scheduler.set_timesteps(s.steps, device=self.device)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (len(prompts), self.unet.config.in_channels, s.size // f, s.size // f)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=states.dtype) * self.scheduler.init_noise_sigma
        kls = []
        for i, t in enumerate(self.scheduler.timesteps):
            grad_step = i >= s.steps - s.truncation_steps
            with torch.set_grad_enabled(grad_step):
                eps = self.eps(self.unet, latents, t, states, s.guidance)
                if grad_step:
                    with torch.no_grad():
                        eps_ref = self.eps(self.ref_unet, latents, t, states, s.guidance)
                    kls.append((eps - eps_ref).pow(2).flatten(1).mean(dim=1))  # [B]
                latents = self.scheduler.step(eps, t, latents).prev_sample
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample  # [-1, 1]
        images = (pixels / 2 + 0.5).clamp(0, 1)
        rewards = self.reward(images, prompts)  # [B]
        return (-rewards + s.kl_coeff * torch.stack(kls).mean(dim=0)).mean()

    def step(self, prompts: list[str], generator: torch.Generator, s: Settings) -> float:
        """One optimizer step; returns the loss."""
        with self.autocast():
            loss = self.loss(prompts, generator, s)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
