"""`python -m bench gpu`: DRaFT+ LoRA steps on the SD 1.5 and SDXL architectures, ours beside a baseline.

    gpu     SD 1.5 (512 px, DDIM T = 50, CFG 7.5) and SDXL (1024 px, Euler T = 40, CFG 5) built from their configs
            in code with RANDOM weights (nothing downloaded), UNet LoRA rank 32, K = 1, kl_coeff 0.1, PickScore's
            architecture as the reward, bf16; batch 1, 2 and 4 per GPU. Without CUDA: one line, exit 0.
    --tiny  the identical harness on the CPU: the tiny SD / SDXL models, 32 px, T = 4; the same switches
            (compile with aot_eager by default: inductor compiles for minutes on 2 cores), float32 by
            default (--dtype bfloat16 adds bf16 autocast, as on the GPU).

Per (architecture, batch, side): images/s, the step split into phases (bench/sdxl.py's marks), peak memory,
MFU (bench/flops.py: FLOPs of one eager step by FlopCounterMode / time / the GPU's dense bf16 peak), the
first step's loss, and the compile time (warm-up step minus a timed one). ``ours`` is draftray's sampler
and objective with the perf switches (models/perf.py); ``baseline`` is bench/baseline.py (SD 1.x only), run
in the same process on the same seeds after ours has been freed, so each side's peak memory is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench import sdxl
from bench.baseline import BaselineDraftPlus, Settings
from bench.flops import count_flops, mfu, peak_tflops
from models import perf
from models.components import SD15_SCHEDULER, Components, build_tiny, frozen
from models.objective import Objective, Weights
from models.policy import Policy
from models.sampler import SamplerSettings

RANK, KL_COEFF = 32, 0.1
ARCHS = {"sd15": dict(size=512, steps=50, guidance=7.5), "sdxl": dict(size=1024, steps=40, guidance=5.0)}
# runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json (the fields that shape the networks)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)  # fmt: skip
SD15_VAE = dict(sdxl.SDXL_VAE, sample_size=512, scaling_factor=0.18215, force_upcast=True)  # the same VAE architecture
TARGETS = "SD1.5 b1 speed-up >= 1.5x; SD1.5 b4 MFU >= 40% (H100/A100); SD1.5 b1 peak <= 24 GB; SDXL b1 peak <= 60 GB"


@dataclass
class Side:
    """One implementation ready to step: loss(prompts, generator) under its autocast, its optimizer."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    loss: Callable[[list[str], torch.Generator], torch.Tensor]
    optimizer: torch.optim.Optimizer
    eager: Callable  # context: the step runs without compile (for FlopCounterMode)
    compile_stats: perf.CompileStats | None = None
    results: dict = field(default_factory=dict)


