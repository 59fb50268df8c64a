"""bench/: the baseline DRaFT+ (bench/baseline.py) computes our loss and our LoRA gradients; the GPU suite's harness runs on the CPU."""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from bench.baseline import BaselineDraftPlus, Settings
from bench.flops import count_flops, mfu, peak_tflops
from models.components import build_tiny
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings
from models.sdxl import build_tiny_sdxl
from rewards.simple import Colorfulness

PROMPTS = ["a red circle", "a blue square"]
STEPS, GUIDANCE, KL_COEFF, SIZE, SEED = 4, 7.5, 0.5, 32, 3
# Every trainable tensor g: max|g_baseline - g_ours| <= GRAD_TOL * max|g_ours| (assert_close with that atol).
# Measured with grad_error below (the worst tensor; K = 1 and 2; LoRA A drawn from seeds 0-3): SD 1.x DDIM
# 1.1e-5, SD 1.x Euler 7.6e-6 (K = 1: 0, bit-identical), SDXL Euler 1.05e-4. With kl_coeff = 0, DDIM is
# bit-identical too: the residual is float32 rounding of eps_ref (our reference is the UNet with its adapters
# disabled, the baseline's a deep copy), magnified by the cancellation in eps - eps_ref (a few % of eps), the
# KL gradient's factor. SDXL adds its pooled text embedding (1.3e-5 even at kl_coeff = 0): we encode the B
# prompts and zero the negatives, the baseline encodes 2B rows, and the projection rounds 2.4e-7 apart.
# Tolerance: about 5x the worst measurement.
GRAD_TOL = {"sd15": 5e-5, "sdxl": 5e-4}
CASES = [("sd15", None), ("sd15", "euler"), ("sdxl", None)]  # (model, sampler); tiny-sdxl's own scheduler is Euler


class Run(NamedTuple):
    loss: float
    kl: float
    grads: dict[str, torch.Tensor]  # trainable parameter name -> gradient
    lora: dict[str, torch.Tensor]  # the LoRA weights the run used


def _components(arch: str):
    return build_tiny() if arch == "sd15" else build_tiny_sdxl()


def _nonzero_lora(unet) -> None:
    """Non-zero LoRA B (the same draw on both sides), so the KL term is not zero."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in sorted(unet.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05)


@functools.lru_cache(maxsize=None)
def _ours(arch: str, sampler: str | None, k: int) -> Run:
    """Our DRaFT+ loss (Objective + Policy + sampler) and the gradient of every trainable weight."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # LoRA A is drawn from the global RNG at add_adapter
        policy = Policy(_components(arch), "lora")
    _nonzero_lora(policy.unet)
    settings = SamplerSettings(steps=STEPS, guidance=GUIDANCE, truncation_steps=k, height=SIZE, width=SIZE, scheduler=sampler)
    objective = Objective(Weights(reward=1.0, kl_coeff=KL_COEFF), settings, Colorfulness())
    loss, metrics = objective(policy, {"prompts": PROMPTS, "generator": torch.Generator().manual_seed(SEED)})
    loss.backward()
    named = policy.named_trainable()
    return Run(loss.item(), metrics["kl"].item(), {n: p.grad for n, p in named.items()}, {n: p.detach().clone() for n, p in named.items()})


class UnscaledEuler(EulerDiscreteScheduler):
    """A wrong sampler: Euler without its input scaling x_t / sqrt(sigma^2 + 1)."""

    def scale_model_input(self, sample, timestep):
        return sample


def _baseline(arch: str, sampler: str | None, k: int, kl_coeff: float = KL_COEFF, reward_scale: float = 1.0,
              scheduler_class: type | None = None) -> Run:
    """bench/baseline.py on fresh components with our run's LoRA weights, handed the diffusers scheduler our
    sampler uses for ``sampler`` (built here from the class, not through draftray)."""
    c = _components(arch)
    cls = scheduler_class or {None: type(c.scheduler), "euler": EulerDiscreteScheduler}[sampler]
    scheduler = cls.from_config(c.scheduler.config)
    reward = Colorfulness()
    sdxl = dict(text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt)
    base = BaselineDraftPlus(c.unet, c.vae, c.text_encoder, c.tokenizer, scheduler, lambda x, p: reward_scale * reward(x, p),
                             dtype=torch.float32, **(sdxl if arch == "sdxl" else {}))  # fmt: skip
    lora = _ours(arch, sampler, k).lora
    named = {n: p for n, p in base.unet.named_parameters() if p.requires_grad}
    assert set(named) == set(lora)  # the same adapters on the same layers
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(lora[n])
    s = Settings(steps=STEPS, guidance=GUIDANCE, truncation_steps=k, kl_coeff=kl_coeff, size=SIZE)
    loss = base.loss(PROMPTS, torch.Generator().manual_seed(SEED), s)
    loss.backward()
    return Run(loss.item(), float("nan"), {n: p.grad for n, p in named.items()}, lora)


