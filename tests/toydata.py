"""Toy-world image folders for the supervised tests (rendered in code, seeded, nothing downloaded)."""

from pathlib import Path

import torch
from PIL import Image

from rewards.toyworld import ToyWorld


def write_toy_images(folder: Path, n: int, captions: bool = True, seed: int = 0) -> list[str]:
    """n toy-world PNGs (32 px) named 000.png ... with a .txt caption beside each; returns the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    images, texts, _ = ToyWorld(seed=seed).batch(n)
    for i, (image, text) in enumerate(zip(images, texts)):
        array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
        Image.fromarray(array).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(text)
    return texts


def finetune_worker(tmp_path: Path, base: list[str], *extra: str, n: int = 2):
    """A Worker of the finetune preset on n toy captioned images in tmp_path/data (LocalContext, no Ray)."""
    from rayjobs.config import load_config
    from rayjobs.loop import LocalContext, Worker

    data = tmp_path / "data"
    write_toy_images(data, n)
    cfg = load_config(None, [*base, f"run.output_dir={tmp_path}", "objective.preset=finetune", f"data.source={data}", *extra])
    return Worker(cfg, LocalContext(tmp_path))