def sd15_components(device: torch.device) -> Components:
    """SD 1.5's architecture with random weights, initialised on ``device``: UNet 860 M, VAE, CLIP ViT-L text."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**sdxl.TEXT_1))
    return frozen(Components(unet, vae, text, build_clip_tokenizer(), DDIMScheduler(**SD15_SCHEDULER)))


def components(arch: str, tiny: bool, device: torch.device) -> Components:
    from models.sdxl import build_tiny_sdxl

    if tiny:
        return build_tiny() if arch == "sd15" else build_tiny_sdxl()
    if arch == "sd15":
        return sd15_components(device)
    return sdxl.build_components(sdxl.Setup(False, device, torch.bfloat16, 1024, 40, "pickscore"))


def ours(arch: str, args, reward, device) -> Side:
    """draftray: Policy + Objective, with the perf switches of ``args`` (what the `perf:` section sets)."""
    a, ckpt = args.shape[arch], args.checkpointing
    policy = Policy(components(arch, args.tiny, device), "lora", lora_rank=RANK, lora_targets=sdxl.LORA_TARGETS,
                    gradient_checkpointing=ckpt).to(device, args.dtype)  # fmt: skip
    perf.set_attention(policy.unet, args.attention)
    if args.channels_last:
        perf.channels_last(policy.unet, policy.components.vae)
    settings = SamplerSettings(steps=a["steps"], guidance=a["guidance"], truncation_steps=1, height=a["size"], width=a["size"],
                               gradient_checkpointing=ckpt, vae_checkpointing=ckpt)  # fmt: skip
    objective = Objective(Weights(reward=1.0, kl_coeff=KL_COEFF), settings, perf.reward_in(reward, args.reward_dtype), reward_checkpointing=ckpt)
    stats = None
    if args.compile != "none":
        policy.net = perf.compile_unet(policy.unet, scope=args.compile, mode=args.compile_mode, backend=args.compile_backend)
        stats = policy.net.stats
    autocast = torch.autocast(device.type, dtype=args.dtype, enabled=args.dtype != torch.float32)

    def loss(prompts, generator):
        with autocast:
            return objective(policy, {"prompts": prompts, "generator": generator})[0]

    net = policy.net

    class Eager:
        def __enter__(self):
            policy.net = policy.unet

        def __exit__(self, *exc):
            policy.net = net

    return Side("ours", policy.unet, policy.components.vae, loss, torch.optim.AdamW(policy.parameters(), lr=1e-4), Eager, stats)


def baseline(arch: str, args, reward, device) -> Side:
    c = components(arch, args.tiny, device)
    base = BaselineDraftPlus(c.unet.to(device), c.vae.to(device), c.text_encoder.to(device), c.tokenizer, c.scheduler, reward,
                             rank=RANK, targets=sdxl.LORA_TARGETS, dtype=args.dtype)  # fmt: skip
    a = args.shape[arch]
    s = Settings(steps=a["steps"], guidance=a["guidance"], truncation_steps=1, kl_coeff=KL_COEFF, size=a["size"])

    def loss(prompts, generator):
        with base.autocast():
            return base.loss(prompts, generator, s)

    return Side("baseline", base.unet, base.vae, loss, base.optimizer, contextlib.nullcontext)


def step(side: Side, timeline: sdxl.Timeline, prompts: list[str], seed: int, device) -> tuple[dict, int, float]:
    """One marked optimizer step: ({phase: s}, peak bytes allocated, loss)."""
    timeline.reset()
    if timeline.cuda:
        torch.cuda.reset_peak_memory_stats()
    timeline.mark("start")
    loss = side.loss(prompts, torch.Generator(device).manual_seed(seed))
    timeline.mark("reward_bwd")
    loss.backward()
    timeline.mark("optimizer")
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    timeline.mark("end")
    return sdxl.phase_times(timeline.marks), torch.cuda.max_memory_allocated() if timeline.cuda else 0, float(loss.detach())


def measure(side: Side, batch: int, args, device) -> dict:
    """Warm-up (compiles), timed steps (median phases), FLOPs of one eager step; OOM reported."""
    prompts = [sdxl.PROMPT] * batch
    timeline = sdxl.Timeline(device)
    hooks = sdxl.install_hooks(side.unet, side.vae, timeline)  # once: re-registering would recompile
    try:
        warm, _, first_loss = step(side, timeline, prompts, 0, device)
        runs = [step(side, timeline, prompts, 1 + i, device) for i in range(args.timed)]
        with side.eager():
            flops = count_flops(lambda: side.loss(prompts, torch.Generator(device).manual_seed(0)).backward())
        side.optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        for h in hooks:
            h.remove()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    phases = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    total = phases["total step"]
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    return {"oom": False, "phases": phases, "images_s": batch / total, "peak": max(r[1] for r in runs), "loss": first_loss,
            "flops": flops, "mfu": mfu(flops, total, peak), "compile_s": max(warm["total step"] - total, 0.0)}  # fmt: skip


def run_arch(arch: str, args, reward, device) -> dict[tuple[int, str], dict]:
    results = {}
    sides = [ours] + ([baseline] if arch == "sd15" and not args.no_baseline else [])
    for build in sides:
        side = build(arch, args, reward, device)
        for batch in args.batches:
            r = measure(side, batch, args, device)
            results[(batch, side.name)] = r
            print(f"  {arch} batch {batch} {side.name}: " + ("OOM" if r["oom"] else
                  f"{r['images_s']:.3f} img/s, {r['phases']['total step']:.3f} s/step, loss {r['loss']:.4f}, "
                  f"warm-up step +{r['compile_s']:.1f} s, {r['flops'] / 1e12:.4f} TFLOP/step"), flush=True)  # fmt: skip
        del side
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _gb(r: dict) -> str:
    return f"{r['peak'] / 1e9:.1f}" if r["peak"] else "n/a (CPU)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def summary(arch: str, results: dict, batches: list[int]) -> str:
    """Markdown: one row per batch, ours beside the baseline."""
    lines = [f"#### {arch}", "", "| batch | ours img/s | baseline img/s | speed-up | ours peak GB | baseline peak GB | memory saving "
             "| ours MFU | baseline MFU | ours TFLOP/step | compile s (ours) | first-step loss ours / baseline |", "|---" * 12 + "|"]
    for b in batches:
        o, base = results.get((b, "ours")), results.get((b, "baseline"))
        if o is None or o["oom"]:
            lines.append(f"| {b} | OOM | | | | | | | | | | |")
            continue
        has_base = base is not None and not base["oom"]
        speed = f"{o['images_s'] / base['images_s']:.2f}x" if has_base else "-"
        saving = f"{base['peak'] / o['peak']:.2f}x" if has_base and o["peak"] else "-"
        cells = [b, f"{o['images_s']:.3f}", f"{base['images_s']:.3f}" if has_base else ("OOM" if base else "-"), speed, _gb(o),
                 _gb(base) if has_base else "-", saving, _pct(o["mfu"]), _pct(base["mfu"]) if has_base else "-",
                 f"{o['flops'] / 1e12:.3f}", f"{o['compile_s']:.1f}", f"{o['loss']:.4f} / {base['loss']:.4f}" if has_base else f"{o['loss']:.4f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def breakdown(arch: str, results: dict) -> str:
    """Markdown: phases (rows) x (batch, side) (columns), median seconds."""
    keys = [k for k in results if not results[k]["oom"]]
    lines = [f"| {arch} phase (s) | " + " | ".join(f"b{b} {n}" for b, n in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for phase in [*sdxl.PHASES, "total step"]:
        lines.append(f"| {phase} | " + " | ".join(f"{results[k]['phases'][phase]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    """Date, machine, versions: the header of a docs/benchmarks.md section."""
    import diffusers
    import peft
    import ray
    import transformers

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {where}; python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, ray {ray.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the same harness on the CPU with the tiny models")
    p.add_argument("--archs", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    p.add_argument("--batches", default="1,2,4", help="comma-separated batch sizes per GPU")
    p.add_argument("--timed", type=int, default=3, help="timed steps per (architecture, batch, side), after one warm-up")
    p.add_argument("--attention", default="sdpa", choices=("default", "sdpa", "xformers", "math"), help="perf.attention (ours)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="perf.channels_last off (ours)")
    p.add_argument("--compile", default="sampling", choices=("none", "sampling", "all"), help="perf.compile (ours)")
    p.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    p.add_argument("--compile-backend", default=None, help="inductor (default on GPU) or aot_eager (default with --tiny)")
    p.add_argument("--reward-dtype", default="model", choices=("model", "float32", "bfloat16"),
                   help="perf.reward_dtype (ours); model = --dtype (bf16 on the GPU)")
    p.add_argument("--checkpointing", action="store_true", help="UNet + VAE + reward checkpointing (ours; on for SDXL)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="frozen weights + autocast, both sides (default bfloat16; --tiny: float32)")
    p.add_argument("--reward", default="pickscore", choices=("pickscore", "brightness"), help="pickscore: CLIP ViT-H-14 architecture")
    p.add_argument("--no-baseline", action="store_true", help="ours only")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (--tiny)")
    args = p.parse_args(argv)
    args.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype or ("float32" if args.tiny else "bfloat16")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    args.shape = {a: dict(size=32, steps=4, guidance=v["guidance"]) for a, v in ARCHS.items()} if args.tiny else ARCHS
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here: the GPU suite did not run (`python -m bench gpu --tiny` runs the same harness on the CPU)")
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.tiny else "cuda")
    print(environment(device))
    print(f"command: python -m bench gpu {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"ours: attention {args.attention}, channels_last {args.channels_last}, compile {args.compile} ({args.compile_mode}, "
          f"{args.compile_backend}), reward {args.reward_dtype}, checkpointing {'on' if args.checkpointing else 'off (SDXL: on)'}; "
          f"both: {str(args.dtype).removeprefix('torch.')} autocast, LoRA rank {RANK}, K=1, kl_coeff {KL_COEFF}; targets: {TARGETS}", flush=True)
    out = []
    with tempfile.TemporaryDirectory(prefix="draftray-bench-gpu-") as tmp:
        setup = sdxl.Setup(args.tiny, device, args.dtype, 32, 4, args.reward)
        reward = sdxl.build_reward(setup, Path(tmp)).to(device, args.dtype)
        for arch in args.archs.split(","):
            arch_args = argparse.Namespace(**vars(args) | {"checkpointing": args.checkpointing or arch == "sdxl"})
            results = run_arch(arch, arch_args, reward, device)
            out += [summary(arch, results, args.batches), "", breakdown(arch, results), ""]
    print("\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
