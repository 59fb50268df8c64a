"""SDXL memory switches change memory, nothing else (docs/sdxl.md).

A 1024 px SDXL DRaFT+ step fits a GPU only with the memory switches on: UNet gradient checkpointing
of the K gradient steps, VAE decoder checkpointing, reward checkpointing, and diffusers' VAE slicing
and tiling. Each trades compute for memory, so a switch that silently changed the loss or the
gradients would corrupt training while looking like a speed-up. These tests pin, on the tiny SDXL
model in float32 on the CPU, that the checkpointing switches give the same loss and LoRA gradients
(and really recompute), that slicing gives the same images, that tiling decodes with correct
gradients, and that a DRaFT+ step on SDXL moves only the LoRA weights.
"""

from __future__ import annotations

import pytest
import torch

import rewards
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings, decode
from models.sdxl import build_tiny_sdxl

PROMPTS = ["a red circle on a blue background", "a green square"]
KL = 0.1
SWITCHES = {  # name -> (UNet checkpointing, VAE checkpointing, reward checkpointing)
    "unet": (True, False, False),
    "vae": (False, True, False),
    "reward": (False, False, True),
    "all": (True, True, True),
}
OFF = (False, False, False)


def lora_policy(perturb: bool = True) -> Policy:
    """Tiny SDXL with a rank-4 LoRA. ``perturb``: B drawn non-zero (seeded), so that the A matrices
    get gradient too (at the B = 0 init only B does) and the comparison covers every LoRA weight."""
    policy = Policy(build_tiny_sdxl(), "lora", lora_rank=4)
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in policy.unet.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return policy


def objective(switches: tuple[bool, bool, bool], reward=None) -> Objective:
    """DRaFT+ with T=3 Euler steps, K=2 gradient steps, guidance 5, 32 px, kl 0.1, colourfulness."""
    unet, vae, rew = switches
    settings = SamplerSettings(
        steps=3, guidance=5.0, truncation_steps=2, height=32, width=32, gradient_checkpointing=unet, vae_checkpointing=vae
    )
    return Objective(Weights(reward=1.0, kl_coeff=KL), settings, reward or rewards.build_reward("colorfulness"), reward_checkpointing=rew)


def step(policy: Policy, switches: tuple[bool, bool, bool], reward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward from seed 0: (loss, {LoRA name: grad})."""
    for param in policy.parameters():
        param.grad = None
    loss, _ = objective(switches, reward)(policy, {"prompts": PROMPTS, "generator": torch.Generator().manual_seed(0)})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_trainable().items()}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return lora_policy()


@pytest.fixture(scope="module")
def baseline(policy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return step(policy, OFF)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_checkpointing_keeps_loss_and_lora_gradients(policy, baseline, name):
    """Recomputation replays the same float32 ops on the CPU: the loss and every LoRA gradient agree."""
    loss0, grads0 = baseline
    loss, grads = step(policy, SWITCHES[name])
    assert torch.isfinite(loss0) and any(g.abs().max() > 0 for n, g in grads0.items() if "lora_A" in n)
    assert grads.keys() == grads0.keys() and len(grads) > 0
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-7)
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-8, msg=lambda m, n=n: f"{name}: {n}: {m}")


class CountingReward(torch.nn.Module):
    """Colourfulness that counts its forward calls (a checkpointed reward runs twice per step)."""

    def __init__(self):
        super().__init__()
        self.inner, self.calls = rewards.build_reward("colorfulness"), 0

    def forward(self, images, prompts):
        self.calls += 1
        return self.inner(images, prompts)


@pytest.mark.parametrize("name", ["unet", "vae", "reward"])
def test_checkpointing_really_recomputes(policy, name):
    """Forward calls during forward + backward: each switch adds exactly its own recomputation.
    UNet: T=3 policy calls + K=2 reference calls, +K recomputed; VAE decoder: 1, +1; reward: 1, +1.
    Counted on entry (pre-hooks): torch stops a non-reentrant recomputation once it has the last
    tensor backward needs, so a recomputed module's forward may never reach its end."""
    calls = {"unet": 0, "vae": 0}
    hooks = [
        policy.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1)),
        policy.components.vae.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__("vae", calls["vae"] + 1)),
    ]
    try:
        counts = {}
        for on in (False, True):
            calls.update(unet=0, vae=0)
            reward = CountingReward()
            step(policy, SWITCHES[name] if on else OFF, reward)
            counts[on] = {"unet": calls["unet"], "vae": calls["vae"], "reward": reward.calls}
    finally:
        for hook in hooks:
            hook.remove()
    assert counts[False] == {"unet": 5, "vae": 1, "reward": 1}
    extra = {"unet": 2, "vae": 1, "reward": 1}[name]
    assert counts[True] == counts[False] | {name: counts[False][name] + extra}


