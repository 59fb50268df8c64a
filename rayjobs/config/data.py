"""The `data:` section: prompts for the reward terms, image datasets for the supervised terms.

Which parts a run reads follows from the objective's weights (rayjobs/data/batches.py), never from the preset:

    reward or kl weight > 0   prompts / prompts_file          one prompt per image sampled
    denoise weight > 0        source (+ conditioning_column)  image-caption (or edit-triple) records
    prior weight > 0          class_dir + class_prompt        DreamBooth class images (generated if short)
    inpaint                   source (+ mask_kind, mask_column) a mask per item of data.source (docs/data.md)

Layouts of ``source`` and the prompt files: docs/data.md. Derived sizes:

    images per denoise micro-batch, per worker = train.batch_size
    class images per prior micro-batch, per worker = train.batch_size
"""

from __future__ import annotations

import os
import stat
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from rayjobs.config.base import Seed, Strict

# The longest prompt accepted, in characters (prompts, eval_prompts, each prompt of data.prompts_file). The
# text encoder reads 77 tokens (a few hundred characters); far longer text is a mistake (a file without
# line breaks), and the up-front tokenizer pass over it would take minutes.
MAX_PROMPT_CHARS = 10_000
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


def special_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a directory ('a FIFO (named pipe)',
    ...); None otherwise. Only stats: opening a FIFO would block until something writes to it."""
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except (OSError, ValueError):
        return None  # missing (the reader says so) or not a path at all
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]  # fmt: skip
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _readable_path(value: str) -> str:
    kind = special_file(value)
    if kind is not None:
        raise ValueError(f"{kind}, not a regular file or folder: reading it could wait forever; give a file or folder")
    return value


# A path the run reads up front (preflight): refused when it is a FIFO, device or socket.
InputPath = Annotated[str, AfterValidator(_readable_path)]

# Toy-world captions (rewards/toyworld.py): the shipped toy model was trained on this grammar.
# Training prompts name shape and colour, sometimes size and background; the rest is left to the seed.
TRAIN_PROMPTS = [
    "a red circle", "a blue square", "a yellow triangle", "a green star",
    "a purple circle on a white background", "an orange square on a black background",
    "a white triangle on a blue background", "a black star on a yellow background",
    "a small green circle", "a large red square", "a small blue star", "a large yellow circle on a purple background",
]  # fmt: skip
# Evaluation prompts: held out from training, two fully and two partly specified.
EVAL_PROMPTS = [
    "a red star",
    "a blue circle on a white background",
    "a yellow square",
    "a green triangle on a black background",
]


class DataConfig(Strict):
    # -- prompts (reward terms) --
    prompts: list[Prompt] = Field(
        TRAIN_PROMPTS, min_length=1, description="training prompts, drawn uniformly (ignored when prompts_file is set); each at most 10,000 characters"
    )
    prompts_file: InputPath | None = Field(
        None,
        description="replaces prompts: a text file (one prompt per line), a JSONL file (prompts_key of each object), or a "
        "webdataset .tar of <key>.txt / <key>.json samples (NeMo-Aligner's DRaFT+ format); each prompt at most 10,000 characters",
    )
    prompts_key: str | None = Field(None, description="the prompt's key in JSONL objects and .json tar members; None = 'prompt' (JSONL), 'txt' (tar)")
    eval_prompts: list[Prompt] = Field(EVAL_PROMPTS, min_length=1, description="fixed evaluation prompts (rows of the sample grid)")
    eval_seeds: list[Seed] = Field(
        [0, 1, 2, 3, 4, 5], min_length=2, description="one image per seed per eval prompt (grid columns); >= 2 for diversity; 0 <= seed < 2**32"
    )
    eval_images: list[InputPath] = Field(
        [],
        description="InstructPix2Pix validation: input images edited at every evaluation, each by every eval prompt read as "
        "an instruction (seed eval_seeds[0]); one row per image in samples/edits_step_<N>.png, the input first",
    )
    eval_image_guidance: float = Field(1.5, ge=0, description="image guidance scale s_I of those validation edits")

    # -- images (denoise term) --
    source: InputPath | None = Field(
        None,
        description="image dataset of the denoise term: a folder of images with .txt captions, an imagefolder with "
        "metadata.jsonl, .parquet file(s), or a save_to_disk folder (docs/data.md)",
    )
    image_column: str = Field("image", description="column of the target image (metadata.jsonl / parquet / arrow); InstructPix2Pix: edited_image")
    text_column: str = Field("text", description="column of the caption (or the edit instruction)")
    conditioning_column: str | None = Field(
        None, description="column of the conditioning image (InstructPix2Pix: input_image); its VAE latents join the UNet input"
    )
    fixed_caption: str | None = Field(
        None, description="one caption for every image, captions not read (DreamBooth's instance prompt, e.g. 'a photo of sks dog')"
    )
    instruction_templates: InputPath | None = Field(
        None,
        description="YAML/JSON file mapping an instruction to a list of synonymous ones; each training sample whose caption "
        "is a key uses one of them (or the key) drawn at random (InstructPix2Pix instruction tuning)",
    )
    resolution: int | None = Field(None, ge=8, description="training image side, pixels (shorter side resized, then cropped); None = sampler.height")
    center_crop: bool = Field(True, description="centre crop (False: random crop)")
    random_flip: bool = Field(False, description="horizontal flip with p = 0.5 (the same for every image of an item)")
    skip_bad: bool = Field(
        False, description="skip unreadable images / missing captions (counted in the metrics as data/skipped) instead of stopping"
    )
    cache_latents: bool = Field(
        False,
        description="cache VAE latents of the images on disk, keyed by content, model and transform (needs center_crop and "
        "no random_flip); under <run.output_dir>/.cache/latents",
    )
    cache_text_embeddings: bool = Field(
        False,
        description="cache the frozen text encoder's states per prompt on disk, keyed by content and model (needs "
        "trainable.text_encoder none and no placeholder tokens); under <run.output_dir>/.cache/text",
    )

    # -- masks (inpainting) --
    inpaint: bool = Field(
        False,
        description="masked generation/training: each item of data.source gets a mask (1 = white = repaint); the denoise "
        "terms of a 9-channel (inpainting) UNet see the mask and the masked image's latents, the reward terms repaint the "
        "masked region of data.source images (needs source; not with cache_latents)",
    )
    mask_kind: Literal["rectangles", "strokes", "mixed", "dataset"] = Field(
        "mixed",
        description="where masks come from: rectangles (1-3 boxes, sides 10-75% of the image), strokes (1-4 brush polylines), "
        "mixed (per sample one or the other, p = 0.5), all drawn per (train.seed, rank, step, micro-batch) "
        "(models/masks.py); dataset = a mask image per record (mask_column, or <stem>.mask.png beside each image of a folder)",
    )
    mask_column: str | None = Field(
        None,
        description="column of the mask image in metadata.jsonl / parquet / save_to_disk sources (mask_kind dataset); "
        "None for a folder of images, whose masks are <stem>.mask.png beside each image; same size as its image, grayscale, "
        "white (>= 128) = repaint",
    )

    # -- class images (prior term, DreamBooth prior preservation) --
    class_dir: InputPath | None = Field(
        None,
        description="folder of class images; when it holds fewer than num_class_images the base model generates the rest "
        "into it (class_prompt, seeds from train.seed), as diffusers' DreamBooth does",
    )
    class_prompt: str | None = Field(None, description="the class prompt, e.g. 'a photo of dog' (prior term captions)")
    num_class_images: int = Field(100, ge=1, description="class images the prior term draws from")

    @model_validator(mode="after")
    def _class_pair(self):
        if (self.class_dir is None) != (self.class_prompt is None):
            raise ValueError("class_dir and class_prompt go together (the prior term's images and their caption)")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("cache_latents needs deterministic images: center_crop true and random_flip false")
        if self.mask_kind == "dataset" and not self.inpaint:
            raise ValueError("mask_kind: dataset reads a mask per record, for inpainting only; set inpaint: true (or another mask_kind)")
        if self.mask_column is not None and self.mask_kind != "dataset":
            raise ValueError(f"mask_column is set but mask_kind is {self.mask_kind!r}; set mask_kind: dataset to read masks from it, or unset mask_column")
        if self.inpaint and self.source is None:
            raise ValueError("inpaint: masks belong to the images of data.source; set source")
        if self.inpaint and self.cache_latents:
            raise ValueError("inpaint: the masked images' latents change with every mask and are encoded every step; set cache_latents: false")
        return self
