"""DRaFT+ the way a competent user writes it on diffusers' components: the baseline of bench/gpu.py.

No draftray code: diffusers' UNet, VAE, scheduler and the CLIP text encoder(s) called directly, a peft
LoRA added with ``unet.add_adapter``, the frozen reference a deep copy of the UNet made before that, bf16
autocast with bf16 frozen weights and fp32 LoRA weights (as diffusers' train_text_to_image_lora.py),
diffusers' default attention, no compile, no CUDA graphs, no checkpointing. One step:

    x_T ~ N(0, I) * init_noise_sigma;  for t = T..1:  eps = eps_u + w (eps_c - eps_u) on scale_model_input(x_t);
    x_{t-1} = scheduler.step(eps, t, x_t)
    (no grad for the first T-K steps; the last K with grad, and the reference's eps_ref on the same x_t)
    loss = mean_b( -R(decode(x_0), prompt) + kl_coeff * mean_K mean((eps - eps_ref)^2) )

Any diffusers scheduler whose ``step`` needs no more than (eps, t, x_t): DDIM (SD 1.x's), Euler (SDXL's).
SDXL: pass ``text_encoder_2`` / ``tokenizer_2``; the UNet then gets the pipeline's added conditioning.
tests/test_bench.py checks that on the tiny models it gives our loss and our LoRA gradients on the same seed.
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
                 targets=("to_q", "to_k", "to_v", "to_out.0"), dtype: torch.dtype = torch.bfloat16, lr: float = 1e-4,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True):
        """SDXL: ``text_encoder_2`` (CLIPTextModelWithProjection) and ``tokenizer_2``; ``force_zeros_for_empty_prompt``
        (SDXL's model_index.json default) makes the empty negative prompt all-zero conditioning."""
        self.vae, self.text_encoder, self.tokenizer, self.scheduler, self.reward = vae, text_encoder, tokenizer, scheduler, reward
        self.text_encoder_2, self.tokenizer_2, self.force_zeros = text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt
        self.dtype = dtype
        self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()  # the frozen reference: a second UNet
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
        self.unet = unet
        for module in (unet, self.ref_unet, vae, text_encoder, text_encoder_2):
            if module is not None:
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

    def _ids(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)  # [N, 77]

    @torch.no_grad()
    def encode(self, prompts: list[str], size: int) -> dict:
        """The UNet's conditioning keyword arguments for the [uncond; cond] batch of 2B rows, the empty negative
        prompt as the pipelines' default. SD 1.x: the last hidden states [2B, 77, D]. SDXL, as
        StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states side by side
        [2B, 77, D1 + D2], the second's pooled projection [2B, P] and the six size ids (original size, crop
        (0, 0), target size) of a ``size`` x ``size`` image; force_zeros_for_empty_prompt zeroes the negative."""
        texts = [""] * len(prompts) + list(prompts)
        if self.text_encoder_2 is None:
            return {"encoder_hidden_states": self.text_encoder(self._ids(self.tokenizer, texts))[0]}
        outs = [enc(self._ids(tok, texts), output_hidden_states=True)
                for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))]
        states = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)  # [2B, 77, D1 + D2]
        pooled = outs[1].text_embeds  # [2B, P]
        if self.force_zeros:
            b = len(prompts)
            states = torch.cat([torch.zeros_like(states[b:]), states[b:]])
            pooled = torch.cat([torch.zeros_like(pooled[b:]), pooled[b:]])
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=states.dtype, device=self.device).repeat(len(texts), 1)
        return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def eps(self, unet, latents, t, cond: dict, guidance: float) -> torch.Tensor:
        doubled = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)  # [2B, 4, h, w]; Euler: / sqrt(sigma^2 + 1)
        eps_u, eps_c = unet(doubled, t, **cond).sample.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def loss(self, prompts: list[str], generator: torch.Generator, s: Settings) -> torch.Tensor:
        """The DRaFT+ loss of one batch (graph attached to the LoRA weights through the last K steps)."""
        cond = self.encode(prompts, s.size)
        self.scheduler.set_timesteps(s.steps, device=self.device)  # first: Euler's init_noise_sigma depends on the timesteps
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (len(prompts), self.unet.config.in_channels, s.size // f, s.size // f)
        dtype = cond["encoder_hidden_states"].dtype
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype) * self.scheduler.init_noise_sigma
        kls = []
        for i, t in enumerate(self.scheduler.timesteps):
            grad_step = i >= s.steps - s.truncation_steps
            with torch.set_grad_enabled(grad_step):
                eps = self.eps(self.unet, latents, t, cond, s.guidance)
                if grad_step:
                    with torch.no_grad():
                        eps_ref = self.eps(self.ref_unet, latents, t, cond, s.guidance)
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
