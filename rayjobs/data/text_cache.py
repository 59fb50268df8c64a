"""Cache of the frozen text encoder's states per prompt (data.cache_text_embeddings).

When neither the text encoder nor placeholder rows train, a prompt's states [L, D] depend only on
the prompt and the model. Both go into the key, so a new model or dtype misses instead of serving a
stale tensor. The layers:
    memory  the last MEMORY_ENTRIES prompts, on the encoder's device
    disk    rayjobs.data.latent_cache.LatentCache under <run.output_dir>/.cache/text, shared by every
            worker and later runs
Misses of one call are encoded together in one batch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from models.conditioning import Conditioning
from rayjobs.data.latent_cache import LatentCache

MEMORY_ENTRIES = 1024  # SD 1.5: 77 x 768 floats = 236 kB each in float32, so at most ~240 MB


class TextEmbeddingCache:
    """``cache(prompts, encode, device) -> Conditioning [B]``, the same as ``encode(prompts)`` (Policy.encode_prompts).

    Per prompt it keeps the states [L, D] and, for SDXL, the pooled embedding [P] (a second disk entry).
    """

    def __init__(self, directory: str | Path, model_id: str, pooled: bool = False):
        """pooled: the model is SDXL, so an entry is complete only with its pooled part."""
        self.disk = LatentCache(directory)
        self.model_id = model_id
        self.sdxl = pooled
        self.memory: OrderedDict[str, Conditioning] = OrderedDict()

    def __call__(self, prompts: list[str], encode: Callable[[list[str]], Conditioning], device: torch.device) -> Conditioning:
        found = {p: self._lookup(p, device) for p in dict.fromkeys(prompts)}
        missing = [p for p, cond in found.items() if cond is None]
        if missing:
            encoded = encode(missing)  # [M]: the misses in one batch
            for i, p in enumerate(missing):
                row = encoded[i : i + 1]  # [1]
                self.disk.store(self._key(p), row.states[0])  # [L, D]
                if row.pooled is not None:
                    self.disk.store(self._key(p, "pooled"), row.pooled[0])  # [P]
                found[p] = row
        for p, cond in found.items():
            self._remember(p, cond)
        return Conditioning.cat([found[p] for p in prompts])  # [B]

    def _key(self, prompt: str, part: str = "states") -> str:
        # the states keep the key they had before SDXL, so existing caches stay valid
        return LatentCache.key("text", prompt, self.model_id) if part == "states" else LatentCache.key("text", part, prompt, self.model_id)

    def _lookup(self, prompt: str, device: torch.device) -> Conditioning | None:
        if prompt in self.memory:
            self.memory.move_to_end(prompt)
            return self.memory[prompt]
        states = self.disk.load(self._key(prompt))
        if states is None:
            return None
        pooled = self.disk.load(self._key(prompt, "pooled")) if self.sdxl else None
        if self.sdxl and pooled is None:
            return None
        return Conditioning(states[None].to(device), None if pooled is None else pooled[None].to(device))  # [1, L, D], [1, P]

    def _remember(self, prompt: str, cond: Conditioning) -> None:
        self.memory[prompt] = cond
        self.memory.move_to_end(prompt)
        while len(self.memory) > MEMORY_ENTRIES:
            self.memory.popitem(last=False)
