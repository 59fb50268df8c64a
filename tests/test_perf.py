"""Speed switches (perf:, models/perf.py): each gives the result it gives switched off, the compiled path is
the one used, the sampling loop never syncs with the host, bad values are one clear line.

Compilation: the aot_eager backend (a real dynamo trace, no code generation: ~5 s per graph) for most tests; one
test compiles with inductor (slow-marked: ~45 s with a cold inductor cache on 2 cores, ~20 s warm).
"""

from __future__ import annotations

import pytest
import torch

import models.sampler as sampler_module
import rewards
from models import perf
from models.policy import Policy
from models.sampler import SamplerSettings, sample
from rayjobs.config import Config, load_config
from rayjobs.errors import UserError
from rayjobs.training import sharding
from rayjobs.training.loop import LocalContext, Worker, _compile

SYNCS = ("item", "__bool__", "tolist", "__float__", "__int__")  # what reads a tensor's value on the host


def _settings(**kw) -> SamplerSettings:
    return SamplerSettings(**{"steps": 3, "guidance": 7.5, "height": 32, "width": 32, "truncation_steps": 1} | kw)


def _lora(tiny, b_scale: float = 0.05) -> Policy:
    """A LoRA policy whose B matrices are non-zero (so the adapter changes the UNet's output)."""
    policy = Policy(tiny, "lora")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_scale)
    return policy


def _images(policy, settings=None, track_grad=False, seed=0):
    return sample(policy, ["a red circle", "a blue square"], settings or _settings(), torch.Generator().manual_seed(seed),
                  with_ref=True, track_grad=track_grad)


# ---- no host sync in the sampling loop -------------------------------------------------------


@pytest.fixture
def no_host_sync(monkeypatch):
    """While models.sampler._denoise (the T steps) runs, reading a tensor's value on the host raises."""
    def boom(name):
        def raise_(*_a, **_k):
            raise AssertionError(f"host sync in the sampling loop: Tensor.{name}")
        return raise_

    loop, entered = sampler_module._denoise, []

    def guarded(*args, **kwargs):
        saved = {n: getattr(torch.Tensor, n) for n in SYNCS}
        entered.append(True)
        try:
            for n in SYNCS:
                setattr(torch.Tensor, n, boom(n))
            return loop(*args, **kwargs)
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)

    monkeypatch.setattr(sampler_module, "_denoise", guarded)
    return entered


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("track_grad", [True, False], ids=["grad", "no-grad"])
def test_ddim_sampling_loop_has_no_host_sync(tiny, no_host_sync, guidance, track_grad):
    out = _images(_lora(tiny), _settings(guidance=guidance, truncation_steps=2, gradient_checkpointing=track_grad), track_grad)
    assert no_host_sync and out.images.shape == (2, 3, 32, 32)
    assert out.timesteps == [334, 1]  # K=2 gradient steps' t, read once before the loop


def test_the_sync_guard_catches_a_sync(no_host_sync):
    """The guard is not vacuous: a Python branch on a tensor inside the loop fails the test above."""
    class Scheduler:
        def scale_model_input(self, x, t):
            return x

    class Policy_:
        def eps(self, x, *_a):
            return x if torch.tensor(1.0) else x  # the kind of line the loop must not have

    with pytest.raises(AssertionError, match=r"Tensor\.__bool__"):
        sampler_module._denoise(Policy_(), _settings(), Scheduler(), torch.tensor([3, 2, 1]), [3, 2, 1], torch.zeros(1), None, {},
                                False, False, None, None, None)


# ---- attention, channels_last ----------------------------------------------------------------


def test_attention_processors_give_the_same_images(tiny):
    from diffusers.models.attention_processor import AttnProcessor

    policy = _lora(tiny)
    default = _images(policy).images
    perf.set_attention(policy.unet, "math")
    assert all(isinstance(p, AttnProcessor) for p in policy.unet.attn_processors.values())
    math_ = _images(policy).images
    perf.set_attention(policy.unet, "sdpa")
    sdpa = _images(policy).images
    torch.testing.assert_close(math_, default, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa, default, atol=1e-5, rtol=0)


