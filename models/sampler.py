"""Sampling with truncated backpropagation (DRaFT-K) and classifier-free guidance.

For t = T..1: eps = eps_u + w (eps_c - eps_u); x_{t-1} = scheduler.step(eps, t, x_t).
Steps T..K+1 run without gradient, the last K with gradient (DRaFT, Clark et al.
2023, sec. 4: K = 1 is DRaFT-1/DRaFT+; K = T is full backpropagation). At each
gradient step the frozen reference predicts eps_ref on the same x_t, without
gradient (DRaFT+, NeMo-Aligner semantics), for the KL term.

With the same seed, scheduler, steps and guidance, ``sample`` reproduces
diffusers' ``StableDiffusionPipeline`` image for image: the initial noise is
drawn with ``randn_tensor`` from the same generator, the prompts are encoded
the same way and the same scheduler steps are taken. ``SamplerSettings.scheduler``
swaps the solver (models/schedulers.py: DDIM, PNDM, Euler, Euler ancestral,
DPM-Solver++) on the model's own noise schedule; ``step`` gets only the
arguments it accepts, as in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint

from models.components import vae_precision
from models.inpaint import InpaintInputs, is_inpainting_unet, paste_back, prepare, strength_timesteps
from models.inpaint import blend as inpaint_blend
from models.policy import Policy
from models.schedulers import SCHEDULERS, scheduler_for, step_kwargs


@dataclass(frozen=True)
class SamplerSettings:
    """How images are drawn (docs/design.md, "The math, once")."""

    steps: int = 50  # T, denoising steps
    guidance: float = 7.5  # classifier-free guidance scale w (<= 1 disables CFG)
    eta: float = 0.0  # DDIM eta: 0 deterministic, 1 DDPM-like
    truncation_steps: int = 1  # K, the last K steps carry gradient (1 <= K <= T)
    height: int = 512  # pixels
    width: int = 512  # pixels
    negative_prompt: str = ""  # the unconditional text ("" as in diffusers)
    gradient_checkpointing: bool = False  # recompute UNet activations of gradient steps in backward
    vae_checkpointing: bool = False  # recompute the VAE decoder's activations in backward (1024 px SDXL: GBs)
    scheduler: str | None = None  # solver name in models.schedulers.SCHEDULERS; None: the components' own
    inpaint_strength: float = 1.0  # masked generation (models/inpaint.py): 1 = from noise, < 1 = from the noised image
    paste_back: bool = True  # masked generation: the known image outside the mask, in pixel space (what a reward sees)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.truncation_steps <= self.steps:
            raise ValueError(f"truncation_steps K must satisfy 1 <= K <= steps ({self.steps}), got {self.truncation_steps}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}")


@dataclass
class SampleOutput:
    """What one sampling pass produced; the objective reads what it needs."""

    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [B, C, h, w] final latents (decoded into images)
    eps: torch.Tensor | None = None  # [K, B, C, h, w] policy eps at the gradient steps (CFG-combined)
    eps_ref: torch.Tensor | None = None  # [K, B, C, h, w] reference eps on the same x_t (no grad)
    timesteps: list[int] = field(default_factory=list)  # the K gradient steps' t


def initial_latents(
    policy: Policy, batch: int, settings: SamplerSettings, generator, device, dtype, scheduler=None
) -> torch.Tensor:
    """x_T the way StableDiffusionPipeline.prepare_latents draws it: [B, C, H/f, W/f] * init_noise_sigma.

    ``scheduler`` (default: the components' own) must have had ``set_timesteps`` called: for Euler-type
    schedulers init_noise_sigma depends on the timesteps, and the pipeline sets them before drawing x_T.
    """
    comps = policy.components
    scheduler = scheduler if scheduler is not None else comps.scheduler
    f = comps.vae_scale_factor
    if settings.height % f or settings.width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {settings.height}x{settings.width}")
    shape = (batch, comps.vae.config.latent_channels, settings.height // f, settings.width // f)  # not unet in_channels: InstructPix2Pix has 8
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma


def sample(
    policy: Policy,
    prompts: list[str],
    settings: SamplerSettings,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    with_ref: bool = False,
    track_grad: bool = True,
    latents: torch.Tensor | None = None,
    blend: tuple[float, ...] | None = None,
    inpaint: InpaintInputs | None = None,
) -> SampleOutput:
    """Draw one image per prompt; gradient flows through the last K steps when ``track_grad``.

    ``blend`` (inference only): per-step weights w_i of annealed importance guidance,
    eps_i = (1 - w_i) eps_ref + w_i eps (models/inference.py); w_i = 0 or 1 runs one network only,
    so an all-0 blend is exactly the reference model and an all-1 blend exactly the policy.
    ``inpaint``: repaint the masked part of a known image (models/inpaint.py), as diffusers'
    StableDiffusionInpaintPipeline does, with a 9-channel inpainting UNet or a 4-channel one; the
    image size is the input's. An inpainting UNet without ``inpaint`` draws whole images (all hole).
    """
    if blend is not None and (track_grad or len(blend) != settings.steps):
        raise ValueError(f"blend is for inference (track_grad=False) and needs one weight per step ({settings.steps})")
    if not track_grad:  # pure inference: inference_mode skips autograd bookkeeping (faster than no_grad)
        with torch.inference_mode():
            return _sample(policy, prompts, settings, generator, with_ref, False, latents, blend, inpaint)
    return _sample(policy, prompts, settings, generator, with_ref, True, latents, None, inpaint)


def _blended_eps(policy: Policy, x_t, t, cond, guidance: float, w: float, extra=None) -> torch.Tensor:
    """(1 - w) eps_ref + w eps, computing only the networks whose weight is non-zero."""
    if w == 1.0:
        return policy.eps(x_t, t, cond, guidance, extra)
    ref = policy.eps_ref(x_t, t, cond, guidance, extra)
    return ref if w == 0.0 else (1 - w) * ref + w * policy.eps(x_t, t, cond, guidance, extra)


def _start(policy, prompts, settings, generator, latents, inpaint, scheduler, dtype):
    """(timesteps, x at the first one, the inpainting tensors or None) for one pass."""
    comps = policy.components
    device = next(comps.unet.parameters()).device
    scheduler.set_timesteps(settings.steps, device=device)  # also resets multistep state
    if inpaint is None and is_inpainting_unet(comps.unet):
        inpaint = InpaintInputs.whole_image(len(prompts), settings.height, settings.width, device)  # all hole
    if inpaint is None:  # PNDM may take more model calls than steps
        start = latents if latents is not None else initial_latents(policy, len(prompts), settings, generator, device, dtype, scheduler)
        return scheduler.timesteps, start, None
    timesteps = strength_timesteps(scheduler, settings.steps, inpaint.strength)
    prepared = prepare(inpaint, comps.vae, comps.unet.config.in_channels, scheduler, timesteps, generator, dtype, comps.vae_scale_factor)
    return timesteps, latents if latents is not None else prepared.latents, prepared


def _sample(policy, prompts, settings, generator, with_ref, track_grad, latents, blend=None, inpaint=None) -> SampleOutput:
    comps = policy.components
    scheduler = scheduler_for(comps.scheduler, settings.scheduler)
    size = tuple(inpaint.pixels.shape[2:]) if inpaint is not None else (settings.height, settings.width)
    cond = policy.condition(list(prompts), settings.negative_prompt, *size)  # [2B] uncond; cond
    timesteps, latents, prepared = _start(policy, prompts, settings, generator, latents, inpaint, scheduler, cond.dtype)
    unet_extra = prepared.unet_extra() if prepared is not None else None  # [B, 5, h, w] for a 9-channel UNet
    if blend is not None and len(blend) != len(timesteps):
        raise ValueError(f"blend needs one weight per scheduler timestep ({len(timesteps)}), got {len(blend)}")
    if settings.truncation_steps > len(timesteps):
        raise ValueError(f"truncation_steps K={settings.truncation_steps} exceeds the {len(timesteps)} steps left at this strength")
    extra = step_kwargs(scheduler, settings.eta, generator)
    # The steps' t as host numbers too, read once before the loop, for the scheduler: with a device tensor t,
    # DDIM's `prev_t >= 0` is a host sync at every step (tests/test_perf.py proves the loop has none). The UNet
    # gets the tensor t: a Python int would be a constant to torch.compile (one graph per step).
    ts = timesteps.tolist()
    latents, eps_all, ref_all = _denoise(policy, settings, scheduler, timesteps, ts, latents, cond, extra, track_grad,
                                         with_ref, blend, unet_extra, prepared)
    first_grad = len(ts) - settings.truncation_steps
    images = decode(policy, latents, generator, checkpointed=track_grad and settings.vae_checkpointing)
    if inpaint is not None and inpaint.paste_back:
        images = paste_back(images, inpaint)
    return SampleOutput(
        images=images,
        latents=latents,
        eps=torch.stack(eps_all),  # [K, B, C, h, w]
        eps_ref=torch.stack(ref_all) if with_ref else None,  # [K, B, C, h, w]
        timesteps=[int(t) for t in ts[first_grad:]],
    )


def _denoise(policy, settings, scheduler, timesteps, ts, latents, cond, extra, track_grad, with_ref, blend, unet_extra, prepared):
    """The T steps: (x_0 latents, [eps at the K gradient steps], [eps_ref there]). Nothing in here reads a
    tensor's value on the host (no .item(), no Python branch on a tensor): the GPU queue never drains."""
    first_grad = len(ts) - settings.truncation_steps
    eps_all, ref_all = [], []
    for i, (t, t_host) in enumerate(zip(timesteps, ts)):  # 0-d tensor t (iterating reads no value), its number
        grad_step = track_grad and i >= first_grad
        with torch.set_grad_enabled(grad_step):
            x_t = scheduler.scale_model_input(latents, t_host)
            if grad_step and settings.gradient_checkpointing:
                eps = checkpoint(policy.eps, x_t, t, cond, settings.guidance, unet_extra, use_reentrant=False)
            elif blend is not None:
                eps = _blended_eps(policy, x_t, t, cond, settings.guidance, blend[i], unet_extra)
            else:
                eps = policy.eps(x_t, t, cond, settings.guidance, unet_extra)
            if i >= first_grad:
                eps_all.append(eps)
                if with_ref:
                    ref_all.append(policy.eps_ref(x_t, t, cond, settings.guidance, unet_extra))
            latents = scheduler.step(eps, t_host, latents, **extra, return_dict=False)[0]
            if prepared is not None:  # 4-channel inpainting: the known image outside the mask
                latents = inpaint_blend(prepared, scheduler, latents, timesteps, i)
    return latents, eps_all, ref_all


def decode(policy: Policy, latents: torch.Tensor, generator=None, checkpointed: bool = False) -> torch.Tensor:
    """Latents -> images in [0, 1] through the frozen VAE (differentiable), as the pipeline does.

    ``checkpointed``: keep no decoder activations for backward, recompute them there (the decoder of a
    1024 px image holds several GB of activations; the recomputation is one more decode).
    """
    vae = policy.components.vae
    with vae_precision(vae, latents) as (latents,):
        scaled = latents / vae.config.scaling_factor
        if checkpointed and torch.is_grad_enabled():
            pixels = checkpoint(_vae_decode, vae, scaled, generator, use_reentrant=False)  # [-1, 1]
        else:
            pixels = _vae_decode(vae, scaled, generator)  # [-1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1)


def _vae_decode(vae, scaled_latents: torch.Tensor, generator) -> torch.Tensor:
    """[B, 4, h, w] unscaled latents -> pixels [B, 3, H, W] in [-1, 1] (honours enable_slicing/enable_tiling)."""
    return vae.decode(scaled_latents, return_dict=False, generator=generator)[0]
