"""CLIP-based preference rewards: PickScore, HPSv2 / v2.1, LAION aesthetic v2, CLIP score.

All follow the Reward contract: ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``, differentiable
with respect to the images, frozen weights. Each goes through ``clip_preprocess`` (the one torch
preprocessing) and casts the pixels to its own weights' dtype, so a caller that moved the reward to
bf16 gets bf16 activations. Scales (docs/references.md, "Rewards"):

    pickscore   logit_scale.exp() * cos(image, text)   ~ 20-23 on ordinary images
    hpsv2       cos(image, text), HPS v2.0 weights     ~ 0.2-0.3
    hpsv2.1     cos(image, text), HPS v2.1 weights     ~ 0.2-0.3 (not comparable with v2.0)
    aesthetic   MLP(normalised CLIP ViT-L/14 image embedding)   ~ 1-10, prompt-agnostic
    clipscore   100 * cos(image, text)                 ~ 20-35 (no clamp at 0: it would cut the gradient)

Each class lists the weight locations it needs (``sources``) so start-up can resolve them without
loading anything; ``draftray weights fetch NAME`` downloads the defaults.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from rewards.clip import HFClip, OpenClip
from rewards.preprocess import clip_preprocess
from rewards.registry import check_batch, register_reward
from rewards.sources import Source, load_into, load_state_dict_file, resolve

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's tokenizer + image processor
HPS_CHECKPOINTS = {"v2.0": "xswu/HPSv2:HPS_v2_compressed.pt", "v2.1": "xswu/HPSv2:HPS_v2.1_compressed.pt"}
OPENAI_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


TEXT_CACHE = 4096  # distinct prompts whose text features a reward keeps


class _ClipReward(nn.Module):
    """Shared forward: preprocess -> image and text features -> cosine -> ``from_cosine``."""

    name = "clip"
    encoder: HFClip | OpenClip

    def __init__(self):
        super().__init__()
        self._text_cache: OrderedDict = OrderedDict()  # (prompt, (device, dtype, autocast)) -> unit features [D]

    @classmethod
    def sources(cls, **kwargs) -> list[Source]:
        """The weight locations this reward needs with these settings (none loaded)."""
        try:
            bound = inspect.signature(cls.__init__).bind(None, **kwargs)
        except TypeError as err:
            raise ValueError(f"{cls.name}: {err}") from None
        bound.apply_defaults()
        return cls._sources(**{k: v for k, v in bound.arguments.items() if k != "self"})

    @classmethod
    def _sources(cls, **settings) -> list[Source]:
        raise NotImplementedError

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> normalised CLIP pixels [B,3,S,S] in the weights' dtype."""
        e = self.encoder
        dtype = next(self.parameters()).dtype
        return clip_preprocess(images, e.size, e.mean, e.std, crop=e.crop).to(dtype)  # each encoder crops as its official processor

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        img = F.normalize(self.encoder.image_features(self.pixels(images)).float(), dim=-1)  # [B, D]
        return (img * self.text_embeddings(prompts)).sum(-1)  # [B]

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit text features [B, D], float32. Frozen weights and a constant input: a prompt's features
        never change, so the last TEXT_CACHE distinct prompts are kept (keyed by device, dtype and autocast too)
        and each step encodes only prompts it has not seen."""
        w = next(self.parameters())
        mode = (w.device, w.dtype, torch.is_autocast_enabled(w.device.type))
        new = sorted({p for p in prompts if (p, mode) not in self._text_cache})
        if new:
            feats = F.normalize(self.encoder.text_features(new).float(), dim=-1)  # [U, D]
            for p, f in zip(new, feats):
                self._text_cache[(p, mode)] = f
        for p in prompts:
            self._text_cache.move_to_end((p, mode))
        while len(self._text_cache) > TEXT_CACHE:
            self._text_cache.popitem(last=False)  # least recently used
        return torch.stack([self._text_cache[(p, mode)] for p in prompts])  # [B, D]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.from_cosine(self.cosine(images, prompts))

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@register_reward("pickscore")
class PickScore(_ClipReward):
    """PickScore (Kirstain et al. 2023): CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.

    model: the PickScore_v1 transformers model directory or hub id; processor: the directory or hub
    id its tokenizer and image-processor config come from (the LAION ViT-H-14 one).
    """

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR):
        super().__init__()
        model_src, proc_src = self.sources(model=model, processor=processor)
        self.encoder = HFClip(resolve(model_src), resolve(proc_src), model_src.key, model_src.what)

    @classmethod
    def _sources(cls, model: str, processor: str) -> list[Source]:
        return [
            Source("model", model, "model", "PickScore CLIP model", "pickscore"),
            Source("processor", processor, "processor", "PickScore tokenizer/processor", "pickscore"),
        ]

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.encoder.logit_scale.exp().float() * cos


@register_reward("hpsv2")
class HPSv2(_ClipReward):
    """Human Preference Score v2 (Wu et al. 2023): open_clip ViT-H-14 with the HPS checkpoint's state_dict.

    version: "v2.0" or "v2.1" (picks the default checkpoint; scores of the two are not comparable).
    checkpoint: a local file or 'org/repo:file' (default: the version's file in xswu/HPSv2).
    arch: the open_clip architecture the checkpoint fits.
    """

    name = "hpsv2"
    default_version = "v2.0"

    def __init__(self, checkpoint: str | None = None, version: str | None = None, arch: str = "ViT-H-14"):
        super().__init__()
        (src,) = self.sources(checkpoint=checkpoint, version=version, arch=arch)
        self.version = version or self.default_version
        self.encoder = OpenClip(arch, resolve(src), src.key, src.what)

    @classmethod
    def _sources(cls, checkpoint: str | None, version: str | None, arch: str) -> list[Source]:
        version = version or cls.default_version
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"{cls.name}: version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}")
        fetch_name = "hpsv2" if version == "v2.0" else "hpsv2.1"
        return [Source("checkpoint", checkpoint or HPS_CHECKPOINTS[version], "file", f"HPS {version} checkpoint", fetch_name)]

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return cos  # HPS scores are the plain cosine: no logit scale

    def describe(self) -> str:
        return f"{self.name} (HPS {self.version}; v2.0 and v2.1 scores are not comparable)"


@register_reward("hpsv2.1")
class HPSv21(HPSv2):
    __doc__ = HPSv2.__doc__
    name = "hpsv2.1"
    default_version = "v2.1"


@register_reward("clipscore")
class CLIPScore(_ClipReward):
    """CLIP score (Hessel et al. 2021): 100 * cos(image, text), without the usual clamp at 0.

    backend "transformers": ``model`` is a CLIPModel directory or hub id (tokenizer alongside).
    backend "open_clip": ``arch`` is the open_clip architecture and ``model`` a checkpoint file
    (local or 'org/repo:file'), e.g. arch ViT-H-14 with
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K:open_clip_pytorch_model.bin.
    """

    name = "clipscore"

    def __init__(self, backend: str = "transformers", model: str = OPENAI_L14, arch: str = "ViT-L-14"):
        super().__init__()
        (src,) = self.sources(backend=backend, model=model, arch=arch)
        self.backbone = f"{backend} {model}" + (f" ({arch})" if backend == "open_clip" else "")
        if backend == "transformers":
            self.encoder = HFClip(resolve(src), None, src.key, src.what)
        else:
            self.encoder = OpenClip(arch, resolve(src), src.key, src.what)

    @classmethod
    def _sources(cls, backend: str, model: str, arch: str) -> list[Source]:
        if backend not in ("transformers", "open_clip"):
            raise ValueError(f"{cls.name}: backend must be 'transformers' or 'open_clip', got {backend!r}")
        kind = "model" if backend == "transformers" else "file"
        return [Source("model", model, kind, f"CLIP model ({backend})", "clipscore")]

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return 100.0 * cos

    def describe(self) -> str:
        return f"{self.name} (100*cos, backbone: {self.backbone})"


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's linear-MSE MLP: linear layers and dropouts, no activations.
    Layer indices match the checkpoint's keys (layers.0, .2, .4, .6, .7)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)  # [B, dim] -> [B, 1]


@register_reward("aesthetic")
class Aesthetic(_ClipReward):
    """LAION aesthetic predictor v2 (sac+logos+ava1 linear-MSE): OpenAI CLIP ViT-L/14 image embedding,
    L2-normalised, into the MLP head. Prompt-agnostic (prompts are only counted).

    clip: the CLIP model directory or hub id (its vision tower and projection are used);
    head: the head's .pth file (local, 'org/repo:file' or its https URL, cached by torch.hub).
    """

    name = "aesthetic"

    def __init__(self, clip: str = OPENAI_L14, head: str = AESTHETIC_HEAD):
        super().__init__()
        clip_src, head_src = self.sources(clip=clip, head=head)
        self.encoder = HFClip(resolve(clip_src), None, clip_src.key, clip_src.what, vision_only=True)
        head_path = resolve(head_src)
        self.head = AestheticHead(self.encoder.model.config.projection_dim)
        load_into(self.head, load_state_dict_file(head_path, head_src.key, head_src.what), head_path, head_src.key, head_src.what)
        self.head.requires_grad_(False).eval()

    @classmethod
    def _sources(cls, clip: str, head: str) -> list[Source]:
        return [
            Source("clip", clip, "model", "aesthetic predictor's CLIP ViT-L/14", "aesthetic"),
            Source("head", head, "file", "aesthetic predictor head", "aesthetic"),
        ]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        emb = F.normalize(self.encoder.image_features(self.pixels(images)).float(), dim=-1)  # [B, D]
        return self.head(emb.to(self.head.layers[0].weight.dtype)).float().squeeze(1)  # [B, 1] -> [B]
