"""SDXL (docs/sdxl.md) on the tiny SDXL-architecture model: conditioning and sampling equal diffusers'
StableDiffusionXLPipeline, DRaFT+ and the supervised presets run through the one loop, bad input is refused."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from shortrun import SHORT
from toydata import write_toy_images

from models.components import build_tiny, save_components
from models.conditioning import Conditioning
from models.loading import load_components
from models.policy import Policy
from models.sampler import SamplerSettings, sample
from models.schedulers import make_scheduler
from rayjobs.config import load_config
from rayjobs.errors import UserError
from rayjobs.training.loop import LocalContext, Worker

PROMPTS = ["a red circle", "a blue square on a white background"]
FAST = ["model.name_or_path=tiny-sdxl", *SHORT, "sampler.guidance=5.0", "train.batch_size=2", "train.eval_every=0"]


@pytest.fixture
def sdxl():
    return load_components("tiny-sdxl")


def lora_policy(comps, **kw):
    policy = Policy(comps, "lora", lora_rank=4, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B != 0: the adapted UNet differs from the base
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return policy


def pipeline_images(comps, negative, scheduler, guidance, steps=4):
    pipe = comps.pipeline()
    pipe.scheduler = make_scheduler(scheduler, comps.scheduler) if scheduler else comps.scheduler
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                    height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="pt").images  # fmt: skip


def test_tiny_sdxl_has_the_sdxl_architecture(sdxl):
    assert sdxl.is_sdxl and sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert isinstance(sdxl.pipeline(), StableDiffusionXLPipeline)
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler" and sdxl.tokenizer is not sdxl.tokenizer_2
    assert all(not p.requires_grad for m in sdxl.modules().values() for p in m.parameters())


def test_prompt_encoding_equals_the_pipelines(sdxl):
    policy = Policy(sdxl, "none", text_encoder="lora")  # something must train; the LoRA is zero at init
    ours = policy.condition(PROMPTS, "ugly", 32, 32)  # [2B]: uncond; cond
    pe, npe, pooled, npooled = sdxl.pipeline().encode_prompt(PROMPTS, device="cpu", negative_prompt="ugly")
    # one batch of 2B rows against two of B: equal up to the matmul's summation order
    assert torch.allclose(ours.states, torch.cat([npe, pe]), atol=1e-6) and torch.allclose(ours.pooled, torch.cat([npooled, pooled]), atol=1e-6)
    assert ours.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 4
    zeros = policy.condition(PROMPTS, "", 32, 32)  # force_zeros_for_empty_prompt, as for negative_prompt=None
    assert not zeros.states[:2].any() and not zeros.pooled[:2].any() and torch.allclose(zeros.states[2:], pe, atol=1e-6)


@pytest.mark.parametrize("negative, scheduler, guidance", [("", None, 5.0), ("ugly", None, 5.0), ("", "ddim", 5.0), ("", None, 1.0)])
def test_sampler_equals_the_sdxl_pipeline(sdxl, negative, scheduler, guidance):
    """Euler (SDXL's own) and DDIM, zeroed and written negatives, CFG on and off: same seed, same images."""
    policy = lora_policy(sdxl)
    s = SamplerSettings(steps=4, guidance=guidance, height=32, width=32, negative_prompt=negative, scheduler=scheduler)
    ours = sample(policy, PROMPTS, s, torch.Generator().manual_seed(7), track_grad=False).images
    theirs = pipeline_images(sdxl, negative, scheduler, guidance)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_full_backprop_equals_k_equals_t_and_reaches_the_lora(sdxl):
    """K = T is full backpropagation through the Euler chain; the LoRA A and B both get gradient."""
    policy = lora_policy(sdxl)
    s = SamplerSettings(steps=3, guidance=5.0, height=32, width=32, truncation_steps=3)
    out = sample(policy, PROMPTS[:1], s, torch.Generator().manual_seed(0), with_ref=True)
    assert out.eps.shape == (3, 1, 4, 16, 16) and out.eps_ref.shape == out.eps.shape
    (out.images.mean() + (out.eps - out.eps_ref).pow(2).mean()).backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_reference_is_the_unet_with_adapters_off(sdxl):
    policy = lora_policy(sdxl)
    cond = policy.condition(PROMPTS[:1], "", 32, 32)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    base = load_components("tiny-sdxl").unet
    with torch.no_grad():
        expected = base(torch.cat([x, x]), t, **cond.unet_kwargs(), return_dict=False)[0].chunk(2)
    ref = policy.eps_ref(x, t, cond, 5.0)
    assert torch.allclose(ref, expected[0] + 5.0 * (expected[1] - expected[0]), atol=1e-6)
    assert not torch.allclose(policy.eps(x, t, cond, 5.0), ref, atol=1e-4)  # the LoRA changes the policy


def test_denoise_term_noises_in_ddpm_form_whatever_the_euler_sampler_did(sdxl):
    """SDXL samples with Euler, whose add_noise is x_0 + sigma eps at its last sampling timesteps; the denoise
    terms must noise as the UNet was trained: sqrt(a_t) x_0 + sqrt(1 - a_t) eps, any t of the 1000."""
    from models.objective import denoise_loss

    policy = lora_policy(sdxl)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    before = denoise_loss(policy, x0, PROMPTS, torch.Generator().manual_seed(0))
    sample(policy, PROMPTS, SamplerSettings(steps=2, guidance=5.0, height=32, width=32), track_grad=False)
    after = denoise_loss(policy, x0, PROMPTS, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the draws of denoise_loss, in its order: eps, then t
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    a = torch.cumprod(1 - betas, 0)[t].float().view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    cond = policy.encode_prompts(PROMPTS).with_size(32, 32)  # the 16x16 latents' image size
    with torch.no_grad():
        pred = policy.unet(x_t, t, **cond.unet_kwargs(), return_dict=False)[0]
    hand = (pred - eps).pow(2).flatten(1).mean(1)  # [B]
    assert torch.equal(before, after) and torch.allclose(before, hand, rtol=1e-5)


def test_saved_sdxl_loads_back_as_sdxl(sdxl, tmp_path):
    save_components(sdxl, tmp_path / "m")
    back = load_components(str(tmp_path / "m"))
    assert back.is_sdxl and back.force_zeros_for_empty_prompt and type(back.scheduler).__name__ == "EulerDiscreteScheduler"
    s = SamplerSettings(steps=2, guidance=5.0, height=32, width=32)
    a = sample(Policy(sdxl, "lora"), PROMPTS, s, torch.Generator().manual_seed(1), track_grad=False).images
    b = sample(Policy(back, "lora"), PROMPTS, s, torch.Generator().manual_seed(1), track_grad=False).images
    assert torch.equal(a, b)


def test_another_vae_replaces_the_models(tmp_path):
    other = build_tiny().vae  # a VAE of the same latent shape, different weights
    other.save_pretrained(tmp_path / "vae")
    comps = load_components("tiny-sdxl", vae=str(tmp_path / "vae"))
    assert torch.equal(next(comps.vae.parameters()), next(other.parameters())) and not comps.vae.training


def test_conditioning_rows_cat_and_where():
    states, pooled = torch.randn(3, 4, 5), torch.randn(3, 2)
    c = Conditioning(states, pooled).with_size(64, 48)
    assert c.time_ids.tolist() == [[64, 48, 0, 0, 64, 48]] * 3 and len(c[1:]) == 2
    both = Conditioning.cat([c, c[:1]])
    assert both.states.shape == (4, 4, 5) and both.pooled.shape == (4, 2) and both.time_ids.shape == (4, 6)
    null = Conditioning(torch.zeros(1, 4, 5), torch.zeros(1, 2))
    mixed = c.where(torch.tensor([True, False, True]), null)
    assert not mixed.states[0].any() and not mixed.pooled[2].any() and torch.equal(mixed.states[1], states[1])
    with pytest.raises(ValueError, match="with_size"):
        Conditioning(states, pooled).unet_kwargs()


# ---- through the training loop (LocalContext) ---------------------------------------------


def _weights(worker):
    comps = worker.policy.components
    out = {f"unet.{n}": p.detach().clone() for n, p in comps.unet.named_parameters()}
    for prefix, encoder in (("te1", comps.text_encoder), ("te2", comps.text_encoder_2)):
        out |= {f"{prefix}.{n}": p.detach().clone() for n, p in encoder.named_parameters()}
    return out


def _changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_draftplus_step_moves_only_the_unet_lora(tmp_path):
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", "sampler.truncation_steps=2", "optim.warmup_steps=0"])
    worker = Worker(cfg, LocalContext(tmp_path))
    before = _weights(worker)
    result = worker.train_step(0)
    assert result.finite and result.metrics["kl"] == 0.0  # the LoRA is zero at init: policy = reference
    changed = _changed(before, _weights(worker))
    assert changed and all(n.startswith("unet.") and "lora_" in n for n in changed)
    worker.train_step(1)
    assert worker.train_step(2).metrics["kl"] > 0


def test_dreambooth_lora_on_both_text_encoders_with_new_tokens(tmp_path):
    """Denoise on SDXL: size time ids from the data, LoRA on the UNet and both encoders, a token in both."""
    data = tmp_path / "data"
    write_toy_images(data, 2, captions=False)
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", "objective.preset=pivotal", f"data.source={data}",
                                    "data.fixed_caption=a <shp>", "data.resolution=32", "trainable.text_encoder=lora",
                                    "trainable.tokens=[{token: <shp>, num_vectors: 2, init_token: circle}]",
                                    "optim.warmup_steps=0", "trainable.token_norm_target=0.4"])  # fmt: skip
    worker = Worker(cfg, LocalContext(tmp_path))
    rows = worker.policy.token_rows()
    assert [tuple(r.shape) for r in rows] == [(2, 16), (2, 32)]  # one per encoder, its own width
    before = _weights(worker)
    assert worker.train_step(0).finite
    changed = _changed(before, _weights(worker))
    assert {n.split(".")[0] for n in changed} == {"unet", "te1", "te2"}
    assert all("lora_" in n or n.endswith("new_rows") for n in changed)
    assert sum(n.endswith("new_rows") for n in changed) == 2


