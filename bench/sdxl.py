"""SDXL DRaFT+ LoRA step at 1024 px: time split and peak GPU memory (bench/README.md, "SDXL").

    gpu     the real SDXL-base architecture (UNet 2.6 B, VAE, CLIP ViT-L + OpenCLIP bigG text encoders)
            built from its config in code with RANDOM weights, LoRA rank 32 on attention, bf16 frozen
            weights under bf16 autocast; the anchor's settings: Euler, T = 40, guidance 5, K = 1,
            1024 x 1024, batch 1; the reward is PickScore's architecture (CLIP ViT-H-14, random weights)
    --tiny  the identical code path on the CPU in float32 with models.sdxl.build_tiny_sdxl (32 px, T = 4)
            and a tiny random PickScore: exercises the script where no GPU is, says nothing about cost

Why random weights: the step's time and memory depend on the architecture and the shapes, not on the
weight values, and nothing may be downloaded. Each variant (memory switches on / off) reports the
median over the timed steps of each phase, split by device-synchronised marks, and the peak memory.
Run: ``.venv/bin/python -m bench.sdxl`` (no CUDA: one line, exit 0), ``--tiny``, ``--params``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import models  # noqa: E402,F401  (import-time fix-ups before diffusers)
import rewards  # noqa: E402
from models.components import Components, frozen  # noqa: E402
from models.objective import Objective, Weights  # noqa: E402
from models.policy import Policy  # noqa: E402
from models.sampler import SamplerSettings  # noqa: E402
from models.sdxl import SDXL_SCHEDULER, SDXL_VAE_SCALING, build_tiny_sdxl  # noqa: E402
from models.tokenizer import build_clip_tokenizer, clip_tokenizer_dir  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GB = 1e9  # the targets are decimal GB of a card, compared with what the allocator reserved (stricter than GiB)
TARGETS_GB = (80, 60)  # fits an 80 GB card at batch 1 with checkpointing (SDXL target); 60 GB (performance target)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
# vae/config.json
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=SDXL_VAE_SCALING,
    force_upcast=True,
)
_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TEXT_1 = dict(_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)  # fmt: skip  # CLIP ViT-L/14 text
TEXT_2 = dict(_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)  # fmt: skip  # OpenCLIP ViT-bigG/14 text, projected


@dataclass(frozen=True)
class Setup:
    """Where and how big: the GPU entry or the CPU --tiny run of the same code."""

    tiny: bool
    device: torch.device
    dtype: torch.dtype  # frozen weights and autocast dtype (float32: no autocast)
    size: int  # pixels per side
    steps: int  # T
    reward: str  # "pickscore" (CLIP ViT-H-14 architecture) or "brightness" (a free stand-in)


def sdxl_modules() -> dict[str, torch.nn.Module]:
    """The four SDXL-base networks with random weights, on the current default device (no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return dict(
        unet=UNet2DConditionModel(**SDXL_UNET),
        vae=AutoencoderKL(**SDXL_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_1)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)),
    )


def build_components(setup: Setup) -> Components:
    """Tiny SDXL for --tiny; otherwise SDXL-base, initialised directly on the GPU (seconds, not minutes)."""
    if setup.tiny:
        return build_tiny_sdxl()
    from diffusers import EulerDiscreteScheduler

    torch.manual_seed(0)
    with torch.device(setup.device):
        mods = sdxl_modules()
    return frozen(Components(
        **mods, tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    ))  # fmt: skip


def build_reward(setup: Setup, root: Path) -> torch.nn.Module:
    """PickScore's architecture with random weights, saved in its layout and loaded by the real reward
    class (so preprocessing, 224 px resize and the text cache are the training path's), or a stand-in."""
    if setup.reward == "brightness":
        return rewards.build_reward("brightness")
    from rewards.builders import save_hf_clip

    directory = save_hf_clip(root / "pickscore", clip_tokenizer_dir(), "tiny" if setup.tiny else "real-h14")
    return rewards.build_reward("pickscore", model=str(directory), processor=str(directory))


def count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def lora_count(unet: torch.nn.Module, rank: int) -> int:
    """LoRA parameters a rank-r adapter adds on LORA_TARGETS: r * (in + out) per targeted Linear."""
    linears = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LORA_TARGETS)]
    return sum(rank * (m.in_features + m.out_features) for m in linears)


def param_report(rank: int = 32) -> list[tuple[str, int]]:
    """Parameter counts of the real SDXL-base networks and the PickScore CLIP, built on the meta device
    (no memory, no init): what the GPU entry's bf16 weights hold, at 2 bytes each."""
    from transformers import CLIPModel

    from rewards.builders import hf_clip_config

    with torch.device("meta"):
        mods = sdxl_modules()
        reward = CLIPModel(hf_clip_config("real-h14"))
    rows = [(name, count(m)) for name, m in mods.items()] + [("reward (PickScore CLIP ViT-H-14)", count(reward))]
    return rows + [(f"LoRA rank {rank} on {','.join(LORA_TARGETS)}", lora_count(mods["unet"], rank))]


