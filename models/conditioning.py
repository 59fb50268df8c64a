"""What the UNet is conditioned on, as one batch-first object for SD 1.x and SDXL alike.

SD 1.x conditions on the text encoder's last hidden states alone. SDXL (Podell et al. 2023, sec. 2)
adds two vectors per sample: the pooled, projected embedding of its second text encoder, and six
"micro-conditioning" numbers (original height and width, crop top and left, target height and
width) that diffusers passes as ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``.
:class:`Conditioning` carries all three, so the sampler, the KL reference and the denoise terms
handle both families through one code path (``unet(x, t, **cond.unet_kwargs())``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Conditioning:
    """Batch-first UNet conditioning; ``pooled`` and ``time_ids`` are None for SD 1.x."""

    states: torch.Tensor  # [B, L, D] text states (SDXL: both encoders' penultimate states, concatenated on D)
    pooled: torch.Tensor | None = None  # [B, P] SDXL: text_encoder_2's projected pooled embedding
    time_ids: torch.Tensor | None = None  # [B, 6] SDXL: (orig h, orig w, crop top, crop left, target h, target w)

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        """Rows ``index`` (a slice or index tensor) of every part."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Conditioning(self.states[index], pick(self.pooled), pick(self.time_ids))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Stack along the batch: [B1 + B2 + ..., ...] per part."""
        join = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return Conditioning(
            torch.cat([p.states for p in parts]), join([p.pooled for p in parts]), join([p.time_ids for p in parts])
        )

    def zeros_like(self) -> "Conditioning":
        """All-zero states and pooled embedding: SDXL's unconditional branch for an empty negative prompt
        (diffusers' ``force_zeros_for_empty_prompt``). The time ids are kept."""
        zero = lambda x: None if x is None else torch.zeros_like(x)  # noqa: E731
        return Conditioning(torch.zeros_like(self.states), zero(self.pooled), self.time_ids)

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: ``other`` (broadcast from one row or a full batch) where mask [B] is True, else self."""
        def pick(mine, theirs):
            if mine is None:
                return None
            m = mask.view(-1, *([1] * (mine.dim() - 1)))  # [B, 1, ...]
            return torch.where(m, theirs.to(mine.dtype).expand_as(mine), mine)

        return Conditioning(pick(self.states, other.states), pick(self.pooled, other.pooled), self.time_ids)

    def with_size(self, height: int, width: int, original: tuple[int, int] | None = None,
                  crop: tuple[int, int] = (0, 0)) -> "Conditioning":
        """SDXL micro-conditioning for images of ``height`` x ``width`` pixels, as the pipeline builds it
        (``_get_add_time_ids``: original size defaults to the target size, crop to (0, 0)). SD 1.x: unchanged."""
        if not self.is_sdxl:
            return self
        original = original or (height, width)
        ids = torch.tensor([[*original, *crop, height, width]], dtype=self.states.dtype, device=self.states.device)  # [1, 6]
        return replace(self, time_ids=ids.repeat(len(self), 1))  # [B, 6]

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for this conditioning."""
        if not self.is_sdxl:
            return {"encoder_hidden_states": self.states}
        if self.time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids: call with_size(height, width) first")
        return {"encoder_hidden_states": self.states, "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


def as_conditioning(cond: "Conditioning | torch.Tensor") -> Conditioning:
    """A bare tensor [B, L, D] is SD 1.x conditioning (text states alone)."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)
