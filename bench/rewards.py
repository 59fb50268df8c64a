"""Reward speed: forward+backward time per image for each CLIP reward (bench/README.md, "Rewards").

    cpu   the tiny random models of tests/test_clip_rewards.py (same classes, real layouts), fp32
    gpu   the real architectures with random weights (PickScore and HPSv2: ViT-H-14; aesthetic and
          CLIP score: ViT-L/14), 512 px input images, bf16 weights and activations; only where CUDA is

Run: ``.venv/bin/python -m bench.rewards`` (``--gpu`` adds the GPU entry; ``--batch`` and ``--repeats``).
Nothing is downloaded: every model is built here from its config and saved in the layout the loaders read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rewards  # noqa: E402
from models.tokenizer import clip_tokenizer_dir  # noqa: E402
from rewards.builders import register_tiny_open_clip, save_aesthetic_head, save_hf_clip, save_open_clip  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse", "a watercolor lighthouse at dawn"]


def builders(root: Path, size: str) -> dict:
    """name -> a function building that CLIP reward on random weights of the given size ("tiny" or "real").
    Built one at a time by the caller: the real ViT-H-14 models take ~4 GB each in fp32."""
    if size == "tiny":
        arch, dim = register_tiny_open_clip(root / "oc"), 16
        hf_h = hf_l = root / "hf"
        save_h = save_l = lambda: save_hf_clip(hf_h, clip_tokenizer_dir())  # one tiny CLIP stands in for both ViT-H and ViT-L
    else:
        arch, dim, hf_h, hf_l = "ViT-H-14", 768, root / "h14", root / "l14"
        def save_h():
            return save_hf_clip(hf_h, clip_tokenizer_dir(), "real-h14")

        def save_l():
            return save_hf_clip(hf_l, clip_tokenizer_dir(), "real-l14")

    def once(save, path):  # write a model directory the first time a reward needs it
        if not path.exists():
            save()
        return str(path)

    return {
        "pickscore": lambda: rewards.build_reward("pickscore", model=once(save_h, hf_h), processor=str(hf_h)),
        "hpsv2": lambda: rewards.build_reward("hpsv2", checkpoint=str(save_open_clip(root / "hps.pt", arch)), arch=arch),
        "aesthetic": lambda: rewards.build_reward(
            "aesthetic", clip=once(save_l, hf_l), head=str(save_aesthetic_head(root / "head.pth", dim))
        ),
        "clipscore": lambda: rewards.build_reward("clipscore", model=once(save_l, hf_l)),
    }


def time_fwd_bwd(reward, images: torch.Tensor, prompts: list[str], repeats: int) -> float:
    """Median seconds per image of reward forward + backward to the images (one warm-up call first)."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times = []
    for i in range(repeats + 1):
        x = images.clone().requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        reward(x, prompts).sum().backward()
        sync()
        if i:  # the first call warms caches and kernels
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / images.shape[0]


def run(size: str, device: str, dtype: torch.dtype, pixels: int, batch: int, repeats: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders(Path(tmp), size).items():
            reward = build().to(device, dtype)
            g = torch.Generator().manual_seed(0)
            images = torch.rand(batch, 3, pixels, pixels, generator=g).to(device)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            per_image = time_fwd_bwd(reward, images, prompts, repeats)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append((name, size, device, str(dtype).removeprefix("torch."), pixels, batch, per_image, mem))
            print(f"{name:10s} {size:5s} {device:4s} {pixels}px batch {batch}: {per_image * 1e3:8.2f} ms/image, {1 / per_image:8.1f} img/s", flush=True)
            del reward
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="also the real architectures on CUDA in bf16 (skipped without CUDA)")
    p.add_argument("--batch", type=int, default=8, help="images per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per reward (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--real-on-cpu", action="store_true", help="smoke-test the real-size entry on the CPU (fp32, slow)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.real_on_cpu:
        run("real", "cpu", torch.float32, 512, args.batch, args.repeats)
        return
    rows = run("tiny", "cpu", torch.float32, 64, args.batch, args.repeats)
    if args.gpu and torch.cuda.is_available():
        rows += run("real", "cuda", torch.bfloat16, 512, args.batch, args.repeats)
    elif args.gpu:
        print("no CUDA device: GPU entry skipped")
    print("\n| reward | model | device | dtype | input px | batch | ms/image (fwd+bwd) | images/s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size, device, dtype, px, b, t, mem in rows:
        gib = f"{mem:.1f}" if mem == mem else "–"  # nan on the CPU
        print(f"| {name} | {size} | {device} | {dtype} | {px} | {b} | {t * 1e3:.2f} | {1 / t:.1f} | {gib} |")


if __name__ == "__main__":
    main()