class Timeline:
    """Marks inside one step, each after a device sync so that it times finished work. A mark keeps its
    first time: a checkpointed module's recomputation in backward re-enters the same hooks."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        """Forget the marks: a new step (hooks installed once stay valid; bench/gpu.py)."""
        self.marks: dict[str, float] = {}
        self.memory: dict[str, int] = {}

    def mark(self, name: str) -> None:
        if name in self.marks:
            return
        if self.cuda:
            torch.cuda.synchronize()
            self.memory[name] = torch.cuda.memory_allocated()
        self.marks[name] = time.perf_counter()

    def grad_mark(self, tensor: torch.Tensor, name: str) -> None:
        """Mark when backward reaches ``tensor`` (its gradient is ready)."""
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: (self.mark(name), grad)[1])


def install_hooks(unet: torch.nn.Module, vae: torch.nn.Module, timeline: Timeline) -> list:
    """Phase boundaries from module hooks, so that the sampler and objective stay unchanged: the first
    UNet call with grad ends no-grad sampling; the VAE decoder's input and output bound the decode in the
    forward and, when their gradients arrive, the reward's and the decoder's backward."""
    def unet_pre(_module, _args):
        if torch.is_grad_enabled():
            timeline.mark("grad_steps")

    def dec_pre(_module, args):
        if "decode" not in timeline.marks:
            timeline.mark("decode")
            timeline.grad_mark(args[0], "unet_bwd")

    def dec_post(_module, _args, out):
        if "reward" not in timeline.marks:
            timeline.mark("reward")
            timeline.grad_mark(out, "decode_bwd")

    return [
        unet.register_forward_pre_hook(unet_pre),
        vae.decoder.register_forward_pre_hook(dec_pre),
        vae.decoder.register_forward_hook(dec_post),
    ]


# phase -> (start mark, end mark); consecutive, so the phases add up to the total
PHASES = {
    "text + no-grad sampling (T-K steps)": ("start", "grad_steps"),
    "gradient steps fwd (K, + reference)": ("grad_steps", "decode"),
    "VAE decode fwd": ("decode", "reward"),
    "reward fwd + loss": ("reward", "reward_bwd"),
    "reward bwd": ("reward_bwd", "decode_bwd"),
    "VAE decode bwd": ("decode_bwd", "unet_bwd"),
    "UNet bwd (K steps)": ("unet_bwd", "optimizer"),
    "optimizer (AdamW)": ("optimizer", "end"),
}


def phase_times(marks: dict[str, float]) -> dict[str, float]:
    """{phase: seconds} of one step's marks, plus "total step"."""
    phases = {name: marks[b] - marks[a] for name, (a, b) in PHASES.items()}
    phases["total step"] = marks["end"] - marks["start"]
    return phases