def test_xformers_not_installed_is_one_line():
    from diffusers.utils import is_xformers_available

    if is_xformers_available():
        pytest.skip("xformers is installed here")
    with pytest.raises(UserError, match=r"^config perf\.attention: xformers is not installed .*use sdpa"):
        load_config(None, ["perf.attention=xformers"])


def test_channels_last_gives_the_same_images(tiny):
    policy = _lora(tiny)
    before = _images(policy).images
    perf.channels_last(policy.unet, policy.components.vae)
    assert policy.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_images(policy).images, before, atol=1e-5, rtol=0)


# ---- torch.compile of the no-grad calls ------------------------------------------------------


class _Counting:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def test_compiled_unet_serves_the_no_grad_steps_only(tiny):
    policy = _lora(tiny)
    settings = _settings(steps=4, truncation_steps=1)
    loss = lambda out: out.images.mean() + (out.eps - out.eps_ref).pow(2).mean()  # noqa: E731
    expected = loss(_images(policy, settings, track_grad=True))
    eager = _Counting(policy.unet)
    policy.net = perf.compile_unet(policy.unet, eager, "sampling", backend="aot_eager")
    got = loss(_images(policy, settings, track_grad=True))
    assert policy.net.stats.calls == 3 and eager.calls == 1  # T-K = 3 no-grad steps compiled, the K=1 step eager
    assert policy.net.stats.compile_s > 0 and len(policy.net.stats.seen) == 1
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got.backward()  # the gradient path is the eager UNet's: LoRA gets gradients
    assert all(p.grad is not None for p in policy.parameters())


def test_compiled_sampler_sees_the_optimizer_update(tiny):
    """The compiled UNet shares the LoRA weights: after an optimizer step it samples with the new ones."""
    policy = _lora(tiny)
    policy.net = perf.compile_unet(policy.unet, backend="aot_eager")
    before = _images(policy, track_grad=True).images
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    for p in policy.parameters():
        p.grad = torch.ones_like(p)  # a large, known update (the images' own gradient is tiny here)
    optimizer.step()
    after = _images(policy, track_grad=True).images  # T-K steps through the compiled UNet
    calls = policy.net.stats.calls
    policy.net = policy.unet
    eager_after = _images(policy, track_grad=True).images
    assert calls == 4 and (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, eager_after, atol=1e-6, rtol=0)


@pytest.mark.slow  # the fast tier keeps its siblings (make test's 10-minute budget)
def test_compile_all_compiles_the_gradient_path_too(tiny):
    policy = _lora(tiny)
    expected = _images(policy, track_grad=True).images
    policy.net = perf.compile_unet(policy.unet, scope="all", backend="aot_eager")
    got = _images(policy, track_grad=True).images
    assert policy.net.stats.calls == 3 and len(policy.net.stats.seen) == 2  # 2 no-grad + 1 with grad
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_inductor_compiled_sampling_gives_the_same_images(tiny):
    """The real backend: inductor generates C++ kernels for the tiny UNet (2 cores: ~45 s with a cold inductor cache,
    ~20 s warm; slow-marked to keep the fast suite fast)."""
    policy = _lora(tiny)
    expected = _images(policy).images
    policy.net = perf.compile_unet(policy.unet, backend="inductor")
    torch.testing.assert_close(_images(policy).images, expected, atol=1e-4, rtol=0)
    assert policy.net.stats.calls == 3


def test_reduce_overhead_on_cpu_is_one_line(tmp_path):
    cfg = load_config(None, ["perf.compile=sampling", "perf.compile_mode=reduce-overhead", "ray.use_gpu=true"])  # a CPU worker anyway
    with pytest.raises(UserError, match=r"^perf\.compile_mode: reduce-overhead \(CUDA graphs\) needs a CUDA device; this worker runs on cpu$"):
        _compile(cfg, LocalContext(tmp_path), policy=None)


