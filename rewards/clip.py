"""CLIP encoders behind one interface, loaded from local files (rewards.sources resolves them).

``HFClip`` wraps transformers' ``CLIPModel`` (PickScore, CLIP score, the aesthetic backbone) and
``OpenClip`` wraps an open_clip model (HPSv2, CLIP score). Both give projected, unnormalised
features: ``image_features(pixels [B,3,S,S]) -> [B, D]`` and ``text_features(prompts) -> [B, D]``,
plus the preprocessing they expect (``size``, ``mean``, ``std``, ``crop``) for ``clip_preprocess``.

Weights are frozen (``requires_grad_(False)``, eval mode). Nothing here names a device or a
grad mode: images keep their graph, text features carry none (frozen weights, constant input).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rewards.preprocess import CLIP_MEAN, CLIP_STD
from rewards.sources import MissingWeightsError, check_model_dir, load_into, load_state_dict_file

TEXT_LENGTH = 77  # CLIP's text context, tokens


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars, and no list of the unused text-tower keys when only the vision tower is read."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class HFClip(nn.Module):
    """transformers CLIPModel (+ its tokenizer); ``vision_only`` skips the text tower (aesthetic)."""

    crop = "floor"  # CLIPImageProcessor's centre-crop window (rewards/preprocess.py, CROPS)

    def __init__(self, model_dir: Path, tokenizer_dir: Path | None, key: str, what: str, vision_only: bool = False):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

        check_model_dir(model_dir, key, what)
        try:
            with quiet_transformers():
                if vision_only:  # vision tower + projection out of a full CLIPModel checkpoint
                    full = CLIPConfig.from_pretrained(str(model_dir))
                    config = full.vision_config
                    config.projection_dim = full.projection_dim  # kept at the top level of a CLIPConfig
                    model = CLIPVisionModelWithProjection.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
                else:
                    model = CLIPModel.from_pretrained(str(model_dir), dtype=torch.float32)
        except Exception as err:  # noqa: BLE001
            raise MissingWeightsError(f"{key}: {what}: cannot load {model_dir} ({str(err).splitlines()[0]})") from None
        self.model = _frozen(model)
        self.tokenizer = None
        if not vision_only:
            try:
                self.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
            except Exception as err:  # noqa: BLE001
                where = tokenizer_dir or model_dir
                raise MissingWeightsError(f"{key}: {what}: no CLIP tokenizer in {where} ({str(err).splitlines()[0]})") from None
        vision = self.model.config if vision_only else self.model.config.vision_config
        self.size = vision.image_size
        self.mean, self.std = _processor_stats(tokenizer_dir or model_dir)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> projected image features [B, D] (CLIP's get_image_features)."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # [B, hidden]
        return self.model.visual_projection(pooled)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> projected text features [B, D]; padded to 77 tokens so a prompt's features
        do not depend on the rest of the batch."""
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt")
        device = self.model.text_projection.weight.device
        out = self.model.text_model(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))
        return self.model.text_projection(out.pooler_output)  # [B, D]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale


def _processor_stats(directory: Path) -> tuple[tuple, tuple]:
    """CLIP mean/std from the processor's preprocessor_config.json when it has one, else OpenAI's."""
    cfg_file = Path(directory) / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def create_open_clip(arch: str) -> nn.Module:
    """A randomly initialised open_clip model (fp32), without open_clip's "no pretrained weights" chatter."""
    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # QuickGELU notes for architectures that do not use it
            return open_clip.create_model(arch, pretrained=None, precision="fp32")
    finally:
        root.setLevel(level)


class OpenClip(nn.Module):
    """An open_clip architecture (by config name) with a checkpoint's state_dict loaded strictly."""

    crop = "round"  # open_clip's preprocess crops with torchvision's CenterCrop (rewards/preprocess.py, CROPS)

    def __init__(self, arch: str, checkpoint: Path, key: str, what: str):
        super().__init__()
        import open_clip

        if arch not in open_clip.list_models():
            raise ValueError(f"arch: unknown open_clip architecture {arch!r} (see open_clip.list_models())")
        sd = load_state_dict_file(checkpoint, key, what)
        model = create_open_clip(arch)
        load_into(model, sd, checkpoint, key, what)
        self.model = _frozen(model)
        self.tokenizer = open_clip.get_tokenizer(arch)  # open_clip's bundled BPE: no download
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # [B, D]

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(prompts).to(device))  # [B, 77] tokens -> [B, D]
