"""What the docs promise of a GPU, checked on the tiny SD model built in code (models.components.build_tiny):

1. a bf16 DRaFT+ step (bf16 frozen weights, fp32 LoRA, bf16 autocast: `model.dtype: bfloat16`) equals the fp32 step
   within a tolerance (README.md, "Real models and clusters"; docs/sdxl.md);
2. NCCL DDP over 2 ranks gives the gradients of one process on the concatenated batch (README.md: "DDP over gloo or
   NCCL"; docs/sharding.md) -- needs 2 GPUs;
3. SDPA attention (AttnProcessor2_0) equals diffusers' reference processor (AttnProcessor) on CUDA (`perf.attention`);
4. sampling through CUDA graphs (`perf.compile_mode: reduce-overhead`) equals eager sampling, and sees an in-place
   update of the LoRA weights (`perf.compile`, models/perf.py).

Every test is marked `gpu`: without CUDA, tests/conftest.py skips it ("needs a CUDA GPU"). The tests import only
torch, diffusers, transformers, peft, open_clip (the offline tokenizer) and models/ + rewards/: no Ray, no pydantic.
Run them on a GPU machine with bench/gpu_tests.sh.

TOLERANCES ARE PROVISIONAL: they were set from the arithmetic of each comparison and from a dry run of the same
helpers on the CPU, not from a GPU run. The CPU dry run (2026-12-03, torch 2.13.0+cpu, 1 thread) gave: bf16 vs fp32
step, loss 0.18 % apart, gradient cosine 0.9977, relative error 0.069; gloo DDP on 2 ranks vs one process, gradient
relative error 1.8e-6; SDPA vs AttnProcessor, max abs 1e-6 (fp32) and 1.6e-2 (bf16); aot_eager compile vs eager,
equal. The first GPU run should record the measured differences (printed with -s) in docs/benchmarks.md and tighten
or justify the tolerances.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

from models import perf
from models.components import build_tiny
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings, sample

pytestmark = pytest.mark.gpu

# Why a test that needs more than CUDA skips (None: it runs); the CUDA reason first, as tests/conftest.py gives it.
CUDA = torch.cuda.is_available()
DDP_SKIP = ("needs a CUDA GPU" if not CUDA else f"needs 2 CUDA GPUs (found {torch.cuda.device_count()})"
            if torch.cuda.device_count() < 2 else None if torch.distributed.is_nccl_available() else "this torch has no NCCL")  # fmt: skip
GRAPH_SKIP = "needs a CUDA GPU" if not CUDA else None if importlib.util.find_spec("triton") else "inductor on CUDA needs triton"

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a large yellow star"]
SEEDS = [0, 1, 2, 3]
SETTINGS = SamplerSettings(steps=4, guidance=3.0, height=32, width=32, truncation_steps=1)
KL_COEFF = 0.1

# Provisional tolerances (see the module docstring).
BF16_LOSS_RTOL = 0.02  # bf16 keeps 8 mantissa bits (~4e-3 per rounding); 4 UNet calls, a decode and the reward compound it
BF16_GRAD_COSINE = 0.98  # the bf16 step's LoRA gradient points the same way as the fp32 one
BF16_GRAD_REL = 0.2  # ||g_bf16 - g_fp32|| / ||g_fp32||
FP32_REL = 1e-4  # fp32 (TF32 off): a different batch split or kernel reorders sums, ~1e-6 relative expected
ATTN_FP32_ATOL = 1e-5  # SDPA's fp32 kernels against plain matmul + softmax
ATTN_BF16_ATOL = 3e-2  # both in bf16: each rounds differently, outputs are O(1)
GRAPH_ATOL = 1e-4  # inductor's fused kernels against eager, fp32


@contextlib.contextmanager
def exact_fp32():
    """TF32 off: an 'fp32' reference that is fp32 (cuDNN allows TF32 convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def lora_policy(device, dtype: torch.dtype = torch.float32) -> Policy:
    """The tiny model with a LoRA whose A and B are seeded (the same in every process and call) and B is non-zero,
    so the KL term and its gradient are not zero."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        policy = Policy(build_tiny(), "lora", lora_rank=4)  # peft draws A from the global generator
        with torch.no_grad():
            for name, p in policy.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return policy.to(device, dtype)


def toy_reward(device, dtype: torch.dtype = torch.float32):
    """The toy appeal reward (a CNN with shipped weights), in the compute dtype as the training loop holds it."""
    import rewards

    return rewards.build_reward("toy_appeal").to(device, dtype)


def draft_step(policy: Policy, reward, prompts, seeds, device, autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DRaFT+ loss and backward (models/objective.py, as Worker.train_step runs it) -> (loss, flat LoRA gradient).
    One generator per sample, so a sample draws the same noise whichever batch (or rank) it is in."""
    objective = Objective(Weights(reward=1.0, kl_coeff=KL_COEFF), SETTINGS, reward)
    batch = {"prompts": list(prompts), "generator": [torch.Generator().manual_seed(s) for s in seeds]}
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss, _ = objective(policy, batch)
        loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in policy.parameters()])
    return loss.detach().float().cpu(), grads.cpu()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- 1. bf16 step == fp32 step ---------------------------------------------------------------------------------