def test_text_cache_serves_the_pooled_embedding_too(tmp_path):
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", "data.cache_text_embeddings=true"])
    worker = Worker(cfg, LocalContext(tmp_path))
    prompts = ["a red circle", "", "a red circle"]
    direct = worker.policy._encode(prompts)
    cached = worker.policy.encode_prompts(prompts)
    again = Worker(cfg, LocalContext(tmp_path)).policy.encode_prompts(prompts)  # a later run: from disk
    for c in (cached, again):
        assert torch.allclose(c.states, direct.states, atol=1e-6) and torch.allclose(c.pooled, direct.pooled, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["trainable.unet_in_channels=8"], "trainable.unet_in_channels: InstructPix2Pix"),
        (["model.vae=/nonexistent/vae"], "model.vae: '/nonexistent/vae' is not a VAE directory"),
    ],
)
def test_bad_sdxl_options_are_one_line_before_anything_is_written(tmp_path, extra, message):
    from rayjobs.cluster.preflight import preflight

    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path / 'runs'}", *extra])
    with pytest.raises(UserError, match=message):
        preflight(cfg)
    assert not (tmp_path / "runs").exists()


# ---- the shipped SDXL presets, on the tiny SDXL -------------------------------------------

CONFIGS = __import__("pathlib").Path(__file__).parents[1] / "configs"
TINY_RUN = ["model.name_or_path=tiny-sdxl", "model.dtype=float32", "sampler.steps=2", "sampler.height=32", "sampler.width=32",
            "data.resolution=32", "data.eval_prompts=[a red circle]", "data.eval_seeds=[0,1]", "train.steps=1",
            "train.grad_accum=1", "train.eval_every=0", "ray.use_gpu=false", "ray.num_workers=1"]  # fmt: skip