def grad_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|got - expected| / max|expected|, pairing by parameter name."""
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:3]
    return max(((got[n] - expected[n]).abs().max() / expected[n].abs().max()).item() for n in expected)


def assert_grads_match(base: Run, ours: Run, arch: str) -> None:
    """Strict pairing by name, then every gradient within GRAD_TOL of its own scale."""
    assert set(base.grads) == set(ours.grads), sorted(set(base.grads) ^ set(ours.grads))[:3]
    for name, expected in sorted(ours.grads.items()):
        assert expected is not None and expected.abs().max() > 0, name  # every adapter weight takes part
        torch.testing.assert_close(base.grads[name], expected, rtol=0, atol=GRAD_TOL[arch] * expected.abs().max().item(), msg=name)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("arch,sampler", CASES)
def test_baseline_gives_our_loss_and_gradients_on_the_same_seed(arch, sampler, k):
    """DDIM and Euler on SD 1.x, Euler on SDXL (its own sampler); K = 1 and 2. Euler scales the UNet input by
    1 / sqrt(sigma^2 + 1) and starts from sigma_max: 14.6 on SD 1.x's schedule, 4.2 on SDXL's at 4 steps."""
    ours, base = _ours(arch, sampler, k), _baseline(arch, sampler, k)
    assert ours.kl > 1e-5  # the KL term takes part (measured 7e-5 to 1.1e-3 over these cases)
    assert base.loss == pytest.approx(ours.loss, abs=1e-5, rel=1e-5)
    assert len(ours.grads) == {"sd15": 64, "sdxl": 192}[arch]  # LoRA A and B of 32 / 96 attention projections
    assert_grads_match(base, ours, arch)


# A wrong baseline fails the same check: name -> (model, sampler, our K, the baseline's K, its changes).
# Measured grad_error (each far outside GRAD_TOL; the passing cases are at most 1.05e-4): kl_coeff halved 0.51
# (SDXL 0.54: the KL gradient dominates this reward's), reward x0.9 5.0e-3, K=1 against K=2 1.34, Euler
# without its input scaling 0.73 (diffusers itself warns that scale_model_input was not called).
MUTANTS = {
    "kl_coeff halved": ("sd15", None, 1, 1, dict(kl_coeff=KL_COEFF / 2)),
    "reward gradient x0.9": ("sd15", None, 1, 1, dict(reward_scale=0.9)),
    "K=1 against our K=2": ("sd15", None, 2, 1, {}),
    "Euler without scale_model_input": ("sd15", "euler", 1, 1, dict(scheduler_class=UnscaledEuler)),
    "SDXL kl_coeff halved": ("sdxl", None, 1, 1, dict(kl_coeff=KL_COEFF / 2)),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_wrong_baseline_fails_the_gradient_check(mutant):
    arch, sampler, k_ours, k_base, changes = MUTANTS[mutant]
    base, ours = _baseline(arch, sampler, k_base, **changes), _ours(arch, sampler, k_ours)
    assert grad_error(base.grads, ours.grads) > 10 * GRAD_TOL[arch]
    with pytest.raises(AssertionError):
        assert_grads_match(base, ours, arch)


def test_flop_count_and_mfu():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32  # one matmul: 2 m n k
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA L4") == 121 and peak_tflops("NVIDIA L40S") == 362 and peak_tflops("cpu") is None
    assert mfu(int(989e12), 2.0, 989) == pytest.approx(0.5) and mfu(1, 1.0, None) is None


@pytest.mark.slow
def test_gpu_suite_harness_runs_on_the_cpu(capsys):
    """`bench gpu --tiny`'s code path, shortest form: ours and the baseline, one timed step, the same first loss."""
    from bench import gpu

    args = gpu.parse(["--tiny", "--archs", "sd15", "--batches", "1", "--timed", "1", "--compile", "none", "--reward", "brightness"])
    import rewards

    results = gpu.run_arch("sd15", args, rewards.build_reward("brightness"), torch.device("cpu"))
    ours, base = results[(1, "ours")], results[(1, "baseline")]
    assert ours["loss"] == pytest.approx(base["loss"], abs=1e-5)
    assert ours["flops"] == base["flops"] > 0 and ours["images_s"] > 0
    assert "| 1 |" in gpu.summary("sd15", results, [1]) and "total step" in gpu.breakdown("sd15", results)


def test_gpu_suite_without_cuda_says_so_and_exits_0(capsys):
    from bench import gpu

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
