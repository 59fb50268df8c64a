"""Export: what the trainer writes loads back in plain diffusers and reproduces the trained UNet."""

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from models.components import build_tiny
from models.export import LORA_FILE, export
from models.policy import Policy


def randomize(params, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)  # [B, C, h, w]
    cond = torch.randn(2, 77, 32, generator=g)  # [B, L, D]
    with torch.no_grad():
        return unet(x, torch.tensor(601), encoder_hidden_states=cond).sample


def fresh_pipeline():
    return build_tiny().pipeline()


def trained_lora_policy(comps):
    policy = Policy(comps, lora_rank=4, lora_alpha=8)  # scale alpha / rank = 2, not 1
    randomize(policy.parameters())
    return policy


def test_lora_export_loads_with_load_lora_weights(tiny, tmp_path):
    policy = trained_lora_policy(tiny)
    path = export(policy, tmp_path)
    assert path == tmp_path / LORA_FILE and path.is_file()

    pipe = fresh_pipeline()
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(str(tmp_path))
    expected = unet_out(policy.unet)
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA matters
    assert torch.allclose(unet_out(pipe.unet), expected, atol=1e-6)


def test_lora_export_keys(tiny, tmp_path):
    policy = trained_lora_policy(tiny)
    weights = load_file(str(export(policy, tmp_path)))
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert all(("lora_A" in k) or ("lora_B" in k) for k in weights)
    # one exported tensor per trainable tensor, equal values
    assert len(weights) == len(policy.named_trainable())
    trained = {n.replace(".default", ""): p for n, p in policy.named_trainable().items()}
    for key, value in weights.items():
        assert torch.equal(value, trained[key[len("unet."):]]), key


def test_full_export_loads_with_from_pretrained(tiny, tmp_path):
    policy = Policy(tiny, trainable="full")
    randomize(policy.parameters(), scale=0.01)
    path = export(policy, tmp_path)
    assert path == tmp_path  # a whole pipeline directory (models/export.export_full)
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    a, b = policy.unet.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(unet_out(loaded), unet_out(policy.unet), atol=1e-5)
    assert not torch.allclose(unet_out(loaded), unet_out(build_tiny().unet), atol=1e-3)