@pytest.mark.parametrize(
    "preset, exported",
    [
        ("sdxl-draftplus.yaml", "kohya_lora.safetensors"),
        ("sdxl-dreambooth-lora.yaml", "kohya_lora.safetensors"),
        ("sdxl-negative-lora.yaml", "pytorch_lora_weights.safetensors"),
        ("sdxl-textual-inversion.yaml", "learned_embeds.safetensors"),
    ],
)
def test_each_sdxl_preset_runs_one_step_on_the_tiny_sdxl(tmp_path, preset, exported):
    """Only the model and sizes are overridden: the preset's objective, trainable set, memory switches and
    reward (PickScore needs real weights: swapped for the weight-free colourfulness) run as shipped."""
    from rayjobs.cluster.preflight import preflight
    from rayjobs.training.loop import train_loop

    data = tmp_path / "data"
    write_toy_images(data, 2, captions=False)
    reward = ["reward.name=colorfulness", "reward.kwargs={}"] if "draftplus" in preset else []
    tokens = ["trainable.tokens=[{token: <cat-toy>, num_vectors: 2, init_token: circle}]"] if "inversion" in preset else []
    cfg = load_config(CONFIGS / preset, TINY_RUN + [f"run.output_dir={tmp_path}", f"data.source={data}", *reward, *tokens])
    cfg = preflight(cfg)  # as `draftray train` does: the LPIPS metric falls back to pairwise_rms offline
    assert cfg.sampler.guidance == 5.0 and cfg.model.name_or_path == "tiny-sdxl"
    train_loop(cfg, tmp_path / "run", LocalContext(tmp_path / "run"))
    assert (tmp_path / "run" / "export" / exported).is_file()


def test_dreambooth_with_prior_draws_class_images_with_the_sdxl_sampler(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 2, captions=False)
    cfg = load_config(CONFIGS / "sdxl-dreambooth-lora.yaml", TINY_RUN + [
        f"run.output_dir={tmp_path}", f"data.source={data}", "objective.preset=dreambooth",
        f"data.class_dir={tmp_path / 'class'}", "data.class_prompt=a star", "data.num_class_images=2", "train.batch_size=1"])  # fmt: skip
    from rayjobs.cluster.preflight import preflight

    worker = Worker(preflight(cfg), LocalContext(tmp_path / "run"))
    worker.make_class_images()
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    result = worker.train_step(0)
    assert result.finite and result.metrics["prior"] > 0


def test_telling_sdxl_from_sd15_never_asks_the_hub_for_local_or_built_in_models(tmp_path, monkeypatch):
    import huggingface_hub

    from models.loading import is_sdxl_source

    def no_network(*args, **kwargs):
        raise AssertionError("asked the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    save_components(load_components("tiny-sdxl"), tmp_path / "xl")
    assert [is_sdxl_source(n) for n in ("toy", "tiny", "tiny-sdxl", str(tmp_path / "xl"), "./missing")] == [False, False, True, True, False]
