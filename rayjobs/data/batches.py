"""What one micro-batch holds, built from the data the objective's non-zero terms need.

``Batches(cfg, policy, rank)(step, micro)`` returns the dict ``models.objective.Objective`` reads:

    reward / kl > 0   prompts [B]                         drawn uniformly from the prompt list
    denoise > 0       latents [B,4,h,w], captions [B]     items of data.source drawn uniformly
                      cond_latents [B,4,h,w]              with data.conditioning_column (InstructPix2Pix)
    prior > 0         class_latents, class_prompts        items of data.class_dir drawn uniformly
                      class_mask, class_masked_latents    with data.inpaint: as mask / masked_latents (random masks,
                                                          mask_kind "mixed" when it is "dataset")
    always            generator                            the noise of this (seed, rank, step, micro)

  with data.inpaint (masks: float32 in {0, 1} at pixel size, 1 = repaint; docs/data.md "Masks"):
    denoise > 0       mask [B,1,H,W]                       the mask of each denoise item (same crop/flip)
                      masked_latents [B,4,h,w]             encode_pixels(pixels * (mask < 0.5)), scaled
                                                           VAE posterior samples as latents are
    reward / kl > 0   inpaint_pixels [B,3,H,W] in [-1, 1]  items of data.source drawn uniformly, to repaint
                      inpaint_mask [B,1,H,W]               their masks (the prompts stay `prompts`)

H = W = data.resolution or sampler.height; h, w = H, W / the VAE factor; every tensor on the VAE's
device (masks and inpaint_pixels float32). Masks are the dataset's (data.mask_kind: dataset) or
drawn by models/masks.py (rectangles / strokes / mixed).

B = train.batch_size. Every draw is seeded by (train.seed, rank, step, micro): a resumed run draws
exactly what it would have. The mask draws (random masks, the reward terms' items and their crops)
have streams of their own, so turning data.inpaint on leaves every other draw as it was, except the
batch generator's, which also samples masked_latents (after latents). The preset is never read
here, only the weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import yaml

from models.components import vae_precision
from models.inpaint import InpaintInputs
from models.ip2p import image_latents
from models.masks import random_masks
from models.objective import encode_pixels
from models.policy import Policy
from rayjobs.config import Config
from rayjobs.data.images import ImageTextDataset, ImageTransform, eval_pixels
from rayjobs.data.latent_cache import LatentCache
from rayjobs.data.load import check_records, find_images, load_records
from rayjobs.data.prompts import load_prompts_source
from rayjobs.errors import UserError


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (base seed, rank, step, micro-batch, ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def load_prompts(cfg: Config) -> list[str]:
    """Training prompts from data.prompts_file (text, JSONL or webdataset tar) or data.prompts."""
    if cfg.data.prompts_file is None:
        return list(cfg.data.prompts)
    return load_prompts_source(cfg.data.prompts_file, cfg.data.prompts_key)


def image_columns(cfg: Config) -> list[str]:
    """The target image column, then the conditioning image's (InstructPix2Pix) if any."""
    return [cfg.data.image_column] + ([cfg.data.conditioning_column] if cfg.data.conditioning_column else [])


def transform(cfg: Config) -> ImageTransform:
    side = cfg.data.resolution or cfg.sampler.height
    return ImageTransform(resolution=side, center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip)


def dataset_masks(cfg: Config) -> bool:
    """Masks read from data.source (data.inpaint with mask_kind dataset), not drawn."""
    return cfg.data.inpaint and cfg.data.mask_kind == "dataset"


def source_dataset(cfg: Config) -> ImageTextDataset:
    """data.source, checked (one line naming the first bad file, or skipped with data.skip_bad);
    with dataset masks each item's mask too (same size as its image, neither empty nor full)."""
    d = cfg.data
    masks = dataset_masks(cfg)
    records = load_records(d.source, image_columns(cfg), d.text_column, d.fixed_caption, masks=masks, mask_column=d.mask_column)
    good, _ = check_records(records, d.skip_bad)
    return ImageTextDataset(good, transform(cfg), image_columns(cfg), d.skip_bad, masks=masks)


def reads_source(cfg: Config) -> bool:
    """The denoise term's items, or (data.inpaint) the images the reward terms repaint."""
    w = cfg.objective.weights
    return bool(w.denoise or (cfg.data.inpaint and (w.reward or w.kl_coeff)))


def class_dataset(cfg: Config) -> ImageTextDataset:
    """data.class_dir's images, each captioned data.class_prompt (the prior term), at most num_class_images."""
    d = cfg.data
    records = load_records(d.class_dir, ["image"], "text", d.class_prompt, where="data.class_dir")
    good, _ = check_records(records, d.skip_bad, where="data.class_dir")
    return ImageTextDataset(good[: d.num_class_images], transform(cfg), ["image"], d.skip_bad, where="data.class_dir")


