"""Inference-time knobs: AIG schedules by hand, exact endpoints (base / tuned), LoRA scale."""

import pytest
import torch

from models.inference import aig_weights, describe_aig, lora_scale
from models.policy import Policy
from models.sampler import SamplerSettings, sample

SETTINGS = SamplerSettings(steps=4, guidance=3.0, height=32, width=32)
PROMPTS = ["a red circle", "a blue square"]


def test_schedules_by_hand():
    assert aig_weights("linear", 4) == (0.0, 0.25, 0.5, 0.75)
    assert aig_weights("power", 4, p=2) == (0.0, 0.0625, 0.25, 0.5625)
    assert aig_weights("power", 4, p=0) == (1.0, 1.0, 1.0, 1.0)  # (i/T)^0 = 1: the tuned model throughout
    assert aig_weights("step", 4, f=0.5) == (0.0, 0.0, 1.0, 1.0)
    assert aig_weights("base", 3) == (0.0, 0.0, 0.0) and aig_weights("draft", 3) == (1.0, 1.0, 1.0)
    assert [describe_aig("power", p=2), describe_aig("step", f=0.25), describe_aig("linear")] == ["power_2", "step_0.25", "linear"]
    for bad in [("cosine", {}), ("power", {"p": -1}), ("step", {"f": 1.5})]:
        with pytest.raises(ValueError):
            aig_weights(bad[0], 4, **bad[1])


@pytest.fixture
def tuned(tiny):
    """A LoRA policy whose adapters really change the model."""
    policy = Policy(tiny)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def draw(policy, **kw):
    return sample(policy, PROMPTS, SETTINGS, torch.Generator().manual_seed(1), track_grad=False, **kw).images


def base_images(policy):
    policy.unet.disable_adapters()
    try:
        return draw(policy)
    finally:
        policy.unet.enable_adapters()


def test_aig_endpoints_are_exactly_base_and_tuned(tuned):
    base, full = base_images(tuned), draw(tuned)
    assert not torch.equal(base, full)
    assert torch.equal(draw(tuned, blend=aig_weights("base", 4)), base)
    assert torch.equal(draw(tuned, blend=aig_weights("draft", 4)), full)
    assert torch.equal(draw(tuned, blend=aig_weights("power", 4, p=0)), full)
    mixed = draw(tuned, blend=aig_weights("linear", 4))
    assert not torch.equal(mixed, base) and not torch.equal(mixed, full)


def test_blend_needs_inference_and_one_weight_per_step(tuned):
    with pytest.raises(ValueError, match="one weight per step"):
        draw(tuned, blend=(0.0, 1.0))
    with pytest.raises(ValueError, match="inference"):
        sample(tuned, PROMPTS, SETTINGS, torch.Generator().manual_seed(1), blend=aig_weights("linear", 4))


def test_lora_scale_zero_is_base_one_is_tuned_and_restores(tuned):
    base, full = base_images(tuned), draw(tuned)
    before = [dict(m.scaling) for m in tuned.unet.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    with lora_scale(tuned, 0.0):
        assert torch.equal(draw(tuned), base)
    with lora_scale(tuned, 1.0):
        assert torch.equal(draw(tuned), full)
    with lora_scale(tuned, 0.5):
        half = draw(tuned)
    assert not torch.equal(half, base) and not torch.equal(half, full)
    after = [dict(m.scaling) for m in tuned.unet.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    assert before == after and torch.equal(draw(tuned), full)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        with lora_scale(tuned, 1.5):
            pass


@pytest.mark.parametrize(
    "knobs, words",
    [
        ("{lora_scales: [1.0]}", ["sweep.inference", "lora_scales must be in [0, 1)"]),
        ("{aig: [cosine]}", ["sweep.inference", "'cosine'", "power_<p>"]),
        ("{aig: [step_2]}", ["sweep.inference", "0 <= f <= 1"]),
    ],
)
def test_bad_inference_knobs_name_the_field(knobs, words):
    from rayjobs.config import load_config
    from rayjobs.errors import UserError

    base = ["sweep.params={objective.kl_coeff: {grid: [0.0]}}", f"sweep.inference={knobs}"]
    with pytest.raises(UserError) as info:
        load_config(None, base)
    assert all(w in str(info.value) for w in words), str(info.value)