def one_step(policy, objective, optimizer, setup: Setup, seed: int) -> tuple[dict[str, float], tuple[int, int], float]:
    """One DRaFT+ step, marked: ({phase: s}, (peak bytes allocated, reserved), loss). The mark
    'reward_bwd' is where backward starts; the gradient reaches the decoder's output when the reward's
    backward (with its recomputation, if checkpointed) is done."""
    timeline = Timeline(setup.device)
    hooks = install_hooks(policy.unet, policy.components.vae, timeline)
    autocast = torch.autocast(setup.device.type, setup.dtype) if setup.dtype != torch.float32 else contextlib.nullcontext()
    try:
        if timeline.cuda:
            torch.cuda.reset_peak_memory_stats()
        timeline.mark("start")
        with autocast:
            loss, _ = objective(policy, {"prompts": [PROMPT], "generator": torch.Generator(setup.device).manual_seed(seed)})
        timeline.mark("reward_bwd")
        loss.backward()
        timeline.mark("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timeline.mark("end")
    finally:
        for hook in hooks:
            hook.remove()
    phases = phase_times(timeline.marks)
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if timeline.cuda else (0, 0)
    phases["_fwd_end_alloc"] = timeline.memory.get("reward_bwd", 0)
    return phases, peak, float(loss.detach())


def run_variant(policy, reward, setup: Setup, checkpointing: bool, warmup: int, timed: int, lora0: dict) -> dict:
    """Median phase times over ``timed`` steps after ``warmup``; peaks over the timed steps; OOM reported.
    Every variant starts from the same LoRA weights ``lora0`` and seeds, so their losses should agree."""
    settings = SamplerSettings(
        steps=setup.steps, guidance=5.0, truncation_steps=1, height=setup.size, width=setup.size,
        gradient_checkpointing=checkpointing, vae_checkpointing=checkpointing,
    )  # fmt: skip
    objective = Objective(Weights(reward=1.0, kl_coeff=0.1), settings, reward, reward_checkpointing=checkpointing)
    policy.load_trainable_state_dict(lora0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    label = f"checkpointing {'on' if checkpointing else 'off'}"
    runs, peaks, losses = [], [], []
    try:
        for i in range(warmup + timed):
            phases, peak, loss = one_step(policy, objective, optimizer, setup, seed=i)
            mem = f"peak {peak[0] / 2**30:.1f} GiB allocated, {peak[1] / 2**30:.1f} GiB reserved" if peak[1] else "peak memory n/a (CPU)"
            print(f"  {label} step {i}{' (warm-up)' if i < warmup else ''}: {phases['total step']:.2f} s, loss {loss:.4f}, {mem}", flush=True)
            if i >= warmup:
                runs.append(phases)
                peaks.append(peak)
                losses.append(loss)
    except torch.OutOfMemoryError as err:
        print(f"  {label}: out of memory ({str(err).splitlines()[0]})", flush=True)
        return {"oom": True}
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"oom": False, "phases": med, "peak": max(p[0] for p in peaks), "reserved": max(p[1] for p in peaks), "losses": losses}


def table(results: dict[str, dict], cuda: bool) -> str:
    """Rows = phases and memory, columns = variants (markdown)."""
    names = list(results)
    lines = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label, fmt):
        cells = ["OOM" if results[n]["oom"] else fmt(results[n]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for phase in [*PHASES, "total step"]:
        row(f"{phase} (s)", lambda r, p=phase: f"{r['phases'][p]:.3f}")
    if cuda:
        row("allocated at end of forward (GiB)", lambda r: f"{r['phases']['_fwd_end_alloc'] / 2**30:.1f}")
        row("peak allocated (GiB)", lambda r: f"{r['peak'] / 2**30:.1f}")
        row("peak reserved (GiB)", lambda r: f"{r['reserved'] / 2**30:.1f}")
        for target in TARGETS_GB:
            row(f"fits {target} GB (peak reserved < {target}e9 B)", lambda r, t=target: "yes" if r["reserved"] < t * GB else "NO")
    else:
        row("peak memory", lambda r: "not measured on the CPU")
    row("losses of the timed steps", lambda r: " ".join(f"{x:.4f}" for x in r["losses"]))
    return "\n".join(lines)


def header(policy: Policy, reward: torch.nn.Module, setup: Setup) -> str:
    import diffusers

    comps = policy.components
    counts = ", ".join(f"{n} {count(m, trainable=False) / 1e6:.1f} M" for n, m in comps.modules().items())
    cpu = f"CPU, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}"
    where = torch.cuda.get_device_name() if setup.device.type == "cuda" else cpu
    return (f"{'tiny SDXL (build_tiny_sdxl)' if setup.tiny else 'SDXL-base architecture'}, random weights, on {where}; "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}\n"
            f"frozen: {counts}, reward {setup.reward} {count(reward) / 1e6:.1f} M; LoRA rank 32 on {','.join(LORA_TARGETS)}: "
            f"{count(policy.unet, trainable=True) / 1e6:.2f} M trainable (fp32)\n"
            f"Euler T={setup.steps}, guidance 5, K=1, kl 0.1, {setup.size}x{setup.size}, batch 1, "
            f"weights {str(setup.dtype).removeprefix('torch.')}{' + autocast' if setup.dtype != torch.float32 else ''}")  # fmt: skip


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the same code path on the CPU: tiny SDXL, 32 px, float32")
    p.add_argument("--params", action="store_true", help="print the real architectures' parameter counts (meta device) and exit")
    p.add_argument("--variants", default="on,off", help="memory switches (UNet + VAE + reward checkpointing): on, off or both")
    p.add_argument("--steps", type=int, default=None, help="T sampling steps (default 40; --tiny 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--timed", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--reward", choices=("pickscore", "brightness"), default="pickscore",
                   help="pickscore: CLIP ViT-H-14 architecture (realistic cost); brightness: a free stand-in")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (--tiny)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.params:
        rows = param_report()
        for name, n in rows[:-1]:
            print(f"{name:45s} {n:>14,d} parameters  {n * 2 / 2**30:7.2f} GiB as bf16 weights")
        name, n = rows[-1]  # fp32 weight + gradient + AdamW's two moments: 16 bytes per parameter
        print(f"{name:45s} {n:>14,d} parameters  {n * 16 / 2**30:7.2f} GiB as fp32 weights + grads + AdamW state")
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("bench.sdxl: no CUDA device: the SDXL GPU suite did not run (--tiny runs the same code on the CPU)")
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.tiny else "cuda")
    setup = Setup(args.tiny, device, torch.float32 if args.tiny else torch.bfloat16, 32 if args.tiny else 1024,
                  args.steps or (4 if args.tiny else 40), args.reward)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="draftray-bench-sdxl-") as tmp:
        policy = Policy(build_components(setup), "lora", lora_rank=32, lora_targets=LORA_TARGETS).to(device, setup.dtype)
        reward = build_reward(setup, Path(tmp)).to(device, setup.dtype)
        print(header(policy, reward, setup), flush=True)
        lora0, results = policy.trainable_state_dict(), {}
        for variant in args.variants.split(","):
            results[f"checkpointing {variant}"] = run_variant(policy, reward, setup, variant == "on", args.warmup, args.timed, lora0)
    print("\n" + table(results, device.type == "cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
