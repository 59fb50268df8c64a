"""Random-weight reward models, tiny or at real size, written in the layouts the loaders read.

Tests and benchmarks never download: they build the reward architectures here (seeded) and save
them exactly as the real weights are laid out, so loading goes through the same code as the real
files (PickScore's transformers directory, the HPS ``{"state_dict": ...}`` checkpoint, the aesthetic
head's ``.pth``). ``size="tiny"`` is a few MB and runs on a CPU in milliseconds; ``size="real"`` has
the published architectures (ViT-H-14, ViT-L/14) for GPU speed measurements.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_OPEN_CLIP = "draftray-tiny-clip"  # open_clip config name registered by ``register_tiny_open_clip``

# transformers CLIPConfig sizes. "real-h14" = LAION ViT-H-14 (PickScore), "real-l14" = OpenAI ViT-L/14.
HF_SIZES = {
    "tiny": dict(text=(32, 64, 2, 2), vision=(32, 64, 2, 2, 32), projection=16),
    "real-h14": dict(text=(1024, 4096, 24, 16), vision=(1280, 5120, 32, 16, 14), projection=1024),
    "real-l14": dict(text=(768, 3072, 12, 12), vision=(1024, 4096, 24, 16, 14), projection=768),
}


def hf_clip_config(size: str = "tiny", image_size: int = 224):
    """A CLIPConfig; text/vision tuples are (hidden, intermediate, layers, heads[, patch])."""
    from transformers import CLIPConfig

    s = HF_SIZES[size]
    th, ti, tl, tn = s["text"]
    vh, vi, vl, vn, patch = s["vision"]
    act = "gelu" if size == "real-h14" else "quick_gelu"  # LAION's ViT-H uses GELU, OpenAI's QuickGELU
    text = dict(vocab_size=49408, hidden_size=th, intermediate_size=ti, num_hidden_layers=tl, num_attention_heads=tn,
                max_position_embeddings=77, hidden_act=act, eos_token_id=49407, bos_token_id=49406, pad_token_id=1)  # fmt: skip
    vision = dict(image_size=image_size, patch_size=patch, hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl,
                  num_attention_heads=vn, hidden_act=act)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection"])


def save_hf_clip(directory: str | Path, tokenizer_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random CLIPModel saved with save_pretrained, plus the CLIP tokenizer files copied from
    ``tokenizer_dir`` (e.g. models.tokenizer.clip_tokenizer_dir(), built offline) and the image-processor
    config: the layout of PickScore_v1 + its processor, or of openai/clip-vit-large-patch14."""
    from transformers import CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    from rewards.clip import quiet_transformers

    model = CLIPModel(hf_clip_config(size)).eval()
    with quiet_transformers():
        model.save_pretrained(str(directory))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, directory / f.name)
    image_processor(model.config.vision_config.image_size).save_pretrained(str(directory))
    return directory


def image_processor(size: int = 224):
    """CLIP's official image processor settings (OpenAI and LAION ViT-H-14 use the same ones)."""
    from transformers import CLIPImageProcessor

    from rewards.preprocess import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,  # PIL bicubic
        do_center_crop=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )  # fmt: skip


def register_tiny_open_clip(directory: str | Path) -> str:
    """Register a tiny open_clip config (ViT-H-14's family: ViT + text transformer, GELU) and return its name."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    path = directory / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    return TINY_OPEN_CLIP


def save_open_clip(path: str | Path, arch: str, seed: int = 0) -> Path:
    """A random open_clip model's state_dict saved like the HPS checkpoints: torch.save({"state_dict": sd})."""
    from rewards.clip import create_open_clip

    torch.manual_seed(seed)
    model = create_open_clip(arch)
    path = Path(path)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def save_aesthetic_head(path: str | Path, dim: int, seed: int = 0) -> Path:
    """A random aesthetic MLP head saved like sac+logos+ava1-l14-linearMSE.pth (a plain state_dict)."""
    from rewards.preference import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(dim)
    torch.save(head.state_dict(), Path(path))
    return Path(path)
