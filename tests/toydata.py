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
    from rayjobs.training.loop import LocalContext, Worker

    data = tmp_path / "data"
    write_toy_images(data, n)
    cfg = load_config(None, [*base, f"run.output_dir={tmp_path}", "objective.preset=finetune", f"data.source={data}", *extra])
    return Worker(cfg, LocalContext(tmp_path))


def randomize(params, seed=0, scale=0.1):
    """Add seeded N(0, scale^2) noise to each tensor in place (e.g. LoRA B != 0, so the LoRA changes the model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def pipe_sample(pipe, prompt="a red cube", output_type="pt"):
    """2-step sample of a tiny pipeline (SD 1.x or SDXL), fixed seed: images [1, 3, 32, 32] in [0, 1] (or latents)."""
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type=output_type).images

