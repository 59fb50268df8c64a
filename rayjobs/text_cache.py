"""Cache of the frozen text encoder's states per prompt (data.cache_text_embeddings, issue 6).

When neither the text encoder nor placeholder rows train, a prompt's states [L, D] depend only on
the prompt and the model. Both go into the key, so a new model or dtype misses instead of serving a
stale tensor. The layers:
    memory  the last MEMORY_ENTRIES prompts, on the encoder's device
    disk    rayjobs.latent_cache.LatentCache under <run.output_dir>/.cache/text, shared by every
            worker and later runs
Misses of one call are encoded together in one batch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from rayjobs.latent_cache import LatentCache

MEMORY_ENTRIES = 1024  # SD 1.5: 77 x 768 floats = 236 kB each in float32, so at most ~240 MB


class TextEmbeddingCache:
    """``cache(prompts, encode, device) -> [B, L, D]``, the same as ``encode(prompts)`` (Policy.encode_prompts)."""

    def __init__(self, directory: str | Path, model_id: str):
        self.disk = LatentCache(directory)
        self.model_id = model_id
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor], device: torch.device) -> torch.Tensor:
        found = {p: self._lookup(p, device) for p in dict.fromkeys(prompts)}
        missing = [p for p, states in found.items() if states is None]
        if missing:
            for p, states in zip(missing, encode(missing)):  # [M, L, D]: the misses in one batch
                self.disk.store(self._key(p), states)
                found[p] = states
        for p, states in found.items():
            self._remember(p, states)
        return torch.stack([found[p] for p in prompts])  # [B, L, D]

    def _key(self, prompt: str) -> str:
        return LatentCache.key("text", prompt, self.model_id)

    def _lookup(self, prompt: str, device: torch.device) -> torch.Tensor | None:
        if prompt in self.memory:
            self.memory.move_to_end(prompt)
            return self.memory[prompt]
        states = self.disk.load(self._key(prompt))
        return None if states is None else states.to(device)

    def _remember(self, prompt: str, states: torch.Tensor) -> None:
        self.memory[prompt] = states
        self.memory.move_to_end(prompt)
        while len(self.memory) > MEMORY_ENTRIES:
            self.memory.popitem(last=False)