@pytest.mark.parametrize("overrides, message", [
    (["perf.compile=sampling", "perf.compile_mode=reduce-overhead"], r"^config perf\.compile_mode: reduce-overhead \(CUDA graphs\) needs CUDA workers"),
    (["perf.compile=sampling", "ray.strategy=fsdp", "trainable.kind=full"], r"^config perf\.compile: sampling runs with ray.strategy ddp only"),
])
def test_compile_contradictions_fail_in_the_config(overrides, message):
    """Before any worker starts (exit 2 from the CLI), not inside a Ray worker."""
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_compile_mode_without_compile_is_one_line():
    with pytest.raises(UserError, match=r"^config perf\.compile_mode: max-autotune needs perf\.compile sampling or all"):
        load_config(None, ["perf.compile_mode=max-autotune"])


def test_bad_perf_value_names_the_field():
    with pytest.raises(UserError, match=r"^config perf\.attention: Input should be 'default', 'sdpa', 'xformers' or 'math'"):
        load_config(None, ["perf.attention=flash"])


# ---- the worker: switches on == switches off; reward precision; DDP buckets --------------------

FAST = ["sampler.steps=3", "sampler.truncation_steps=1", "train.batch_size=1", "train.eval_every=0", "model.name_or_path=tiny"]


def test_worker_step_with_switches_equals_without(tmp_path):
    on = ["perf.compile=sampling", "perf.compile_backend=aot_eager", "perf.attention=math", "perf.channels_last=true"]
    off_out = Worker(load_config(None, FAST + [f"run.output_dir={tmp_path}"]), LocalContext(tmp_path / "off")).train_step(0).metrics
    worker = Worker(load_config(None, FAST + on + [f"run.output_dir={tmp_path}"]), LocalContext(tmp_path / "on"))
    on_out = worker.train_step(0).metrics
    assert worker.compiled.stats.calls == 2 and on_out["compile_s"] > 0
    for key in ("loss", "reward", "kl", "grad_norm"):
        assert on_out[key] == pytest.approx(off_out[key], abs=1e-5), key
    with worker.unwrapped():  # evaluation samples through the compiled UNet too
        assert isinstance(worker.policy.net, perf.NoGradCompiled)


def _reward_and_images():
    reward = rewards.build_reward_sum(Config().reward.specs())  # toy_appeal: the default's CNN reward
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return reward, images, ["a red circle"] * 4


def test_reward_bfloat16_is_close_to_float32():
    reward, images, prompts = _reward_and_images()
    expected = reward(images, prompts)
    bf16 = perf.reward_in(reward, "bfloat16")
    got = bf16(images, prompts)
    assert got.dtype == torch.float32 and next(reward.parameters()).dtype == torch.bfloat16
    # Measured max |bf16 - fp32| / |fp32| per score (bf16 keeps 8 mantissa bits): 2.5e-3 on these images (seed 0),
    # at most 3.2e-3 over image seeds 0-5, scores 1.35-1.85. Tolerance 1.25e-2: 5x this input, 4x the worst seed.
    assert not torch.equal(got, expected)  # bf16 did run
    torch.testing.assert_close(got, expected, atol=0, rtol=1.25e-2)
    images.requires_grad_(True)
    bf16(images, prompts).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_reward_float32_runs_outside_the_autocast():
    reward, images, prompts = _reward_and_images()
    expected = reward(images, prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reward(images, prompts)
        fp32 = perf.reward_in(reward, "float32")(images, prompts)
    assert not torch.equal(inside.float(), expected)  # bf16 autocast changes the scores...
    torch.testing.assert_close(fp32, expected, atol=0, rtol=0)  # ...the float32 switch undoes it exactly


def test_ddp_bucket_settings_reach_ddp(tiny, monkeypatch, tmp_path):
    seen = {}

    def fake_ddp(module, **kwargs):
        seen.update(kwargs)
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    cfg = load_config(None, ["ray.ddp_bucket_cap_mb=100", "ray.ddp_gradient_as_bucket_view=true"])
    ctx = LocalContext(tmp_path)
    ctx.world_size = 2  # as a Ray Train worker of two
    strategy = sharding.build(cfg, ctx, torch.amp.GradScaler("cpu", enabled=False))
    strategy.setup(Policy(tiny, "lora"), lambda policy: None)
    assert seen == {"device_ids": None, "bucket_cap_mb": 100.0, "gradient_as_bucket_view": True}
