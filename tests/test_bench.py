"""bench/: the baseline DRaFT+ (bench/baseline.py) computes our loss; the GPU suite's harness runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from bench.baseline import BaselineDraftPlus, Settings
from bench.flops import count_flops, mfu, peak_tflops
from models.components import build_tiny
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings
from rewards.simple import Colorfulness


def _nonzero_lora(unet) -> None:
    """Non-zero LoRA B (the same draw on both sides), so the KL term is not zero."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in sorted(unet.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05)


def test_baseline_gives_our_loss_on_the_same_seed():
    s = Settings(steps=4, guidance=7.5, truncation_steps=2, kl_coeff=0.5, size=32)
    reward, prompts = Colorfulness(), ["a red circle", "a blue square"]
    ours = Policy(build_tiny(), "lora")
    _nonzero_lora(ours.unet)
    c = build_tiny()
    base = BaselineDraftPlus(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler, reward, dtype=torch.float32)
    lora = {n: p for n, p in ours.unet.named_parameters() if "lora_" in n}
    with torch.no_grad():  # the same LoRA weights (A is drawn from the global RNG at add_adapter)
        for n, p in base.unet.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    settings = SamplerSettings(steps=s.steps, guidance=s.guidance, truncation_steps=s.truncation_steps, height=32, width=32)
    objective = Objective(Weights(reward=1.0, kl_coeff=s.kl_coeff), settings, reward)
    expected, metrics = objective(ours, {"prompts": prompts, "generator": torch.Generator().manual_seed(3)})
    got = base.loss(prompts, torch.Generator().manual_seed(3), s)
    assert metrics["kl"] > 1e-6  # the KL term takes part
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.backward()
    assert all(p.grad is not None for p in base.params)


def test_flop_count_and_mfu():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32  # one matmul: 2 m n k
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA L4") == 121 and peak_tflops("NVIDIA L40S") == 362 and peak_tflops("cpu") is None
    assert mfu(int(989e12), 2.0, 989) == pytest.approx(0.5) and mfu(1, 1.0, None) is None


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