def test_bf16_draftplus_step_equals_the_fp32_step():
    with exact_fp32():
        loss32, grad32 = draft_step(lora_policy("cuda"), toy_reward("cuda"), PROMPTS, SEEDS, "cuda")
    policy = lora_policy("cuda", torch.bfloat16)
    frozen = next(p for n, p in policy.unet.named_parameters() if "lora_" not in n)
    assert frozen.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in policy.parameters())
    loss16, grad16 = draft_step(policy, toy_reward("cuda", torch.bfloat16), PROMPTS, SEEDS, "cuda", torch.bfloat16)
    cosine = float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
    print(f"\nbf16 vs fp32: loss {loss16.item():.5f} vs {loss32.item():.5f}; gradient cosine {cosine:.5f}, "
          f"relative error {relative(grad16, grad32):.4f}")
    assert torch.isfinite(grad16).all() and grad32.norm() > 0
    assert abs(loss16.item() - loss32.item()) <= BF16_LOSS_RTOL * abs(loss32.item()) + 1e-3
    assert cosine >= BF16_GRAD_COSINE
    assert relative(grad16, grad32) <= BF16_GRAD_REL


# ---- 2. NCCL DDP, 2 ranks == 1 process on the whole batch ---------------------------------------------------------


def _ddp_rank(rank: int, world: int, init_file: str, out_dir: str, backend: str, device_type: str) -> None:
    """One rank (torch.multiprocessing.spawn): its half of the batch through DDP, as rayjobs/training/sharding.py wraps
    the UNet (policy.net = DDP(unet); the reference, adapters off, is called unwrapped)."""
    import torch.distributed as dist

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with exact_fp32() if device_type == "cuda" else contextlib.nullcontext():
            policy = lora_policy(device)
            ids = [device.index] if device_type == "cuda" else None
            policy.net = torch.nn.parallel.DistributedDataParallel(policy.unet, device_ids=ids)
            part = slice(rank * len(PROMPTS) // world, (rank + 1) * len(PROMPTS) // world)
            loss, grads = draft_step(policy, toy_reward(device), PROMPTS[part], SEEDS[part], device)
        torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_gradients(world: int, backend: str, device_type: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-rank losses, the gradient every rank holds after DDP's all-reduce; checked equal across ranks)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        init_file = os.path.join(out, "init")
        mp.spawn(_ddp_rank, args=(world, init_file, out, backend, device_type), nprocs=world, join=True)
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r in results[1:]:
        assert torch.equal(r["grads"], results[0]["grads"])  # DDP leaves every rank the same averaged gradient
    return [r["loss"] for r in results], results[0]["grads"]


@pytest.mark.skipif(DDP_SKIP is not None, reason=str(DDP_SKIP))
def test_nccl_ddp_on_two_ranks_gives_the_gradients_of_one_process():
    losses, ddp = ddp_gradients(2, "nccl", "cuda")
    with exact_fp32():
        loss, single = draft_step(lora_policy("cuda:0"), toy_reward("cuda:0"), PROMPTS, SEEDS, "cuda:0")
    print(f"\nNCCL DDP vs one process: gradient relative error {relative(ddp, single):.2e}")
    assert torch.stack(losses).mean().item() == pytest.approx(loss.item(), rel=FP32_REL)  # mean of halves = whole mean
    assert relative(ddp, single) <= FP32_REL


# ---- 3. SDPA == diffusers' reference attention --------------------------------------------------------------------


def attention_outputs(device, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The tiny LoRA UNet on fixed inputs with each processor: {"math": (out, d loss / d latents), "sdpa": ...}
    (the input gradient in fp32 only: it runs SDPA's backward kernels)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = lora_policy(device, dtype).unet
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g).to(device, dtype).requires_grad_(dtype == torch.float32)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    outputs = {}
    for kind, cls in (("math", AttnProcessor), ("sdpa", AttnProcessor2_0)):
        perf.set_attention(unet, kind)
        assert all(isinstance(p, cls) for p in unet.attn_processors.values())
        out = unet(latents, t, text).sample
        grad = torch.autograd.grad(out.float().square().mean(), latents)[0].cpu() if latents.requires_grad else None
        outputs[kind] = (out.detach().float().cpu(), grad)
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_equals_the_reference_attention_processor(dtype):
    with exact_fp32():
        outputs = attention_outputs("cuda", dtype)
    (ref, ref_grad), (got, got_grad) = outputs["math"], outputs["sdpa"]
    print(f"\nSDPA vs AttnProcessor ({dtype}): max abs difference {(got - ref).abs().max().item():.2e}")
    atol = ATTN_FP32_ATOL if dtype == torch.float32 else ATTN_BF16_ATOL
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    if ref_grad is not None:  # the backward kernels (memory-efficient / flash) too; the gradient is ~1e-3, so relative
        assert relative(got_grad, ref_grad) <= FP32_REL


# ---- 4. CUDA-graph sampling == eager sampling ---------------------------------------------------------------------


def _images_and_grads(policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
    """A training-style pass: T-K no-grad steps (through policy.net), the K=1 step with grad, a loss on the images."""
    for p in policy.parameters():
        p.grad = None
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = sample(policy, PROMPTS, SETTINGS, gens, with_ref=True, track_grad=True)
    (out.images.mean() + (out.eps - out.eps_ref).square().mean()).backward()
    grads = torch.cat([p.grad.flatten() for p in policy.parameters()])
    return out.images.detach().float().cpu(), grads.detach().float().cpu()


def compiled_and_eager(device, mode: str, backend: str) -> dict[str, torch.Tensor]:
    """Eager sampling, then the same through perf.compile_unet(mode, backend): inference images (the first call
    records the graphs, the second replays them), a training pass (images, LoRA gradient), and the images after an
    in-place update of the LoRA weights (an optimizer step), compiled and eager."""
    policy = lora_policy(device)
    gens = lambda: [torch.Generator().manual_seed(s) for s in SEEDS]  # noqa: E731
    images = lambda: sample(policy, PROMPTS, SETTINGS, gens(), track_grad=False).images.float().cpu()  # noqa: E731
    r = {"eager": images()}
    r["eager_train_images"], r["eager_train_grads"] = _images_and_grads(policy)
    policy.net = compiled = perf.compile_unet(policy.unet, mode=mode, backend=backend)
    r["cudagraphs"] = torch.tensor(compiled.cudagraphs)
    r["first"], r["replay"] = images(), images()
    r["train_images"], r["train_grads"] = _images_and_grads(policy)  # T-K = 3 compiled no-grad steps, then eager
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(p.device))
    r["after_compiled"] = images()
    policy.net = policy.unet
    r["after_eager"] = images()
    return r


@pytest.mark.skipif(GRAPH_SKIP is not None, reason=str(GRAPH_SKIP))
def test_cuda_graph_sampling_equals_eager_sampling():
    with exact_fp32():
        r = compiled_and_eager("cuda", "reduce-overhead", "inductor")
    print(f"\nCUDA graphs vs eager: max abs image difference {(r['replay'] - r['eager']).abs().max().item():.2e}")
    assert r["cudagraphs"]
    for key in ("first", "replay"):
        torch.testing.assert_close(r[key], r["eager"], atol=GRAPH_ATOL, rtol=0, msg=key)
    torch.testing.assert_close(r["train_images"], r["eager_train_images"], atol=GRAPH_ATOL, rtol=0)
    assert relative(r["train_grads"], r["eager_train_grads"]) <= 10 * FP32_REL
    # An optimizer step updates the LoRA weights in place: the recorded graphs read them, they do not copy them.
    assert (r["after_eager"] - r["eager"]).abs().max() > 1e-2  # the update changed the images...
    torch.testing.assert_close(r["after_compiled"], r["after_eager"], atol=GRAPH_ATOL, rtol=0)  # ...and the graphs saw it
