"""Policy: LoRA/full trainable sets, the frozen reference, and what a training loop may touch."""

import pytest
import torch

from models.components import build_tiny
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings
from rewards import build_reward

GUIDANCE = 7.5


def unet_inputs(comps, seed=0):
    """x_t [2, 4, 16, 16], t, cond [4, 77, 32] = [uncond; cond] as guided_eps expects."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ids = comps.tokenizer(["", "", "a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        cond = comps.text_encoder(ids.input_ids)[0]
    return x, torch.tensor(501), cond


def base_eps(unet, x, t, cond):
    with torch.no_grad():
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
    return eps_u + GUIDANCE * (eps_c - eps_u)


def randomize(params, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_lora_at_init_reproduces_base_unet(tiny):
    base = build_tiny().unet
    policy = Policy(tiny)
    x, t, cond = unet_inputs(tiny)
    with torch.no_grad():
        assert torch.equal(policy.eps(x, t, cond, GUIDANCE), base_eps(base, x, t, cond))
        assert torch.equal(policy.eps(x, t, cond, 1.0), base(x, t, encoder_hidden_states=cond[2:]).sample)


def test_reference_is_base_after_lora_changes(tiny):
    base = build_tiny().unet
    policy = Policy(tiny)
    randomize(policy.parameters())
    x, t, cond = unet_inputs(tiny)
    expected = base_eps(base, x, t, cond)
    with torch.no_grad():
        adapted = policy.eps(x, t, cond, GUIDANCE)
    assert not torch.allclose(adapted, expected, atol=1e-4)  # the adapters do something
    assert torch.equal(policy.eps_ref(x, t, cond, GUIDANCE), expected)
    with policy.reference() as ref:
        assert torch.equal(base_eps(ref, x, t, cond), expected)
    with torch.no_grad():  # adapters are back on after the context
        assert torch.equal(policy.eps(x, t, cond, GUIDANCE), adapted)


def test_lora_trainable_set_is_exactly_lora_params(tiny):
    policy = Policy(tiny, lora_rank=4)
    names = set(policy.named_trainable())
    lora = {n for n, _ in tiny.unet.named_parameters() if "lora_" in n}
    assert names == lora and len(names) > 0
    assert all(("lora_A" in n or "lora_B" in n) for n in names)
    wanted = ("to_q", "to_k", "to_v", "to_out.0")
    hosts = {n.split(".lora_")[0] for n in names}  # the adapted Linear modules
    assert {next(w for w in wanted if h.endswith("." + w)) for h in hosts} == set(wanted)
    assert len(policy.parameters()) == len(names)
    assert all(p.shape[0] == 4 for n, p in policy.named_trainable().items() if "lora_A" in n)  # [r, in]
    for module in (tiny.vae, tiny.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_bad_trainable_raises(tiny):
    with pytest.raises(ValueError, match="trainable"):
        Policy(tiny, trainable="dora")


def test_full_finetune_reference_is_frozen_copy(tiny):
    base = build_tiny().unet
    policy = Policy(tiny, trainable="full")
    assert len(policy.parameters()) == len(list(tiny.unet.parameters()))
    with policy.reference() as ref:
        assert ref is not policy.unet
        assert not any(p.requires_grad for p in ref.parameters())
        ref_before = state(ref)
    x, t, cond = unet_inputs(tiny)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy.eps(x, t, cond, GUIDANCE).pow(2).mean().backward()
    opt.step()
    with policy.reference() as ref:
        assert_state_equal(ref_before, state(ref))
    assert not torch.equal(policy.unet.conv_in.weight, base.conv_in.weight)  # the policy moved
    assert torch.equal(policy.eps_ref(x, t, cond, GUIDANCE), base_eps(base, x, t, cond))


def test_training_loop_touches_only_trainable(tiny):
    policy = Policy(tiny)
    reward = build_reward("colorfulness")
    assert list(reward.parameters()) == [] and reward.state_dict() == {}
    base_unet = {k: v for k, v in state(tiny.unet).items() if "lora_" not in k}
    vae, text = state(tiny.vae), state(tiny.text_encoder)
    before = policy.trainable_state_dict()

    settings = SamplerSettings(steps=3, guidance=7.5, truncation_steps=1, height=32, width=32)
    objective = Objective(Weights(reward=1.0, kl_coeff=0.1), settings, reward)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)  # no decay: moves only by gradient
    for step in range(3):
        loss, metrics = objective(policy, {"prompts": ["a cat", "a dog"], "generator": torch.Generator().manual_seed(step)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and {"reward", "kl", "loss"} <= metrics.keys()

    after = policy.trainable_state_dict()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []
    assert_state_equal(base_unet, {k: v for k, v in state(tiny.unet).items() if "lora_" not in k})
    assert_state_equal(vae, state(tiny.vae))
    assert_state_equal(text, state(tiny.text_encoder))
    assert list(reward.parameters()) == [] and reward.state_dict() == {}


def test_trainable_state_dict_round_trip(tiny):
    policy = Policy(tiny)
    randomize(policy.parameters(), seed=1)
    saved = policy.trainable_state_dict()
    randomize(policy.parameters(), seed=2)
    assert not torch.equal(next(iter(saved.values())), policy.parameters()[0])  # saved copies are detached clones
    policy.load_trainable_state_dict(saved)
    for name, param in policy.named_trainable().items():
        assert torch.equal(param, saved[name])
        assert param.requires_grad


def test_load_trainable_state_dict_mismatch_raises(tiny):
    policy = Policy(tiny)
    saved = policy.trainable_state_dict()
    missing = dict(saved)
    missing.pop(next(iter(missing)))
    with pytest.raises(KeyError, match="missing"):
        policy.load_trainable_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected"):
        policy.load_trainable_state_dict({**saved, "conv_in.weight": torch.zeros(1)})
