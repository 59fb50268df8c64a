"""Objective terms against hand-computed numbers, and the weighted sum against a recomputation."""

import pytest
import torch

from models.components import build_tiny
from models.objective import (
    DenoiseSettings,
    Objective,
    Weights,
    denoise_loss,
    denoise_term,
    kl_term,
    min_snr_weight,
    reward_term,
    snr,
)
from models.policy import Policy
from models.sampler import SamplerSettings, sample
from rewards import build_reward

SETTINGS = SamplerSettings(steps=3, guidance=7.5, truncation_steps=2, height=32, width=32)
PROMPTS = ["a red apple", "a blue car"]


def randomize_lora(policy, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---- pure terms ----------------------------------------------------------------------------


def test_reward_term_negates():
    assert torch.equal(reward_term(torch.tensor([0.5, -1.0])), torch.tensor([-0.5, 1.0]))


def test_kl_term_hand_computed():
    # [K=2, B=2, C=1, h=1, w=2]; reference all ones.
    eps = torch.tensor([[[[[1.0, 2.0]]], [[[0.0, 0.0]]]], [[[[3.0, 0.0]]], [[[1.0, 1.0]]]]])
    ref = torch.ones_like(eps)
    # k0: b0 diff (0,1) -> 0.5 ; b1 diff (-1,-1) -> 1.0
    # k1: b0 diff (2,-1) -> 2.5 ; b1 diff (0,0)  -> 0.0
    # mean over K: b0 (0.5+2.5)/2 = 1.5 ; b1 (1+0)/2 = 0.5
    assert torch.allclose(kl_term(eps, ref), torch.tensor([1.5, 0.5]))


def test_kl_term_does_not_backprop_into_reference():
    eps = torch.randn(2, 2, 4, 3, 3, requires_grad=True)
    ref = torch.randn(2, 2, 4, 3, 3, requires_grad=True)
    kl_term(eps, ref).sum().backward()
    assert ref.grad is None
    # d/d eps of sum_b mean_k mean_e (eps-ref)^2 = 2 (eps - ref) / (K * C*h*w)
    assert torch.allclose(eps.grad, 2 * (eps - ref).detach() / (2 * 36))


def test_denoise_term_plain_and_weighted():
    pred = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 2.0]]]])  # [B=2, C=1, h=1, w=2]
    target = torch.zeros_like(pred)
    # b0: (1 + 9)/2 = 5 ; b1: (0 + 4)/2 = 2
    assert torch.allclose(denoise_term(pred, target), torch.tensor([5.0, 2.0]))
    # weights (2, 0.5) -> (10, 1)
    assert torch.allclose(denoise_term(pred, target, weight=torch.tensor([2.0, 0.5])), torch.tensor([10.0, 1.0]))


def test_denoise_term_mask_and_empty_mask():
    pred = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 2.0]]]])  # [B=2, C=1, h=1, w=2]
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])  # b1's mask is empty
    # b0: only element 1 -> 1^2 / 1 = 1 ; b1: empty -> 0
    out = denoise_term(pred, torch.zeros_like(pred), mask=mask)
    assert torch.equal(out, torch.tensor([1.0, 0.0]))


def test_denoise_term_mask_broadcasts_over_channels():
    pred = torch.tensor([[[[1.0, 3.0]], [[2.0, 4.0]]]])  # [B=1, C=2, h=1, w=2]
    mask = torch.tensor([[[[0.0, 1.0]]]])  # [B=1, 1, h=1, w=2] -> picks 3 and 4
    # (9 + 16) / 2 = 12.5
    assert torch.allclose(denoise_term(pred, torch.zeros_like(pred), mask=mask), torch.tensor([12.5]))


