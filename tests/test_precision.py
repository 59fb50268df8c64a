"""Mixed precision (docs/performance.md): float16 with dynamic loss scaling keeps trainable weights float32, the VAE
float32 (SD's VAE overflows in float16), skips an overflowing step instead of stopping, and resumes its scale."""

import math
import sys

import pytest
import torch
from shortrun import SHORT
from toydata import finetune_worker

from models.components import build_tiny, vae_precision
from rayjobs.cluster.driver import progress_fields
from rayjobs.config import load_config
from rayjobs.errors import UserError
from rayjobs.training import checkpoint
from rayjobs.training.loop import LocalContext, Worker

FAST = [*SHORT, "train.batch_size=2", "model.dtype=float16"]


def _worker(tmp_path, *extra) -> Worker:
    return finetune_worker(tmp_path, FAST, *extra)


def test_float16_trains_with_a_loss_scale_and_float32_trainables(tmp_path):
    worker = _worker(tmp_path, "optim.lr=1e-2", "optim.warmup_steps=0")
    comps = worker.policy.components
    assert comps.vae.dtype == torch.float32 and comps.text_encoder.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in worker.policy.parameters())
    frozen = next(p for n, p in comps.unet.named_parameters() if "lora_" not in n)
    assert frozen.dtype == torch.float16
    before = {n: p.detach().clone() for n, p in worker.policy.named_trainable().items()}
    results = [worker.train_step(s) for s in range(2)]
    assert all(r.finite and r.metrics["overflow"] == 0.0 for r in results)
    assert results[0].metrics["loss_scale"] == 2.0**16  # no overflow: the scale grows only after growth_interval steps
    assert any(not torch.equal(before[n], p) for n, p in worker.policy.named_trainable().items())


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(tmp_path):
    worker = _worker(tmp_path)
    worker.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # loss * 2^120 overflows float16 gradients
    before = {n: p.detach().clone() for n, p in worker.policy.named_trainable().items()}
    result = worker.train_step(0)
    metrics = result.metrics
    assert result.finite and metrics["overflow"] == 1.0 and not math.isfinite(metrics["grad_norm"])
    assert metrics["loss_scale"] == 2.0**119
    assert all(torch.equal(before[n], p) for n, p in worker.policy.named_trainable().items())
    assert worker.schedule.last_epoch == 0  # the schedule did not advance either


def test_the_loss_scale_travels_with_the_checkpoint(tmp_path):
    worker = _worker(tmp_path)
    worker.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    worker.train_step(0)
    worker.save(tmp_path / "ckpt", 1)
    again = _worker(tmp_path)
    checkpoint.load(tmp_path / "ckpt", 0, again.optimizer, again.schedule, again.scaler)
    assert again.scaler.get_scale() == 2.0**119


def test_float16_reward_step_decodes_in_float32(tmp_path):
    """Under float16 autocast the reward step's VAE decode takes and gives float32 (latents cast up, autocast off
    inside), and the step stays finite with its loss scale."""
    cfg = load_config(None, FAST[:-1] + ["model.dtype=float16", f"run.output_dir={tmp_path}", "sampler.truncation_steps=1"])
    worker = Worker(cfg, LocalContext(tmp_path))
    vae, seen = worker.policy.components.vae, []
    decode = vae.decode

    def recording(z, *args, **kwargs):
        out = decode(z, *args, **kwargs)
        pixels = out[0] if isinstance(out, tuple) else out.sample  # return_dict=False gives a tuple
        seen.append((z.dtype, pixels.dtype, torch.is_autocast_enabled("cpu")))
        return out

    vae.decode = recording
    result = worker.train_step(0)
    assert seen and set(seen) == {(torch.float32, torch.float32, False)}
    assert result.finite and math.isfinite(result.metrics["reward"]) and "loss_scale" in result.metrics


def test_vae_precision_switches_autocast_off_only_for_a_float32_vae_under_float16():
    vae = build_tiny().vae
    latents = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        with vae_precision(vae, latents.half()) as (x,):
            assert x.dtype == torch.float32 and vae.decode(x).sample.dtype == torch.float32
        vae.to(torch.bfloat16)
        with vae_precision(vae, latents) as (x,):
            assert x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_progress_shows_the_terms_a_run_logs():
    assert progress_fields({"step": 3, "loss": 0.5, "denoise": 0.25}) == {"loss": "0.5", "denoise": "0.25"}
    assert set(progress_fields({"loss": 1.0, "reward": 2.0, "kl": 0.1, "loss_scale": 65536.0})) == {"loss", "reward", "kl", "loss_scale"}


def test_adamw8bit_keeps_8bit_moments_and_resumes_exactly(tmp_path):
    worker = _worker(tmp_path, "model.dtype=float32", "optim.name=adamw8bit", "trainable.kind=full", "optim.warmup_steps=0")
    assert type(worker.optimizer).__name__ == "AdamW8bit"
    assert worker.train_step(0).finite
    big = max(worker.policy.parameters(), key=lambda p: p.numel())
    assert worker.optimizer.state[big]["state1"].dtype == torch.uint8  # 8-bit first moment (>= 4096 elements)
    worker.save(tmp_path / "ckpt", 1)
    again = _worker(tmp_path, "model.dtype=float32", "optim.name=adamw8bit", "trainable.kind=full", "optim.warmup_steps=0")
    _, weights = checkpoint.load(tmp_path / "ckpt", 0, again.optimizer, again.schedule)
    again.policy.load_trainable_state_dict(weights)
    worker.train_step(1), again.train_step(1)
    mine, theirs = worker.policy.named_trainable(), again.policy.named_trainable()
    assert all(torch.equal(p, theirs[n]) for n, p in mine.items())  # the restored 8-bit state steps identically


def test_adamw8bit_without_bitsandbytes_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^optim.name adamw8bit: bitsandbytes is not installed"):
        _worker(tmp_path, "optim.name=adamw8bit")
