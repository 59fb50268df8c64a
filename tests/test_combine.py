"""Weighted sums of normalised rewards: hand values, logging of components, config forms, start-up checks."""

import pytest
import torch

from models.objective import Objective, Weights, score_parts
from models.policy import Policy
from models.sampler import SamplerSettings
from rayjobs.cluster.preflight import preflight
from rayjobs.config import validate
from rayjobs.errors import UserError
from rewards import RewardSum, TermSpec, affine, build_reward, build_reward_sum


def test_affine_forms():
    assert affine() == (1.0, 0.0)
    assert affine(scale=2.0, shift=-1.0) == (2.0, -1.0)
    assert affine(mean=21.0, std=0.5) == (2.0, -42.0)  # (r - 21) / 0.5
    with pytest.raises(ValueError, match="not both"):
        affine(scale=2.0, mean=1.0, std=1.0)
    with pytest.raises(ValueError, match="both mean and std"):
        affine(mean=1.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        affine(mean=1.0, std=0.0)


def filled(values):
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()  # grey images [B, 3, 4, 4]


def test_reward_sum_hand_values():
    """brightness(target 0) = -mean luma = -v for grey v. R = 2 * (10 * r + 1) + 0.5 * (r / 0.1 - 0)."""
    specs = [TermSpec("brightness", {"target": 0.0}, weight=2.0, scale=10.0, shift=1.0), TermSpec("brightness", {"target": 0.0}, 0.5, *affine(mean=0.0, std=0.1))]
    reward = build_reward_sum(specs)
    images = filled([0.2, 0.5])
    total, parts = reward.parts(images, ["a", "b"])
    r = torch.tensor([-0.2, -0.5])
    assert torch.allclose(parts["brightness"], r) and torch.allclose(parts["brightness#2"], r)
    assert torch.allclose(total, 2 * (10 * r + 1) + 0.5 * (r / 0.1))
    assert torch.allclose(reward(images, ["a", "b"]), total)
    assert "brightness" in reward.describe()


def test_single_plain_reward_is_not_wrapped():
    assert not isinstance(build_reward_sum([TermSpec("colorfulness", {})]), RewardSum)
    assert isinstance(build_reward_sum([TermSpec("colorfulness", {}, scale=2.0)]), RewardSum)
    plain = build_reward("colorfulness")
    images = torch.rand(2, 3, 4, 4)
    total, parts = score_parts(plain, images, ["a", "b"])
    assert parts == {} and torch.equal(total, plain(images, ["a", "b"]))


def test_objective_logs_every_component(tiny):
    reward = build_reward_sum([TermSpec("colorfulness", {}, 1.0), TermSpec("brightness", {}, 0.5, 2.0, 0.0)])
    settings = SamplerSettings(steps=2, guidance=3.0, truncation_steps=1, height=32, width=32)
    loss, metrics = Objective(Weights(reward=1.0), settings, reward)(Policy(tiny), {"prompts": ["a", "b"], "generator": torch.Generator().manual_seed(0)})
    assert {"reward/colorfulness", "reward/brightness"} <= set(metrics)
    assert torch.allclose(metrics["reward"], metrics["reward/colorfulness"] + 0.5 * 2.0 * metrics["reward/brightness"], atol=1e-6)


def test_config_forms():
    cfg = validate({"reward": {"terms": [{"name": "colorfulness", "mean": 0.3, "std": 0.1}, {"name": "brightness", "weight": 2, "scale": 3}]}})
    specs = cfg.reward.specs()
    assert [(s.name, s.weight) for s in specs] == [("colorfulness", 1.0), ("brightness", 2.0)]
    assert specs[0].scale == pytest.approx(10.0) and specs[0].shift == pytest.approx(-3.0)
    single = validate({"reward": {"name": "colorfulness", "scale": 2}}).reward.specs()
    assert len(single) == 1 and single[0].scale == 2.0
    for bad, field in [
        ({"reward": {"name": "colorfulness", "terms": [{"name": "brightness"}]}}, "config reward: give either"),
        ({"reward": {"name": None}}, "config reward: give a reward name"),
        ({"reward": {"terms": [{"name": "brightness", "mean": 1.0}]}}, "config reward.terms.0: mean/std"),
        ({"reward": {"std": -1, "mean": 0}}, "config reward.std"),
        ({"reward": {"terms": [{"weight": 1}]}}, "config reward.terms.0.name"),
    ]:
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            validate(bad)


def test_preflight_names_the_term_with_missing_weights():
    cfg = validate({"reward": {"terms": [{"name": "colorfulness"}, {"name": "pickscore", "mean": 21, "std": 1}]}})
    with pytest.raises(UserError) as info:
        preflight(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("reward.terms.1.kwargs.model: PickScore CLIP model not found")
    assert "draftray weights fetch pickscore" in msg


def test_preflight_diversity_fallback_when_lpips_weights_absent(capsys):
    cfg = validate({"diversity": {"name": "lpips"}})
    resolved = preflight(cfg)
    assert resolved.diversity.name == "pairwise_rms" and cfg.diversity.name == "lpips"
    err = capsys.readouterr().err
    assert "lpips unavailable" in err and "using pairwise_rms" in err
    strict = validate({"diversity": {"name": "lpips", "fallback": None}})
    with pytest.raises(UserError, match="^diversity.kwargs.backbone: LPIPS alex"):
        preflight(strict)
    random_backbone = validate({"diversity": {"name": "lpips", "kwargs": {"backbone": "random"}}})
    assert preflight(random_backbone).diversity.name == "lpips"