def test_min_snr_weight_epsilon_and_v():
    s = torch.tensor([0.5, 2.0, 10.0])
    # eps: min(snr, 5)/snr = (1, 1, 0.5)
    assert torch.allclose(min_snr_weight(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.5]))
    # v: min(snr, 5)/(snr+1) = (0.5/1.5, 2/3, 5/11)
    assert torch.allclose(min_snr_weight(s, 5.0, "v_prediction"), torch.tensor([1 / 3, 2 / 3, 5 / 11]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weight(s, 5.0, "sample")


def test_snr_hand_computed():
    alphas_cumprod = torch.tensor([0.5, 0.8, 0.2])
    # t=1: 0.8/0.2 = 4 ; t=0: 0.5/0.5 = 1 ; t=2: 0.2/0.8 = 0.25
    assert torch.allclose(snr(alphas_cumprod, torch.tensor([1, 0, 2])), torch.tensor([4.0, 1.0, 0.25]))


# ---- on the tiny model ---------------------------------------------------------------------


def test_kl_exactly_zero_at_init(tiny):
    policy = Policy(tiny)  # LoRA B = 0: policy == reference
    out = sample(policy, PROMPTS, SETTINGS, torch.Generator().manual_seed(0), with_ref=True)
    assert out.eps.shape == out.eps_ref.shape == (2, 2, 4, 16, 16)  # [K, B, C, h, w]
    assert torch.equal(kl_term(out.eps, out.eps_ref), torch.zeros(2))


def test_objective_reward_plus_kl_matches_recomputation(tiny):
    policy = Policy(tiny)
    randomize_lora(policy)
    reward = build_reward("colorfulness")
    objective = Objective(Weights(reward=1.0, kl_coeff=0.5), SETTINGS, reward)
    loss, metrics = objective(policy, {"prompts": PROMPTS, "generator": torch.Generator().manual_seed(7)})

    with torch.no_grad():
        out = sample(policy, PROMPTS, SETTINGS, torch.Generator().manual_seed(7), with_ref=True)
        r = reward(out.images, PROMPTS)  # [B]
        kl = (out.eps - out.eps_ref).pow(2).mean(dim=(2, 3, 4)).mean(dim=0)  # [K,B,C,h,w] -> [B]
    assert (kl > 0).all()
    expected = (-r + 0.5 * kl).mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(metrics["kl"], kl.mean(), rtol=1e-5)
    assert torch.allclose(metrics["reward"], r.mean(), rtol=1e-5)
    assert loss.requires_grad


@pytest.mark.parametrize("weights", [Weights(reward=1.0), Weights(reward=0.0, kl_coeff=0.1)])
def test_objective_needs_reward(weights):
    with pytest.raises(ValueError, match="reward"):
        Objective(weights, SETTINGS, reward=None)


def test_denoise_only_objective_equals_denoise_loss(tiny):
    policy = Policy(tiny)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # [B, C, h, w]
    objective = Objective(Weights(reward=0.0, denoise=1.0), SETTINGS, reward=None)
    batch = {"latents": latents, "captions": PROMPTS, "generator": torch.Generator().manual_seed(3)}
    loss, metrics = objective(policy, batch)
    with torch.no_grad():
        ref = denoise_loss(policy, latents, PROMPTS, torch.Generator().manual_seed(3))
    assert torch.allclose(loss.detach(), ref.mean(), rtol=1e-6)
    assert "reward" not in metrics and torch.allclose(metrics["denoise"], ref.mean(), rtol=1e-6)


def test_denoise_loss_min_snr_weight_is_applied(tiny):
    policy = Policy(tiny)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # [B, C, h, w]
    with torch.no_grad():
        plain = denoise_loss(policy, latents, PROMPTS, torch.Generator().manual_seed(5))
        weighted = denoise_loss(policy, latents, PROMPTS, torch.Generator().manual_seed(5), DenoiseSettings(min_snr_gamma=5.0))
    g = torch.Generator().manual_seed(5)  # replay the draws: noise first, then t
    torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    w = min_snr_weight(snr(tiny.scheduler.alphas_cumprod, t), 5.0, "epsilon")
    assert torch.allclose(weighted, plain * w, rtol=1e-5)


def test_denoise_loss_backprops_into_lora_only(tiny):
    policy = Policy(tiny)
    randomize_lora(policy)  # B != 0 so lora_A gets gradient too
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # [B, C, h, w]
    loss = denoise_loss(policy, latents, PROMPTS, torch.Generator().manual_seed(2))
    assert loss.shape == (2,)
    loss.mean().backward()
    for name, p in policy.unet.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for module in (tiny.vae, tiny.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_denoise_loss_gradient_checkpointing_equals_plain(tiny):
    """trainable.gradient_checkpointing recomputes the UNet in backward: same loss, same gradients."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # [B, C, h, w]
    grads = []
    for ckpt in (False, True):
        policy = Policy(build_tiny(), gradient_checkpointing=ckpt)
        randomize_lora(policy)
        loss = denoise_loss(policy, latents, PROMPTS, torch.Generator().manual_seed(2))
        loss.mean().backward()
        grads.append((loss.detach(), [p.grad.clone() for p in policy.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))