def latents(batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    """Random VAE-scaled SDXL latents [B, 4, 16, 16] of the tiny model (32 px images)."""
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)


def test_vae_slicing_gives_the_same_images():
    """Slicing decodes a batch one image at a time: the same images (up to batched-GEMM rounding)."""
    policy = lora_policy(perturb=False)
    z = latents()
    with torch.no_grad():
        whole = decode(policy, z)
        policy.components.vae.enable_slicing()
        sliced = decode(policy, z)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


def tiled(policy: Policy) -> torch.nn.Module:
    """Tiling on the tiny VAE. diffusers tiles only latents larger than ``tile_latent_min_size``
    (default: sample_size / 2 = 16, the whole tiny latent), so shrink the tiles to 8 latents (16 px):
    3 x 3 overlapping tiles (stride 6 latents), blended over 4 px, cropped to 12 px."""
    vae = policy.components.vae
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 8
    return vae


def test_vae_tiling_decodes_with_gradient():
    """Tiled decode is differentiable with finite gradients to the latents, and near the untiled one.

    Tolerance, stated honestly: tiles are decoded separately and blended, and the decoder's GroupNorm
    statistics and mid-block attention see one tile, not the image, so the result differs everywhere,
    not only at seams. With the tiny random VAE the mean |tiled - untiled| is ~0.04 on [0, 1] images
    (max ~0.4); the bound is mean < 0.06. Tiling really ran: the difference is not zero.
    """
    policy = lora_policy(perturb=False)
    z = latents().requires_grad_(True)
    with torch.no_grad():
        whole = decode(policy, z)
    tiled(policy)
    images = decode(policy, z)
    images.mean().backward()
    diff = (images.detach() - whole).abs()
    assert images.shape == whole.shape == (2, 3, 32, 32)
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0
    assert 1e-4 < diff.max() and diff.mean() < 0.06


def test_vae_tiling_gradient_matches_finite_differences():
    """The gradient through the tiles' in-place blending is the true derivative of the tiled decode:
    autograd's directional derivative equals a central finite difference (float64, tight)."""
    policy = lora_policy(perturb=False)
    tiled(policy).double()
    z = latents(dtype=torch.float64).requires_grad_(True)
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def f(x):
        vae = policy.components.vae
        return (vae.decode(x / vae.config.scaling_factor, return_dict=False)[0] * weights).sum()

    f(z).backward()
    h = 1e-5
    with torch.no_grad():
        numeric = (f(z + h * direction) - f(z - h * direction)) / (2 * h)
    torch.testing.assert_close((z.grad * direction).sum(), numeric, rtol=1e-6, atol=1e-8)


def test_draftplus_step_moves_only_lora_weights():
    """After one AdamW step on SDXL, every non-LoRA UNet weight and all text-encoder and VAE weights are
    bit-identical (frozen, not merely unchanged by luck), and the LoRA B matrices moved off zero."""
    policy = lora_policy(perturb=False)
    comps = policy.components
    frozen = {f"{m}.{n}": p.detach().clone() for m, mod in comps.modules().items() for n, p in mod.named_parameters() if "lora_" not in n}
    b_before = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if "lora_B" in n}
    assert b_before and all(b.abs().max() == 0 for b in b_before.values())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    step(policy, SWITCHES["all"])
    optimizer.step()
    after = {f"{m}.{n}": p for m, mod in comps.modules().items() for n, p in mod.named_parameters() if "lora_" not in n}
    assert after.keys() == frozen.keys()
    changed = [n for n, p in after.items() if not torch.equal(p, frozen[n])]
    assert changed == []
    assert {n.split(".")[0] for n in after} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    trained = dict(policy.unet.named_parameters())
    assert all(not torch.equal(trained[n], b) for n, b in b_before.items())
