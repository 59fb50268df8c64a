"""Rewards and diversity metrics: registry, contract (shape, gradient, batch invariance), hand values."""

import inspect
import math

import pytest
import torch

import rewards
from rewards import DIVERSITY_METRICS, REWARDS, UnknownNameError, build_diversity, build_reward

BUILTINS = ["brightness", "colorfulness", "target_color"]


def rand_images(b=3, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 8, generator=g).requires_grad_(requires_grad)  # [B, 3, H, W]


def filled(rgb, b=1, h=4, w=4):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(b, 3, h, w).contiguous()


# ---- registry ------------------------------------------------------------------------------


def test_registry_lists_builtins():
    assert set(BUILTINS) <= set(REWARDS)
    assert "pairwise_rms" in DIVERSITY_METRICS


WEIGHT_FREE = sorted(n for n, b in REWARDS.items() if not hasattr(b, "sources"))  # the rest: test_clip_rewards.py


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_build_each_reward_frozen(name):
    reward = build_reward(name)
    assert callable(reward)
    if isinstance(reward, torch.nn.Module):
        assert not reward.training
        assert not any(p.requires_grad for p in reward.parameters())


def test_unknown_reward_name():
    with pytest.raises(UnknownNameError) as info:
        build_reward("aesthetic_v9")
    msg = str(info.value)
    assert "\n" not in msg and "aesthetic_v9" in msg
    assert all(name in msg for name in REWARDS)
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownNameError, match="pairwise_rms"):
        build_diversity("nope")


def test_bad_builder_kwargs_are_value_errors():
    with pytest.raises(ValueError, match="brightness"):
        build_reward("brightness", not_an_option=1)


# ---- the contract, for every reward ----------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_shape_and_gradient(name):
    reward = build_reward(name)
    images = rand_images(requires_grad=True)
    out = reward(images, ["p"] * 3)
    assert out.shape == (3,)
    out.sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    for i in range(3):  # each image gets its own gradient
        assert images.grad[i].abs().sum() > 0


@pytest.mark.parametrize("name", BUILTINS)
def test_batch_invariance(name):
    reward = build_reward(name)
    images = rand_images(b=4, seed=1)
    batched = reward(images, ["a", "b", "c", "d"])
    alone = torch.cat([reward(images[i : i + 1], ["abcd"[i]]) for i in range(4)])
    assert torch.allclose(batched, alone, atol=1e-6)


@pytest.mark.parametrize("name", BUILTINS)
def test_bad_inputs(name):
    reward = build_reward(name)
    with pytest.raises(ValueError, match="3"):
        reward(torch.rand(2, 4, 8, 8), ["a", "b"])  # 4 channels
    with pytest.raises(ValueError):
        reward(torch.rand(3, 8, 8), ["a"])  # no batch dim
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.rand(2, 3, 8, 8), ["a"])


def test_rewards_never_disable_grad():
    for module in (rewards.simple, rewards.registry, rewards.preference, rewards.clip, rewards.preprocess, rewards.combine):
        src = inspect.getsource(module)
        assert "no_grad" not in src and "inference_mode" not in src and ".detach()" not in src


# ---- hand-computed values ----------------------------------------------------------------------


def test_colorfulness_of_grey_is_about_zero():
    out = build_reward("colorfulness")(filled([0.5, 0.5, 0.5], b=2), ["a", "b"])
    # rg = yb = 0 everywhere: sigma = mu = sqrt(1e-6) = 1e-3 -> 1e-3 * (1 + 0.3)
    assert torch.allclose(out, torch.full((2,), 1.3e-3), atol=1e-7)


def test_colorfulness_of_two_pixels():
    images = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).view(1, 3, 1, 2)  # red pixel, blue pixel
    # rg = r - g = (1, 0): mean 0.5, var 0.25
    # yb = (r + g)/2 - b = (0.5, -1): mean -0.25, var 0.5625
    # sigma = sqrt(0.25 + 0.5625) = sqrt(0.8125) ; mu = sqrt(0.5^2 + 0.25^2) = sqrt(0.3125)
    expected = math.sqrt(0.8125) + 0.3 * math.sqrt(0.3125)  # ~= 1.069093
    out = build_reward("colorfulness", eps=0.0)(images, ["x"])
    assert out.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rgb,expected", [([1, 0, 0], 0.0), ([0, 0, 0], -1.0), ([1, 1, 1], -2.0)])
