"""CLIP-based rewards on tiny random models of the real classes, saved in the real layouts (no download).

Each reward is checked for: gradients that reach the images; parity with the model's official
preprocessing (transformers' image processors, open_clip's preprocess) at 224 px and after a resize
from 512 px; batch invariance; frozen weights through a training step; loading through the same
code path as the real files, and a clear error for a truncated or wrong file.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings
from models.tokenizer import clip_tokenizer_dir
from rewards import MissingWeightsError, build_reward
from rewards.builders import register_tiny_open_clip, save_aesthetic_head, save_hf_clip, save_open_clip
from rewards.preprocess import clip_preprocess


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny weights in the real layouts: a transformers CLIP dir, an HPS-style checkpoint, an aesthetic head."""
    root = tmp_path_factory.mktemp("reward-weights")
    arch = register_tiny_open_clip(root / "open_clip")
    return {
        "hf": save_hf_clip(root / "hf", clip_tokenizer_dir()),
        "arch": arch,
        "hps": save_open_clip(root / "hps.pt", arch),
        "head": save_aesthetic_head(root / "head.pth", dim=16),
    }


def settings(name, w):
    """Registry kwargs pointing each reward at the tiny weights."""
    return {
        "pickscore": dict(model=str(w["hf"]), processor=str(w["hf"])),
        "hpsv2": dict(checkpoint=str(w["hps"]), arch=w["arch"]),
        "hpsv2.1": dict(checkpoint=str(w["hps"]), arch=w["arch"]),
        "aesthetic": dict(clip=str(w["hf"]), head=str(w["head"])),
        "clipscore": dict(model=str(w["hf"])),
        "clipscore-open_clip": dict(backend="open_clip", model=str(w["hps"]), arch=w["arch"]),
    }[name]


NAMES = ["pickscore", "hpsv2", "hpsv2.1", "aesthetic", "clipscore", "clipscore-open_clip"]
PROMPTS = ["a red apple", "a blue car", "a red apple", "a dog in the snow"]


def build(name, w):
    return build_reward(name.split("-")[0], **settings(name, w))


def photo(size: int, seed: int = 0) -> Image.Image:
    """A smooth random image with an edge (a disc), as uint8 PIL: what the official paths read."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = (0.6 * base + 0.4 * ((xx**2 + yy**2) < 0.3).float()).clamp(0, 1)[0]  # [3, size, size]
    return Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy())


def as_tensor(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W] in [0, 1]


def test_registered():
    assert {"pickscore", "hpsv2", "hpsv2.1", "aesthetic", "clipscore"} <= set(rewards.REWARDS)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_images(name, weights):
    reward = build(name, weights)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.shape == (4,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert all(images.grad[i].abs().sum() > 0 for i in range(4))


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(name, weights):
    reward = build(name, weights)
    images = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    batched = reward(images, PROMPTS)
    alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_batches(name, weights):
    reward = build(name, weights)
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.rand(2, 3, 32, 32), ["one"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(2, 1, 32, 32), ["a", "b"])


@pytest.mark.parametrize("name", NAMES)
def test_weights_frozen_and_unchanged_by_a_step(name, weights):
    """Adam on the images: the images move, the reward's weights stay bit-identical and gradient-free."""
    reward = build(name, weights)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    before = {k: v.clone() for k, v in reward.state_dict().items()}
    logits = torch.zeros(2, 3, 32, 32, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    (-reward(torch.sigmoid(logits), PROMPTS[:2]).sum()).backward()
    opt.step()
    assert logits.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    assert all(torch.equal(before[k], v) for k, v in reward.state_dict().items())


def test_training_step_through_the_objective(weights, tiny):
    """A real DRaFT+ step on the tiny SD model against PickScore: LoRA moves, the reward does not."""
    reward = build("pickscore", weights)
    before = {k: v.clone() for k, v in reward.state_dict().items()}
    policy = Policy(tiny)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    settings_ = SamplerSettings(steps=2, guidance=3.0, truncation_steps=1, height=32, width=32)
    objective = Objective(Weights(reward=1.0, kl_coeff=0.1), settings_, reward)
    lora_before = [p.detach().clone() for p in policy.parameters()]
    loss, metrics = objective(policy, {"prompts": PROMPTS[:2], "generator": torch.Generator().manual_seed(0)})
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and "reward" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, policy.parameters()))
    assert all(torch.equal(before[k], v) for k, v in reward.state_dict().items())


# ---- parity with the official preprocessing ----------------------------------------------------


