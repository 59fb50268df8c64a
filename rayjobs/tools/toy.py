"""Pretraining the toy world's diffusion model (docs/toy-world.md): `draftray toy pretrain`.

A Stable-Diffusion-architecture model (diffusers AutoencoderKL, UNet2DConditionModel,
transformers CLIPTextModel, the offline CLIP tokenizer, DDIM with SD 1.x's noise
schedule) trained from scratch on rewards.toyworld, from a fixed seed, on CPU:

    stage 1  VAE: 32 px RGB <-> 4x8x8 latents (factor 4), MSE + 1e-6 KL; then
             scaling_factor = 1 / std(latents) so scaled latents have unit variance (as SD's 0.18215)
    stage 2  UNet + text encoder jointly, eps prediction, min-SNR-5 weighting,
             10% empty captions (for classifier-free guidance), EMA of the weights

The result is a diffusers-layout directory (``StableDiffusionPipeline.from_pretrained``)
plus a model card. The shipped copy lives in models/weights/toy (models.components.TOY_DIR).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from models.components import Components, build_small_sd, save_components
from models.objective import denoise_term, min_snr_weight, snr
from models.tokenizer import write_compact_tokenizer
from rewards.toyworld import ToyWorld


@dataclass
class PretrainSettings:
    """Every knob of `draftray toy pretrain`; the shipped weights used these defaults."""

    seed: int = 0  # torch init + data stream; the whole result is a function of it (and of the torch build)
    image_size: int = 32  # pixels per side
    vae_steps: int = 800  # VAE optimizer steps
    vae_batch: int = 32  # images per VAE step
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6  # weight of the VAE's KL term against per-pixel MSE (SD's autoencoder uses 1e-6)
    unet_steps: int = 3000  # UNet + text encoder optimizer steps
    unet_batch: int = 64  # images per UNet step
    unet_lr: float = 1e-3  # peak AdamW lr, linear warmup then cosine to 10%
    warmup: int = 200  # warmup steps of both stages
    caption_dropout: float = 0.1  # fraction of empty captions: the unconditional branch of CFG
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999  # EMA of UNet and text encoder weights; the EMA weights are saved
    threads: int = 2  # torch CPU threads (results are reproducible for a fixed thread count)


def toy_architecture(seed: int) -> Components:
    """The untrained toy model, seeded: 32 px <-> 4x8x8 latents (VAE factor 4), UNet 48/96 channels, 32-d text.

    Sizes chosen for under 20 MB of float32 weights and ~0.55 s per 64-image step on 2 CPU cores.
    """
    return build_small_sd(seed, vae_channels=(32, 64, 64), unet_channels=(48, 96), image_size=32, text_dim=32, text_ff=128)


def _schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae: AutoencoderKL, world: ToyWorld, s: PretrainSettings, log) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, s.warmup, s.vae_steps)
    bar = tqdm(range(s.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        images, _, _ = world.batch(s.vae_batch, index=step)  # [B, 3, S, S] in [0, 1]
        pixels = images * 2 - 1  # [-1, 1], what SD's VAE sees
        dist = vae.encode(pixels).latent_dist
        recon = vae.decode(dist.sample()).sample
        mse = (recon - pixels).pow(2).mean()
        loss = mse + s.vae_kl * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        value = mse.item()
        bar.set_postfix(mse=f"{value:.4f}", refresh=False)
        if step % 100 == 0 or step == s.vae_steps - 1:
            log({"stage": "vae", "step": step, "mse": value})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, world: ToyWorld, n: int = 1024) -> float:
    """scaling_factor = 1 / std of the latents' means on n held-out images (index far from training)."""
    images, _, _ = world.batch(n, index=10_000_000)
    latents = vae.encode(images * 2 - 1).latent_dist.mean  # [n, 4, S/4, S/4]
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def train_denoiser(comps: Components, world: ToyWorld, s: PretrainSettings, log) -> None:
    unet, text, vae, tok, sched_ = comps.unet, comps.text_encoder, comps.vae, comps.tokenizer, comps.scheduler
    modules = [unet, text]
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    lr_sched = _schedule(opt, s.warmup, s.unet_steps)
    alphas = sched_.alphas_cumprod  # [1000]
    gen = torch.Generator().manual_seed(s.seed + 1)
    bar = tqdm(range(s.unet_steps), desc="unet+text", mininterval=5)
    for step in bar:
        images, captions, _ = world.batch(s.unet_batch, index=1_000_000 + step)
        drop = torch.rand(len(captions), generator=gen) < s.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample(gen) * vae.config.scaling_factor  # [B, 4, 8, 8]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        cond = text(ids)[0]  # [B, 77, 32]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(captions),), generator=gen)
        noisy = sched_.add_noise(latents, noise, t)
        eps = unet(noisy, t, cond).sample
        weight = min_snr_weight(snr(alphas, t), s.min_snr_gamma, "epsilon")  # [B]
        loss = denoise_term(eps, noise, weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            decay = min(s.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema, [p.detach() for p in params], decay)
        value = loss.item()
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if step % 100 == 0 or step == s.unet_steps - 1:
            log({"stage": "unet", "step": step, "loss": value})
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in modules:
        m.eval().requires_grad_(False)


def pretrain(out_dir: str | Path, s: PretrainSettings = PretrainSettings()) -> Path:
    """Train the toy model from scratch and write it (diffusers layout + model card) to out_dir."""
    out = Path(out_dir)
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    world = ToyWorld(seed=s.seed, size=s.image_size)
    comps = toy_architecture(s.seed)
    history: list[dict] = []
    t0 = time.time()
    train_vae(comps.vae, world, s, history.append)
    scale = set_latent_scale(comps.vae, world)
    t1 = time.time()
    train_denoiser(comps, world, s, history.append)
    t2 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    save_components(comps, out)
    write_compact_tokenizer(out / "tokenizer")  # keeps the shipped directory under ~20 MB
    record = {"settings": asdict(s), "latent_scaling_factor": scale, "vae_minutes": (t1 - t0) / 60, "unet_minutes": (t2 - t1) / 60}
    (out / "pretrain.json").write_text(json.dumps(record | {"history": history}, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(record), encoding="utf-8")
    return out


def model_card(record: dict) -> str:
    s = record["settings"]
    return f"""# draftray toy model

A Stable-Diffusion-1.x-architecture text-to-image model (diffusers `AutoencoderKL`,
`UNet2DConditionModel`, transformers `CLIPTextModel`, CLIP BPE tokenizer, DDIM scheduler with
SD 1.x's noise schedule) trained from scratch on draftray's toy world: coloured circles, squares,
triangles and stars on plain backgrounds, 32x32 px, captions like "a large red circle on a blue
background" (`rewards/toyworld.py`). Random weights, no download, made on a 2-core CPU.

Load it like any diffusers model: `StableDiffusionPipeline.from_pretrained("models/weights/toy")`,
or `model.name_or_path: toy` in a draftray config.

## How it was made

    draftray toy pretrain --out models/weights/toy --seed {s["seed"]}

- VAE: {s["vae_steps"]} AdamW steps x {s["vae_batch"]} images, lr {s["vae_lr"]}, MSE + {s["vae_kl"]} KL;
  latents 4x8x8; scaling_factor = 1/std(latents) = {record["latent_scaling_factor"]:.4f}.
  {record["vae_minutes"]:.1f} min.
- UNet + text encoder jointly: {s["unet_steps"]} AdamW steps x {s["unet_batch"]} images, peak lr {s["unet_lr"]}
  (warmup {s["warmup"]}, cosine to 10%), eps prediction with min-SNR-{s["min_snr_gamma"]} weights,
  {int(s["caption_dropout"] * 100)}% empty captions for classifier-free guidance, EMA {s["ema_decay"]} (the EMA weights
  are saved). {record["unet_minutes"]:.1f} min.
- torch threads: {s["threads"]}. Every scene and every noise draw comes from the seed; results repeat
  exactly for the same seed, torch build and thread count.

`pretrain.json` holds the settings and the loss curve.
"""


def accuracy_prompts() -> list[str]:
    """The fixed accuracy prompt set: every colour x every shape, 'a red circle' (32 prompts)."""
    from rewards.toyworld import COLOR_NAMES, SHAPES

    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c in COLOR_NAMES for s in SHAPES]


@torch.no_grad()
def caption_accuracy(
    model: str = "toy", seeds: tuple[int, ...] = (0, 1, 2, 3), steps: int = 20, guidance: float = 3.0, lora: str | None = None
) -> dict:
    """Samples accuracy_prompts() x seeds with diffusers' pipeline; the toy classifier checks shape AND colour.

    Returns {"accuracy", "shape_accuracy", "color_accuracy", "n"} plus the images [N, 3, H, W] under "images".
    """
    from models.export import LORA_FILE
    from models.loading import load_components
    from rewards.toy import caption_match, load_toy_net

    pipe = load_components(model).pipeline()
    if lora:
        pipe.load_lora_weights(lora, weight_name=LORA_FILE)
    prompts = [p for p in accuracy_prompts() for _ in seeds]
    gens = [torch.Generator().manual_seed(s) for _ in accuracy_prompts() for s in seeds]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images  # [N, 3, H, W] in [0, 1]
    match = caption_match(load_toy_net(), images, prompts)
    return {
        "accuracy": float(match["both"].float().mean()),
        "shape_accuracy": float(match["shape"].float().mean()),
        "color_accuracy": float(match["color"].float().mean()),
        "n": len(prompts),
        "images": images,
    }


def train_reward(out_file: str | Path, steps: int | None = None) -> dict:
    """Trains the toy reward model / classifier and writes its safetensors (+ a JSON report beside it)."""
    from safetensors.torch import save_file

    from rewards.toy_train import RewardTrainSettings, train_toy_net

    s = RewardTrainSettings() if steps is None else RewardTrainSettings(steps=steps)
    net, report = train_toy_net(s)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out))
    report["settings"] = asdict(s)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report
