"""Training-time images: the transform (resize, crop, flip -> pixels) and the image-text dataset.

``pixels`` are float32 tensors in [-1, 1], [3, H, W] (batched [B, 3, H, W]), as the VAE encoder
expects. The transform follows diffusers' train_text_to_image: shorter side resized to
``resolution`` (bilinear, antialiased), then a centre or random ``resolution`` x ``resolution``
crop and an optional horizontal flip. All images of one record get the SAME crop and flip, so
InstructPix2Pix input/edited pairs stay aligned, and so do inpainting masks (``masks`` of
``ImageTransform.with_masks``: resized bilinearly like the images, then thresholded at 0.5 to
float32 [1, H, W] in {0, 1}, 1 = repaint). PIL + numpy only (no torchvision).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from models.masks import binarize
from rayjobs.config import Config
from rayjobs.data.records import MASK, BadItem, ImageRef, Record, decode
from rayjobs.errors import UserError


@dataclass(frozen=True)
class ImageTransform:
    """resolution: output side in pixels; center_crop: middle crop (else random); random_flip: p=0.5."""

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1 pixel, got {self.resolution}")

    def settings(self) -> str:
        """The settings as a string, part of latent-cache keys (rayjobs/data/latent_cache.py)."""
        return f"resolution={self.resolution},center_crop={self.center_crop},random_flip={self.random_flip}"

    def __call__(self, pil_images: list[Image.Image], rng: random.Random) -> list[torch.Tensor]:
        """Images of one record -> pixels, each float32 [3, resolution, resolution] in [-1, 1].

        rng draws the crop position (two uniforms, random crop only) then the flip (one uniform,
        random_flip only), once per call: the same draws apply to every image.
        """
        return self.with_masks(pil_images, [], rng)[0]

    def with_masks(self, pil_images: list[Image.Image], masks: list[Image.Image], rng: random.Random):
        """(pixels of the images, masks float32 [1, resolution, resolution] in {0, 1}): one crop and
        flip for all (the same rng draws as __call__). A mask is read as grayscale, white = repaint."""
        fractions = (0.5, 0.5) if self.center_crop else (rng.random(), rng.random())
        flip = self.random_flip and rng.random() < 0.5
        pixels = [to_pixels(self._one(image, fractions, flip, "RGB")) for image in pil_images]
        return pixels, [to_mask(self._one(mask, fractions, flip, "L")) for mask in masks]

    def _one(self, image: Image.Image, fractions: tuple[float, float], flip: bool, mode: str) -> Image.Image:
        image = resize_shorter_side(ImageOps.exif_transpose(image).convert(mode), self.resolution)
        left, top = crop_offsets(image.size, self.resolution, fractions, self.center_crop)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize (antialiased when shrinking) so the shorter side is ``size`` px, aspect kept.

    The longer side is truncated as torchvision's Resize(int) does.
    """
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new = (size, max(size, int(size * height / width)))
    else:
        new = (max(size, int(size * width / height)), size)
    return image.resize(new, Image.Resampling.BILINEAR)


def crop_offsets(size: tuple[int, int], side: int, fractions: tuple[float, float], center: bool) -> tuple[int, int]:
    """(left, top) of a ``side`` square in an image of ``size`` (width, height) px.

    Centre: torchvision's CenterCrop rounding. Random: ``fractions`` in [0, 1) pick the position
    along each free axis, so images of one record share the crop (proportionally if sizes differ).
    """
    free_x, free_y = size[0] - side, size[1] - side
    if center:
        return int(round(free_x / 2.0)), int(round(free_y / 2.0))
    return min(free_x, int(fractions[0] * (free_x + 1))), min(free_y, int(fractions[1] * (free_y + 1)))