def test_target_color_red(rgb, expected):
    # -mean over pixels of squared RGB distance to red (1, 0, 0): black -> 1, white -> 0 + 1 + 1
    out = build_reward("target_color", color=(1.0, 0.0, 0.0))(filled(rgb), ["x"])
    assert out.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("rgb,expected", [([1, 1, 1], -0.2), ([0, 0, 0], -0.8), ([0, 1, 0], -0.213)])
def test_brightness(rgb, expected):
    # luma = 0.299 r + 0.587 g + 0.114 b: white 1 -> -|1-0.8|; black -> -0.8; green 0.587 -> -0.213
    out = build_reward("brightness", target=0.8)(filled(rgb), ["x"])
    assert out.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("target_color", dict(color=(2.0, 0.0, 0.0))),
        ("target_color", dict(color=(1.0, 0.0))),
        ("brightness", dict(target=1.5)),
        ("brightness", dict(target=-0.1)),
    ],
)
def test_bad_reward_settings(name, kwargs):
    with pytest.raises(ValueError):
        build_reward(name, **kwargs)


# ---- diversity ------------------------------------------------------------------------------


def test_pairwise_rms_values():
    metric = build_diversity("pairwise_rms")
    same = rand_images(b=1).repeat(3, 1, 1, 1)  # [3, 3, 8, 8], three copies of one image
    assert metric([same]) == pytest.approx(0.0, abs=1e-6)
    zero_one = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])  # [2, 3, 4, 4]
    assert metric([zero_one]) == pytest.approx(1.0, abs=1e-6)
    # mean over prompts: (0 + 1) / 2
    assert metric([same, zero_one]) == pytest.approx(0.5, abs=1e-6)
    assert isinstance(metric([zero_one]), float)


def test_pairwise_rms_hand_value_three_images():
    metric = build_diversity("pairwise_rms")
    imgs = torch.stack([torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.5), torch.ones(3, 2, 2)])  # [3, 3, 2, 2]
    # pairwise RMS distances: 0.5, 1.0, 0.5 -> mean 2/3
    assert metric([imgs]) == pytest.approx(2 / 3, abs=1e-6)


def test_pairwise_rms_bad_inputs():
    metric = build_diversity("pairwise_rms")
    with pytest.raises(ValueError, match=">= 2"):
        metric([torch.rand(1, 3, 4, 4)])
    with pytest.raises(ValueError):
        metric([])


def test_lpips_diversity_offline_zero_for_identical_images():
    """The lpips package's AlexNet LPIPS, random backbone (no download), shipped linear heads."""
    metric = build_diversity("lpips", backbone="random")
    assert "random backbone" in metric.describe()
    same = rand_images(1).repeat(3, 1, 1, 1)
    assert metric([same]) == pytest.approx(0.0, abs=1e-6)
    assert metric([rand_images(3, seed=1)]) > metric([same + 0.01 * rand_images(3, seed=2)]) > 0
    with pytest.raises(ValueError, match=">= 2 images"):
        metric([same[:1]])


def test_lpips_loads_torchvision_backbone_weights(tmp_path):
    """A torchvision AlexNet state_dict file (the layout of alexnet-owt-7be5be79.pth) lands in lpips' slices."""
    import torchvision

    torch.manual_seed(3)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(sd, tmp_path / "alexnet.pth")
    metric = build_diversity("lpips", backbone=str(tmp_path / "alexnet.pth"))
    assert "imagenet weights alexnet.pth" in metric.describe()
    net = metric.model.net
    assert torch.equal(getattr(net.slice1, "0").weight, sd["features.0.weight"])
    assert torch.equal(getattr(net.slice5, "10").bias, sd["features.10.bias"])
    same = rand_images(1).repeat(2, 1, 1, 1)
    assert metric([same]) == pytest.approx(0.0, abs=1e-6) and metric([rand_images(3, seed=4)]) > 0
    torch.save({"classifier.1.weight": sd["classifier.1.weight"]}, tmp_path / "other.pth")
    with pytest.raises(rewards.MissingWeightsError, match="backbone: .*lacks features.0.weight"):
        build_diversity("lpips", backbone=str(tmp_path / "other.pth"))
