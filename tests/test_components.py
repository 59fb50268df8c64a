"""Tiny components: determinism, frozen weights, the offline tokenizer, save/load in diffusers layout."""

import shutil

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline

from models.components import ModelNotFoundError, build_tiny, save_components
from models.loading import load_components

PROMPTS = ["a photo of a cat", "A Red Car, parked!  123", "an astronaut riding a horse on mars"]
EOT = 49407


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(321), encoder_hidden_states=cond).sample


def test_build_tiny_is_deterministic(tiny):
    other = build_tiny()
    for name, module in tiny.modules().items():
        a, b = module.state_dict(), other.modules()[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(tiny.unet.conv_in.weight, build_tiny(seed=1).unet.conv_in.weight)


def test_build_tiny_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_tiny()
    assert torch.equal(torch.get_rng_state(), state)


def test_all_modules_frozen_and_eval(tiny):
    for name, module in tiny.modules().items():
        assert not any(p.requires_grad for p in module.parameters()), name
        assert not module.training, name


def test_tiny_shapes(tiny):
    assert tiny.vae_scale_factor == 2
    assert tiny.unet.config.in_channels == 4 and tiny.unet.config.cross_attention_dim == 32
    assert unet_out(tiny.unet).shape == (1, 4, 16, 16)


def test_tokenizer_matches_open_clip(tiny):
    tok = tiny.tokenizer
    assert len(tok) == 49408 and tok.model_max_length == 77
    ref = open_clip.tokenize(PROMPTS)  # [N, 77], padded with 0
    ours = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids  # [N, 77]
    assert ours.shape == ref.shape
    for r, o in zip(ref, ours):
        n = int((r == EOT).nonzero()[0]) + 1  # up to and including end-of-text
        assert torch.equal(o[:n], r[:n])
        assert (r[n:] == 0).all()
    assert ours[0, 0] == 49406


def test_save_load_round_trip(tiny, tmp_path):
    save_components(tiny, tmp_path)
    loaded = load_components(str(tmp_path))
    for name, module in tiny.modules().items():
        a, b = module.state_dict(), loaded.modules()[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # bit-identical weights; outputs agree to float rounding (loaded buffers may differ in alignment)
    assert torch.allclose(unet_out(loaded.unet), unet_out(tiny.unet), atol=1e-5)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"


def test_saved_dir_loads_in_diffusers_pipeline(tiny, tmp_path):
    save_components(tiny, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None)
    assert torch.allclose(unet_out(pipe.unet), unet_out(tiny.unet), atol=1e-5)


def test_load_missing_path_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "\n" not in msg
    assert isinstance(info.value, FileNotFoundError)


def test_load_dir_without_unet_names_it(tiny, tmp_path):
    save_components(tiny, tmp_path)
    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(ModelNotFoundError, match=r"unet/") as info:
        load_components(str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and "\n" not in msg
    assert "vae" not in msg and "text_encoder" not in msg  # names only what is missing