def to_mask(image: Image.Image) -> torch.Tensor:
    """Grayscale PIL mask -> float32 [1, H, W] in {0, 1} (binarize at 0.5: 1 = repaint)."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W]
    return binarize(torch.from_numpy(array)[None].contiguous())[0]


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


class ImageTextDataset:
    """Checked records (rayjobs.data.load.check_records) -> transformed pixels and captions.

    image_columns: the images of a record to return, in this order (default: the first record's).
    masks: also return each record's inpainting mask (its image under rayjobs.data.records.MASK), cropped
    and flipped with its images, as "mask" [1, H, W] / "masks" [B, 1, H, W] in {0, 1}.
    An image that no longer decodes (changed after the check) raises a one-line UserError naming
    it, or with ``skip_bad`` is replaced by another item and never read again; ``skipped`` is the
    number of such items so far (a metric to log).
    """

    max_replacements = 100  # tries per batch slot before giving up

    def __init__(self, records: list[Record], transform: ImageTransform, image_columns=None, skip_bad=False, where="data.source", masks=False):
        if not records:
            raise UserError(f"{where}: no items to train on")
        self.records, self.transform = list(records), transform
        self.image_columns = list(image_columns or [c for c in records[0].images if c != MASK])
        self.skip_bad, self.where, self.masks = skip_bad, where, masks
        self.bad: set[int] = set()  # indices found bad at training time
        needed = self.image_columns + ([MASK] if masks else [])
        for record in self.records:
            if record.text is None or any(c not in record.images for c in needed):
                raise ValueError(f"record {record.key}: no caption or missing image columns / mask (run check_records first)")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> int:
        """Items skipped as bad at training time (distinct records)."""
        return len(self.bad)

    def get(self, i: int, rng: random.Random) -> dict | None:
        """{"pixels": {column: [3, H, W]}, "text": str, "key": str} (+ "mask" [1, H, W] with masks);
        None if skipped as bad."""
        record = self.records[i]
        if i in self.bad:
            return None
        try:
            images = [decode(record.images[c]) for c in self.image_columns]
            masks = [decode(record.images[MASK])] if self.masks else []
        except BadItem as bad:
            if not self.skip_bad:
                raise bad.user_error(self.where) from None
            self.bad.add(i)
            return None
        pixels, masks = self.transform.with_masks(images, masks, rng)
        item = {"pixels": dict(zip(self.image_columns, pixels)), "text": record.text, "key": record.key}
        return item | ({"mask": masks[0]} if self.masks else {})

    def batch(self, indices: list[int], rng: random.Random) -> dict:
        """{"pixels": {column: [B, 3, H, W]}, "texts": [B], "keys": [B]} (+ "masks" [B, 1, H, W] with
        masks) for ``indices``, in order.

        A bad item (skip_bad) is replaced by one drawn with ``rng``, so the batch keeps B items.
        """
        items = [self._get_or_replace(i, rng) for i in indices]
        pixels = {c: torch.stack([item["pixels"][c] for item in items]) for c in self.image_columns}  # each [B, 3, H, W]
        out = {"pixels": pixels, "texts": [item["text"] for item in items], "keys": [item["key"] for item in items]}
        return out | ({"masks": torch.stack([item["mask"] for item in items])} if self.masks else {})

    def _get_or_replace(self, i: int, rng: random.Random) -> dict:
        for _ in range(self.max_replacements):
            item = self.get(i, rng)
            if item is not None:
                return item
            left = [j for j in range(len(self.records)) if j not in self.bad]
            if not left:
                break
            i = rng.choice(left)
        raise UserError(f"{self.where}: no image decodes any more ({self.skipped} skipped); check the data source")


def eval_pixels(cfg: Config) -> list[torch.Tensor]:
    """data.eval_images as pixels [3, S, S] in [-1, 1], S = data.resolution or sampler.height, centre-cropped.
    An unreadable image is a UserError naming it (preflight calls this before training)."""
    side = cfg.data.resolution or cfg.sampler.height
    transform = ImageTransform(resolution=side, center_crop=True, random_flip=False)
    out = []
    for path in cfg.data.eval_images:
        try:
            image = decode(ImageRef(path, Path(path)))
        except BadItem as err:
            raise UserError(f"data.eval_images {err.name}: {err.reason}; {err.fix}") from None
        out.append(transform([image], random.Random(0))[0])  # [3, S, S]
    return out
