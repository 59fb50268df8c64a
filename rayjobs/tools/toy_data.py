"""`draftray toy dataset`: training data for the supervised presets, rendered from the toy world.

Three kinds, each in a layout docs/data.md describes, so the toy presets (configs/toy-*.yaml) run
offline on 2 CPU cores:

    captions   <out>/000.png + 000.txt ...            LoRA / full fine-tuning, textual inversion
    subject    <out>/000.png ...  (no captions)       DreamBooth instance images: one subject, many scenes
    edits      <out>/metadata.jsonl + input/ edited/  InstructPix2Pix triples: the shape recoloured
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards.toyworld import COLOR_NAMES, ToyWorld, render

SUBJECT = dict(shape="star", color="purple")  # the DreamBooth subject: "a sks star" in configs/toy-dreambooth.yaml


def _save(image: torch.Tensor, path: Path) -> None:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_dataset(out: str | Path, kind: str, n: int, seed: int = 0) -> Path:
    """Writes ``n`` items of ``kind`` (captions, subject, edits) under ``out``; returns ``out``."""
    out = Path(out)
    world = ToyWorld(seed=seed)
    if kind == "captions":
        images, captions, _ = world.batch(n)
        for i, (image, caption) in enumerate(zip(images, captions)):
            _save(image, out / f"{i:03d}.png")
            (out / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    elif kind == "subject":
        scenes = [dataclasses.replace(s, **SUBJECT) for s in world.scenes(n)]
        scenes = [dataclasses.replace(s, background="white") if s.background == SUBJECT["color"] else s for s in scenes]
        for i, image in enumerate(render(scenes, world.size, seed)):
            _save(image, out / f"{i:03d}.png")
    elif kind == "edits":
        _write_edits(out, world, n, seed)
    else:
        raise ValueError(f"kind must be captions, subject or edits, got {kind!r}")
    return out


def _write_edits(out: Path, world: ToyWorld, n: int, seed: int) -> None:
    """Input scene and the same scene with the shape in another colour; instruction 'make the shape <colour>'."""
    rng = np.random.default_rng([seed, 7])
    rows = []
    for i, scene in enumerate(world.scenes(n)):
        choices = [c for c in COLOR_NAMES if c not in (scene.color, scene.background)]
        target = choices[rng.integers(len(choices))]
        before = render([scene], world.size, seed + i)[0]  # [3, H, W]
        after = render([dataclasses.replace(scene, color=target)], world.size, seed + i)[0]  # the same colour jitter
        _save(before, out / "input" / f"{i:03d}.png")
        _save(after, out / "edited" / f"{i:03d}.png")
        rows.append({"input_image": f"input/{i:03d}.png", "edit_prompt": f"make the shape {target}", "edited_image": f"edited/{i:03d}.png"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
