"""The shipped toy world weights (docs/toy-world.md): the reward model measures what it claims, the diffusion model
loads with diffusers' own from_pretrained and draws what its captions say."""

import pytest
import torch

import rewards
from models.components import TOY, TOY_DIR
from models.loading import load_components
from rewards.toy import WEIGHTS, caption_match, load_toy_net
from rewards.toy_train import evaluate_toy_net
from rewards.toyworld import Scene, ToyWorld, render

# Measured on the shipped weights: see models/weights/toy/README.md and docs/toy-world.md.
MIN_CLASSIFIER_ACCURACY = 0.95  # held-out shape / colour accuracy of the toy classifier on rendered scenes
MIN_CAPTION_ACCURACY = 0.6  # shape AND colour right on the small fixed prompt set below (4 seeds each)


@pytest.fixture(scope="module")
def net():
    return load_toy_net()


def test_shipped_files_are_small():
    model = sum(p.stat().st_size for p in TOY_DIR.rglob("*") if p.is_file())
    assert model < 20e6, f"the shipped toy model directory is {model / 1e6:.1f} MB (budget ~20 MB)"
    assert WEIGHTS.stat().st_size < 4e6
    assert (TOY_DIR / "README.md").is_file() and (WEIGHTS.parent / "README.md").is_file()  # the model cards


def test_classifier_reads_rendered_scenes(net):
    report = evaluate_toy_net(net, ToyWorld(seed=12345), n=256)
    assert report["acc_shape"] >= MIN_CLASSIFIER_ACCURACY and report["acc_color"] >= MIN_CLASSIFIER_ACCURACY
    assert report["appeal_corr"] > 0.9


def test_caption_reward_ranks_matching_over_non_matching():
    reward = rewards.build_reward("toy_caption")
    images, captions, scenes = ToyWorld(seed=7).batch(16)
    wrong = [f"a {'blue' if s.color != 'blue' else 'red'} {'square' if s.shape != 'square' else 'star'}" for s in scenes]
    assert (reward(images, captions) > reward(images, wrong)).all()


def test_appeal_reward_prefers_large_centred_shapes_and_is_differentiable():
    reward = rewards.build_reward("toy_appeal")
    big = Scene("circle", "black", "white", "large", 0.5, 0.5, 0.36)
    small = Scene("circle", "black", "white", "small", 0.2, 0.8, 0.15)
    images = render([big, small]).requires_grad_(True)
    r = reward(images, ["a black circle", "a black circle"])
    assert r[0] > r[1] + 0.5
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_toy_lpips_zero_for_identical_and_grows_with_difference():
    metric = rewards.build_diversity("toy_lpips")
    images, _, _ = ToyWorld(seed=3).batch(4)
    same = images[:1].repeat(4, 1, 1, 1)
    assert metric([same]) == pytest.approx(0.0, abs=1e-7)
    assert metric([images]) > metric([same + 0.01 * torch.randn_like(same)]) > 0


def test_toy_model_loads_with_from_pretrained():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_DIR, safety_checker=None, requires_safety_checker=False)
    comps = load_components(TOY)
    a = pipe.unet.state_dict()
    assert all(torch.equal(a[k], v) for k, v in comps.unet.state_dict().items())
    assert comps.vae.config.scaling_factor != 0.18215  # set from the toy latents' std by the pretraining


@torch.no_grad()
def test_samples_follow_their_captions(net):
    pipe = load_components(TOY).pipeline()
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green star", "a white circle", "a purple square"]
    seeds = [0, 1, 2, 3]
    batch = [p for p in prompts for _ in seeds]
    gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    images = pipe(batch, num_inference_steps=10, guidance_scale=3.0, generator=gens, output_type="pt").images
    assert images.shape == (len(batch), 3, 32, 32)
    accuracy = float(caption_match(net, images, batch)["both"].float().mean())
    assert accuracy >= MIN_CAPTION_ACCURACY, f"caption accuracy {accuracy:.2f}"


@pytest.mark.slow  # the fast tier keeps its siblings (make test's 10-minute budget)
def test_pretrain_command_writes_a_loadable_model_with_card(tmp_path):
    """`draftray toy pretrain`, cut to 2 + 2 steps: a diffusers-layout directory the loaders read back."""
    from rayjobs.cli import main

    out = tmp_path / "toy"
    assert main(["toy", "pretrain", "--out", str(out), "--vae-steps", "2", "--unet-steps", "2"]) == 0
    comps = load_components(str(out))
    assert comps.unet.config.sample_size == 8 and comps.vae.config.scaling_factor > 0
    assert {"README.md", "pretrain.json"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert main(["toy", "pretrain", "--out", str(out)]) == 2  # never overwrites