def check_data(cfg: Config) -> None:
    """Preflight: every image of the sources the weights use decodes and has a caption (UserError
    naming the first bad file otherwise); class_dir may be missing or short (it gets generated)."""
    if reads_source(cfg):
        source_dataset(cfg)
    if cfg.objective.weights.prior and _has_images(cfg.data.class_dir):
        class_dataset(cfg)
    load_templates(cfg.data.instruction_templates)
    eval_pixels(cfg)


def _has_images(folder: str | None) -> bool:
    return folder is not None and Path(folder).is_dir() and bool(find_images(Path(folder)))


def load_templates(path: str | None) -> dict[str, list[str]]:
    """data.instruction_templates: {instruction: [synonymous instructions]} from YAML/JSON."""
    from rayjobs.config.data import special_file
    from rayjobs.config.load import YAMLTooLarge, parse_yaml
    from rayjobs.data.records import one_line

    if path is None:
        return {}
    kind = special_file(path)
    if kind is not None:  # opening a FIFO blocks until something writes to it
        raise UserError(f"data.instruction_templates {path}: {kind}, not a regular file; give a YAML or JSON file")
    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8"))  # duplicate keys and alias bombs refused as in configs
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(one_line(f"data.instruction_templates {path}: cannot read ({getattr(err, 'strerror', None) or err})")) from None
    except (YAMLTooLarge, RecursionError):
        raise UserError(f"data.instruction_templates {path}: its aliases (*name) expand too far, or it is nested too deeply; "
                        "write the instructions out") from None  # fmt: skip
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values()):
        raise UserError(f"data.instruction_templates {path}: expected a mapping of instruction -> list of synonymous instructions")
    return {str(k): list(v) for k, v in data.items()}


