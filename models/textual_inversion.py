"""Textual inversion: new placeholder tokens whose embedding rows are the only trainable weights.

A placeholder ``<cat>`` with ``n`` vectors becomes the tokens ``<cat>, <cat>_1, ..., <cat>_{n-1}``
(the naming of diffusers' ``TextualInversionLoaderMixin``), and a prompt "a photo of <cat>" is
expanded to "a photo of <cat> <cat>_1 <cat>_2" before tokenising (``maybe_convert_prompt``).

The text encoder's token embedding is replaced by :class:`ExtendedEmbedding`: the original table
is a frozen buffer and the new rows are the single parameter ``new_rows`` [n_new, D]. Every other
row is bit-identical after training whatever the optimizer does (weight decay included), and the
gradient is [n_new, D], never a dense [V, D] one.

The export, ``learned_embeds.safetensors`` = ``{placeholder: Tensor[n_vectors, D]}``, is what
``StableDiffusionPipeline.load_textual_inversion(path)`` and the A1111 WebUI ``embeddings/`` folder read.
SDXL: ``{"clip_l": [n, D1], "clip_g": [n, D2]}`` per placeholder (export_textual_inversion_sdxl).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.export_bytes import save_safetensors

TI_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
SDXL_TI_KEYS = ("clip_l", "clip_g")  # SDXL embedding files: rows for text_encoder (CLIP ViT-L), text_encoder_2 (bigG)
CLIP_TI_DECAY_TARGET = 0.4  # cloneofsimo/lora cli_lora_pti.py: the norm new rows are pulled towards


class ExtendedEmbedding(nn.Module):
    """Token embedding over ``V + n_new`` ids: a frozen base table [V, D] plus trainable rows [n_new, D].

    ids < V read the frozen table, ids >= V read ``new_rows[id - V]``. The values are exactly those
    of ``F.embedding(ids, cat([base, new_rows]))``; the output dtype is the base table's.
    """

    def __init__(self, base_weight: torch.Tensor, init_rows: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        # Not persistent: the base table belongs to the pretrained model; checkpoints hold only new_rows.
        self.register_buffer("base_weight", base_weight.detach(), persistent=False)
        rows = init_rows.detach().to(device=base_weight.device, dtype=base_weight.dtype).clone()
        self.new_rows = nn.Parameter(rows)  # [n_new, D]
        self.padding_idx = padding_idx

    @property
    def num_base(self) -> int:
        return self.base_weight.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base_weight.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The full table [V + n_new, D] (differentiable in new_rows), for code that reads ``.weight``."""
        return torch.cat([self.base_weight, self.new_rows.to(self.base_weight.dtype)])  # [V + n_new, D]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (int) -> embeddings [..., D]."""
        is_new = (ids >= self.num_base).unsqueeze(-1)  # [..., 1]
        base = F.embedding(ids.clamp(max=self.num_base - 1), self.base_weight, self.padding_idx)  # [..., D]
        new = F.embedding((ids - self.num_base).clamp(min=0), self.new_rows)  # [..., D]
        return torch.where(is_new, new.to(base.dtype), base)

    def merged(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` [V + n_new, D] holding the current values (for saving/export)."""
        table = self.weight.detach().clone()
        embedding = nn.Embedding(table.shape[0], table.shape[1], padding_idx=self.padding_idx)
        embedding.weight = nn.Parameter(table, requires_grad=False)
        return embedding


def install(text_encoder: nn.Module, n_new: int, init_rows: torch.Tensor) -> ExtendedEmbedding:
    """Give ``text_encoder`` ``n_new`` more token rows initialised to ``init_rows`` [n_new, D].

    Replaces the input embedding (``set_input_embeddings``); if one is already an ExtendedEmbedding,
    its trained rows are kept and the new ones appended (build the optimizer after the last call).
    Sets ``config.vocab_size`` to the new row count, as ``resize_token_embeddings`` does.
    """
    current = text_encoder.get_input_embeddings()
    if init_rows.shape != (n_new, current.weight.shape[1]):
        raise ValueError(f"init_rows must be [{n_new}, {current.weight.shape[1]}], got {list(init_rows.shape)}")
    if isinstance(current, ExtendedEmbedding):
        old = current.new_rows.detach()
        rows = torch.cat([old, init_rows.to(device=old.device, dtype=old.dtype)])  # [n_old + n_new, D]
        extended = ExtendedEmbedding(current.base_weight, rows, current.padding_idx)
    else:
        extended = ExtendedEmbedding(current.weight, init_rows, current.padding_idx)
    text_encoder.set_input_embeddings(extended)
    if getattr(text_encoder, "config", None) is not None:
        text_encoder.config.vocab_size = extended.num_embeddings
    return extended


def trainable_rows(text_encoder: nn.Module) -> nn.Parameter | None:
    """The new token rows [n_new, D] (the only textual-inversion parameter), or None if none installed."""
    embedding = text_encoder.get_input_embeddings()
    return embedding.new_rows if isinstance(embedding, ExtendedEmbedding) else None


def placeholder_names(token: str, num_vectors: int) -> list[str]:
    """``<cat>, <cat>_1, ..., <cat>_{n-1}``: the tokens diffusers adds for an n-vector embedding."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def add_placeholder(tokenizer, text_encoder: nn.Module, token: str, num_vectors: int, init_token: str | None,
                    generator: torch.Generator | None = None) -> list[int]:
    """Add placeholder ``token`` with ``num_vectors`` embedding vectors; returns their token ids.

    Initial rows: the embedding of ``init_token`` (one BPE token) for every vector, as diffusers'
    textual_inversion.py example; or, with init_token None, N(0, I) rows rescaled to the mean row
    norm of the existing table (drawn from ``generator``). ValueError if a name exists already or
    init_token is not a single token; nothing is modified in that case.
    """
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    names = placeholder_names(token, num_vectors)
    vocab = tokenizer.get_vocab()
    taken = [name for name in names if name in vocab]
    if taken:
        raise ValueError(f"token {taken[0]!r} is already in the tokenizer vocabulary; choose another placeholder")
    table = text_encoder.get_input_embeddings().weight.detach()  # [V_now, D]
    rows = _initial_rows(tokenizer, table, num_vectors, init_token, generator)  # [num_vectors, D]
    if len(tokenizer) != table.shape[0]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text encoder {table.shape[0]} rows")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    install(text_encoder, num_vectors, rows)
    return list(ids)


def _initial_rows(tokenizer, table: torch.Tensor, n: int, init_token: str | None, generator) -> torch.Tensor:
    """[n, D] initial rows (see add_placeholder)."""
    if init_token is not None:
        ids = tokenizer.encode(init_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"init_token {init_token!r} must be a single token, it tokenises to {len(ids)}")
        return table[ids[0]].float().expand(n, -1).clone()  # [D] -> [n, D]
    mean_norm = table.float().norm(dim=-1).mean()
    rows = torch.randn(n, table.shape[1], generator=generator)  # [n, D]
    return (rows / rows.norm(dim=-1, keepdim=True) * mean_norm).to(table.device)


def expand_prompt(prompt: str, tokens: dict[str, int]) -> str:
    """Spell out multi-vector placeholders: "a <cat>" -> "a <cat> <cat>_1 <cat>_2" for tokens {"<cat>": 3}.

    Same result as diffusers' ``maybe_convert_prompt`` (plain substring replacement of each
    placeholder present). It differs only for prompts that already spell an expansion name such as
    "<cat>_1" without "<cat>" itself, which diffusers' tokenizer-based check leaves alone.
    """
    for token, num_vectors in tokens.items():
        if num_vectors > 1 and token in prompt:
            prompt = prompt.replace(token, " ".join(placeholder_names(token, num_vectors)))
    return prompt


@torch.no_grad()
def decay_norms_(rows: torch.Tensor, target_norm: float = CLIP_TI_DECAY_TARGET, lr: float = 1e-3) -> torch.Tensor:
    """Pull each row's L2 norm towards ``target_norm``, direction kept (cloneofsimo/lora ``clip_ti_decay``).

    norm_new = norm + lambda (target_norm - norm), lambda = min(1, 100 lr) with lr the current
    learning rate; applied in place after each optimizer step. rows [n, D]; returns rows.
    """
    lam = min(1.0, 100.0 * lr)
    norm = rows.norm(dim=-1, keepdim=True)  # [n, 1]
    rows.copy_(F.normalize(rows, dim=-1) * (norm + lam * (target_norm - norm)))
    return rows


def _per_placeholder(tokens: dict[str, int], rows: torch.Tensor, what: str = "rows") -> list[torch.Tensor]:
    """rows [sum n, D] -> one contiguous float32 CPU tensor [n, D] per placeholder, in ``tokens`` order."""
    total = sum(tokens.values())
    if rows.shape[0] != total:
        raise ValueError(f"{what} has {rows.shape[0]} vectors but tokens need {total}")
    rows = rows.detach().to("cpu", torch.float32)
    return [part.contiguous() for part in rows.split(list(tokens.values()))]


def _file_names(tokens: dict[str, int]) -> list[str]:
    """diffusers reads one placeholder per file: ``learned_embeds.safetensors``, or ``learned_embeds_<k>`` each."""
    return [TI_FILE] if len(tokens) == 1 else [f"learned_embeds_{k}.safetensors" for k in range(len(tokens))]


def export_textual_inversion(directory: str | os.PathLike, tokens: dict[str, int], rows: torch.Tensor) -> Path:
    """Write the learned embeddings in diffusers' format; returns the file (one placeholder) or the directory.

    tokens: placeholder -> number of vectors, in the order their rows were added; rows [sum n, D].
    One placeholder: ``learned_embeds.safetensors`` = {placeholder: [n, D]} (``load_textual_inversion(dir)``).
    Several: diffusers reads one placeholder per file, so ``learned_embeds_<k>.safetensors`` each,
    k = 0, 1, ... in ``tokens`` order (``load_textual_inversion([file0, file1, ...])``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parts = _per_placeholder(tokens, rows)
    paths = [directory / name for name in _file_names(tokens)]
    for path, token, part in zip(paths, tokens, parts):
        save_safetensors({token: part}, path)  # [n, D]
    return paths[0] if len(paths) == 1 else directory


def export_textual_inversion_sdxl(directory: str | os.PathLike, tokens: dict[str, int],
                                  rows: dict[str, torch.Tensor]) -> Path:
    """SDXL: both encoders' rows of each placeholder in ONE file, the community SDXL embedding layout.

    rows: {"clip_l": [sum n, D1] of text_encoder, "clip_g": [sum n, D2] of text_encoder_2} (SDXL_TI_KEYS;
    an encoder without new rows is left out). Each file is {"clip_l": [n, D1], "clip_g": [n, D2]} with
    metadata {"token": placeholder}, since the keys no longer name it; diffusers loads it with one
    ``load_textual_inversion(sd[key], token=..., text_encoder=..., tokenizer=...)`` per encoder
    (docs/exports.md). File names and the return value as export_textual_inversion.
    """
    unknown = sorted(set(rows) - set(SDXL_TI_KEYS))
    if unknown or not rows:
        raise ValueError(f"rows must be keyed by {SDXL_TI_KEYS}, got {sorted(rows)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parts = {key: _per_placeholder(tokens, r, f"rows[{key!r}]") for key, r in rows.items()}
    paths = [directory / name for name in _file_names(tokens)]
    for k, (path, token) in enumerate(zip(paths, tokens)):
        save_safetensors({key: parts[key][k] for key in parts}, path, metadata={"token": token})  # [n, D_i] each
    return paths[0] if len(paths) == 1 else directory