def official_hf(name, w, pil):
    """What the reference implementations do: the processor on a PIL image, then the model."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(str(w["hf"])).eval()
    results = []
    for processor in (CLIPImageProcessor, CLIPImageProcessorPil):  # transformers 5's torchvision and PIL backends
        pixels = processor.from_pretrained(str(w["hf"]))(images=pil, return_tensors="pt").pixel_values
        img = model.get_image_features(pixel_values=pixels)
        img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
        results.append(img)
    tok = CLIPTokenizer.from_pretrained(str(w["hf"]))(["a red apple"], padding=True, return_tensors="pt")
    txt = model.get_text_features(**tok)
    txt = getattr(txt, "pooler_output", txt)
    return results, txt, model.logit_scale.exp()


def official_open_clip(w, pil):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(w["arch"], pretrained=None)
    model.load_state_dict(torch.load(w["hps"])["state_dict"])
    model.eval()
    img = model.encode_image(preprocess(pil)[None])
    txt = model.encode_text(open_clip.get_tokenizer(w["arch"])(["a red apple"]))
    return [img], txt


def cos(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


@pytest.mark.parametrize("size,tol", [(224, 1e-3), (512, 2e-2)])
@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "aesthetic", "clipscore"])
def test_matches_official_preprocessing(name, size, tol, weights):
    """Scores from clip_preprocess vs the official path on the same uint8 image: within 1e-3 relative at
    224 px, 2% after resizing from 512 px. Random weights give near-zero cosines, so the relative error
    is taken on the image features, then on the score where its size allows."""
    reward = build(name, weights)
    pil = photo(size)
    ours = reward.encoder.image_features(reward.pixels(as_tensor(pil)))  # [1, D]
    if name == "hpsv2":
        refs, txt = official_open_clip(weights, pil)
        expected = [cos(r, txt) for r in refs]
    else:
        refs, txt, scale = official_hf(name, weights, pil)
        expected = {"pickscore": [scale * cos(r, txt) for r in refs], "clipscore": [100 * cos(r, txt) for r in refs]}.get(name)
        if name == "aesthetic":
            expected = [reward.head(F.normalize(r, dim=-1)).squeeze(1) for r in refs]
    score = reward(as_tensor(pil), ["a red apple"])
    for ref, exp in zip(refs, expected):
        assert (ours - ref).norm() / ref.norm() <= tol
        assert (score - exp).abs().item() <= tol * max(exp.abs().item(), 0.1 * _typical(name))


def _typical(name):
    return {"pickscore": 20.0, "hpsv2": 0.25, "aesthetic": 5.0, "clipscore": 25.0}[name]


def test_preprocess_shapes_and_crop():
    x = torch.rand(2, 3, 300, 200)  # portrait: shorter side (width) -> 224, then centre crop
    assert clip_preprocess(x).shape == (2, 3, 224, 224)
    square = torch.rand(1, 3, 224, 224)
    mean = torch.tensor(rewards.preprocess.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(rewards.preprocess.CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(clip_preprocess(square), (square - mean) / std)  # no resize at 224 px
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip_preprocess(torch.rand(3, 224, 224))


# ---- loading the real layouts, and the errors ---------------------------------------------------


def test_loaded_weights_are_the_saved_ones(weights):
    from transformers import CLIPModel

    saved = CLIPModel.from_pretrained(str(weights["hf"])).state_dict()
    ours = build("pickscore", weights).encoder.model.state_dict()
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in saved)
    hps = torch.load(weights["hps"])["state_dict"]
    loaded = build("hpsv2", weights).encoder.model.state_dict()
    assert all(torch.equal(hps[k], loaded[k]) for k in hps)
    head = torch.load(weights["head"])
    assert all(torch.equal(head[k], v) for k, v in build("aesthetic", weights).head.state_dict().items())


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("name,key", [("hpsv2", "checkpoint"), ("aesthetic", "head"), ("pickscore", "model")])
def test_truncated_file_is_a_clear_error(name, key, weights, tmp_path):
    kwargs = settings(name, weights)
    if name == "pickscore":  # a model directory whose safetensors file was cut short
        bad = tmp_path / "PickScore"
        bad.mkdir()
        for f in weights["hf"].iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        _truncated(weights["hf"] / "model.safetensors", bad / "model.safetensors")
    else:
        bad = _truncated(weights["hps"] if name == "hpsv2" else weights["head"], tmp_path / f"{key}.pt")
    kwargs[key] = str(bad)
    for attempt in (lambda: rewards.check(name, kwargs), lambda: build_reward(name, **kwargs)):
        with pytest.raises(MissingWeightsError) as info:
            attempt()
        msg = str(info.value)
        assert "\n" not in msg and key in msg and str(bad.name) in msg


def test_wrong_file_is_a_clear_error(weights):
    kwargs = settings("aesthetic", weights) | {"head": str(weights["hps"])}  # an HPS checkpoint as the head
    with pytest.raises(MissingWeightsError, match="head: .*does not fit"):
        build_reward("aesthetic", **kwargs)
    kwargs = settings("hpsv2", weights) | {"arch": "ViT-B-32"}  # the right file for another architecture
    with pytest.raises(MissingWeightsError, match="checkpoint: .*does not fit"):
        build_reward("hpsv2", **kwargs)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "hpsv2.1", "aesthetic", "clipscore"])
def test_missing_default_weights_name_key_and_fetch(name):
    """Offline and nothing cached: one line naming the config key, the location and the fetch command."""
    with pytest.raises(MissingWeightsError) as info:
        rewards.check(name, {}, where="reward.kwargs")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("reward.kwargs.")
    assert f"draftray weights fetch {name}" in msg


def test_hub_and_url_locations_resolve_from_the_caches(weights, tmp_path, monkeypatch):
    """'org/repo:file' resolves in the Hugging Face cache and an https URL in torch's hub cache."""
    import huggingface_hub.constants as hf_constants

    from rewards.sources import Source, resolve

    snapshot = tmp_path / "hf" / "models--xswu--HPSv2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "HPS_v2_compressed.pt").write_bytes(weights["hps"].read_bytes())
    (tmp_path / "hf" / "models--xswu--HPSv2" / "refs").mkdir()
    (tmp_path / "hf" / "models--xswu--HPSv2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    src = Source("checkpoint", "xswu/HPSv2:HPS_v2_compressed.pt", "file", "HPS", "hpsv2")
    assert resolve(src) == snapshot / "HPS_v2_compressed.pt"
    rewards.check("hpsv2", {"arch": weights["arch"]})  # the default v2.0 location now resolves

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    try:
        (tmp_path / "torch" / "checkpoints").mkdir(parents=True)
        (tmp_path / "torch" / "checkpoints" / "head+v2.pth").write_bytes(weights["head"].read_bytes())
        url = Source("head", "https://example.org/x/head%2Bv2.pth", "file", "head", "aesthetic")
        assert resolve(url) == tmp_path / "torch" / "checkpoints" / "head+v2.pth"
    finally:
        torch.hub.set_dir(previous)


def test_training_loop_logs_each_component(weights, tmp_path):
    """The real loop (no Ray) on the toy model against PickScore + toy_appeal, each normalised:
    the sum drives training, and both raw components are logged at every step and evaluation."""
    from rayjobs.config import load_config
    from rayjobs.runlog import read_metrics
    from rayjobs.training.loop import LocalContext, train_loop

    pick = f"{{name: pickscore, kwargs: {{model: {weights['hf']}, processor: {weights['hf']}}}, mean: 0.0, std: 0.5}}"
    cfg = load_config(None, [
        f"reward.terms=[{pick}, {{name: toy_appeal, weight: 2.0}}]", "sampler.steps=3",
        "data.eval_prompts=[a red circle]", "data.eval_seeds=[0,1]", "train.batch_size=1",
        "train.steps=2", "train.eval_every=2", f"run.output_dir={tmp_path}",
    ])  # fmt: skip
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    metrics = read_metrics(tmp_path)
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval/reward_mean" in m]
    assert len(steps) == 2 and all({"reward/pickscore", "reward/toy_appeal"} <= set(m) for m in steps)
    for m in evals:
        expected = m["eval/reward_pickscore"] / 0.5 + 2.0 * m["eval/reward_toy_appeal"]
        assert m["eval/reward_mean"] == pytest.approx(expected, rel=1e-5)


def test_real_architectures_have_the_published_shapes():
    """Built on the meta device (no memory): open_clip 3.3's ViT-H-14 has exactly the 686 keys of the
    HPS checkpoints, and the transformers configs of rewards/builders.py have the published sizes."""
    import open_clip
    from transformers import CLIPModel

    from rewards.builders import hf_clip_config

    with torch.device("meta"):
        hps = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
        h14 = CLIPModel(hf_clip_config("real-h14"))
        l14 = CLIPModel(hf_clip_config("real-l14"))
    assert len(hps.state_dict()) == 686
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in (hps, h14, l14)]
    assert millions == [986, 986, 428]  # ViT-H-14 (open_clip and transformers), ViT-L/14
    assert l14.config.projection_dim == 768  # the aesthetic head's input


def test_text_features_are_encoded_once_per_prompt(weights, monkeypatch):
    import rewards.preference as preference

    reward = build("pickscore", weights)
    calls = []
    encode = reward.encoder.text_features
    monkeypatch.setattr(reward.encoder, "text_features", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    first = reward(images, PROMPTS)
    again = reward(images, PROMPTS)
    assert torch.equal(first, again)
    assert calls == [sorted(set(PROMPTS))]  # three distinct prompts, encoded once, in one batch
    monkeypatch.setattr(preference, "TEXT_CACHE", 2)
    reward(images[:1], ["a new prompt"])
    assert len(reward._text_cache) == 2  # least recently used prompts dropped