class Batches:
    """The micro-batches of one rank (see the module docstring)."""

    def __init__(self, cfg: Config, policy: Policy, rank: int):
        self.cfg, self.policy, self.rank = cfg, policy, rank
        w = cfg.objective.weights
        self.prompts = load_prompts(cfg) if (w.reward or w.kl_coeff) else None
        self.denoise, self.inpaint = bool(w.denoise), cfg.data.inpaint
        self.source = source_dataset(cfg) if reads_source(cfg) else None
        # The class folder may be empty until Worker.make_class_images has drawn its images (then rebuilt).
        self.classes = class_dataset(cfg) if w.prior and _has_images(cfg.data.class_dir) else None
        self.needs_classes = bool(w.prior)
        self.templates = load_templates(cfg.data.instruction_templates)
        self.cache = LatentCache(Path(cfg.run.output_dir) / ".cache" / "latents") if cfg.data.cache_latents else None
        self.model_id = f"{cfg.model.name_or_path}@{cfg.model.revision}"

    @property
    def skipped(self) -> int:
        """Items skipped as bad at training time (data.skip_bad), over both datasets."""
        return sum(ds.skipped for ds in (self.source, self.classes) if ds is not None)

    def __call__(self, step: int, micro: int) -> dict:
        seed = mix_seed(self.cfg.train.seed, self.rank, step, micro)
        rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
        size = self.cfg.train.batch_size
        batch: dict = {"generator": generator}
        # the mask draws' own streams: random masks, and the reward terms' items (index, crop, flip)
        mask_gen = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, self.rank, step, micro, 1))
        mask_rng = random.Random(mix_seed(self.cfg.train.seed, self.rank, step, micro, 2))
        if self.prompts is not None:
            batch["prompts"] = rng.choices(self.prompts, k=size)
        if self.denoise:
            idx = rng.choices(range(len(self.source)), k=size)
            latents, texts, cond, masked = self._latents(self.source, idx, rng, generator, mask_gen if self.inpaint else None)
            batch.update(latents=latents, captions=[self._instruction(t, rng) for t in texts])
            if cond is not None:
                batch["cond_latents"] = cond
            if masked is not None:
                batch["mask"], batch["masked_latents"] = masked
        if self.inpaint and self.prompts is not None:
            idx = mask_rng.choices(range(len(self.source)), k=size)
            items = self.source.batch(idx, mask_rng)
            pixels = items["pixels"][self.source.image_columns[0]]  # [B, 3, H, W] in [-1, 1]
            device = self.policy.components.vae.device
            batch["inpaint_pixels"] = pixels.to(device)
            batch["inpaint_mask"] = self._masks(items, pixels, mask_gen).to(device)
        if self.needs_classes:
            if self.classes is None:
                raise UserError(f"data.class_dir {self.cfg.data.class_dir}: no class images (they are drawn before training starts)")
            idx = rng.choices(range(len(self.classes)), k=size)
            latents, texts, _, masked = self._latents(self.classes, idx, rng, generator, mask_gen if self.inpaint else None)
            batch["class_latents"], batch["class_prompts"] = latents, texts
            if masked is not None:  # DreamBooth on an inpainting model: class images get random masks too
                batch["class_mask"], batch["class_masked_latents"] = masked
        return batch

    def eval_inpaint(self, n: int) -> InpaintInputs | None:
        """What evaluations repaint (data.inpaint), the same at every evaluation: the first data.source item
        (its crop and flip drawn from train.seed) with its mask (drawn from train.seed, or its own), n copies."""
        if not self.inpaint:
            return None
        seed = self.cfg.train.seed
        items = self.source.batch([0], random.Random(seed))
        pixels = items["pixels"][self.source.image_columns[0]]  # [1, 3, H, W] in [-1, 1]
        mask = self._masks(items, pixels, torch.Generator().manual_seed(seed))  # [1, 1, H, W]
        device, s = self.policy.components.vae.device, self.cfg.sampler
        pixels, mask = pixels.repeat(n, 1, 1, 1).to(device), mask.repeat(n, 1, 1, 1).to(device)  # [n, ...]
        return InpaintInputs(pixels, mask, s.inpaint_strength, s.paste_back)

    def _instruction(self, text: str, rng: random.Random) -> str:
        """An instruction's synonym drawn per sample (instruction-tuned-sd); other captions as they are."""
        options = self.templates.get(text)
        return rng.choice([text, *options]) if options else text

    def _latents(self, dataset: ImageTextDataset, idx: list[int], rng: random.Random, generator, mask_gen=None):
        """(target latents [B,4,h,w] scaled, texts [B], conditioning latents [B,4,h,w] unscaled or None,
        (mask [B,1,H,W], masked_latents [B,4,h,w] scaled) with ``mask_gen`` (data.inpaint) else None)."""
        device = self.policy.components.vae.device
        dtype = self.policy.components.vae.dtype
        if self.cache is not None:  # the config refuses cache_latents with inpaint
            return *self._cached(dataset, idx, generator, device, dtype), None
        items = dataset.batch(idx, rng)
        columns = dataset.image_columns
        pixels = items["pixels"][columns[0]]  # [B, 3, H, W]
        latents = encode_pixels(self.policy, pixels.to(device, dtype), generator)
        cond = None
        if len(columns) > 1:
            with torch.no_grad():
                cond = image_latents(self.policy.components.vae, items["pixels"][columns[1]].to(device, dtype))
        masked = None
        if mask_gen is not None:
            mask = self._masks(items, pixels, mask_gen)  # [B, 1, H, W]
            masked_latents = encode_pixels(self.policy, (pixels * (mask < 0.5)).to(device, dtype), generator)
            masked = (mask.to(device), masked_latents)
        return latents, items["texts"], cond, masked

    def _masks(self, items: dict, pixels: torch.Tensor, mask_gen: torch.Generator) -> torch.Tensor:
        """[B, 1, H, W] float32 in {0, 1} (CPU): the items' own masks (mask_kind dataset) or drawn ones."""
        if "masks" in items:
            return items["masks"]
        batch, _, height, width = pixels.shape
        kind = self.cfg.data.mask_kind if self.cfg.data.mask_kind != "dataset" else "mixed"  # class images have no mask files
        return random_masks(kind, batch, height, width, mask_gen)

    def _cached(self, dataset: ImageTextDataset, idx: list[int], generator, device, dtype):
        """As _latents, from the VAE posteriors kept on disk: mean and log-variance [8,h,w] per image,
        so every step still draws a fresh latent sample (the cache holds the distribution, not a draw)."""
        vae = self.policy.components.vae
        columns = dataset.image_columns
        params = {c: [] for c in columns}
        for i in idx:
            record = dataset.records[i]
            for c in columns:
                key = LatentCache.image_key(record.images[c].read_bytes(), dataset.transform, self.model_id)
                params[c].append(self.cache.get_or_compute(key, lambda i=i, c=c: self._posterior(dataset, i, c)))
        target = torch.stack(params[columns[0]]).to(device, dtype)  # [B, 8, h, w]: mean, logvar
        mean, logvar = target.chunk(2, dim=1)  # 2 x [B, 4, h, w]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(device)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * vae.config.scaling_factor
        cond = torch.stack(params[columns[1]]).to(device, dtype).chunk(2, dim=1)[0] if len(columns) > 1 else None  # mode = mean
        return latents, [dataset.records[i].text for i in idx], cond

    def _posterior(self, dataset: ImageTextDataset, i: int, column: str) -> torch.Tensor:
        vae = self.policy.components.vae
        item = dataset.get(i, random.Random(0))  # deterministic transform (cacheable): the rng is unused
        if item is None:
            raise UserError(f"data.source {dataset.records[i].name}: cannot decode image; fix or remove it, or set data.skip_bad: true")
        pixels = item["pixels"][column][None].to(vae.device, vae.dtype)  # [1, 3, H, W]
        with torch.no_grad(), vae_precision(vae, pixels) as (pixels,):
            return vae.encode(pixels, return_dict=False)[0].parameters[0].float().cpu()  # [8, h, w]
