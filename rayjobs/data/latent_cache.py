"""Content-keyed cache of tensors (VAE latents, text-encoder states) for frozen encoders.

A key is the sha256 of everything the tensor depends on: the encoded image bytes, the transform
settings and a caller-supplied model id (name + revision/weights hash + dtype), so a change of any
of them misses the cache instead of serving a stale tensor. Only valid with a deterministic
transform (centre crop, no flip): ``cacheable(transform)``; a random crop or flip would freeze
one draw forever.

Layout: ``<directory>/<key[:2]>/<key>.safetensors`` holding one tensor named ``tensor``. Each file
is written to a temporary file in the same folder and moved into place with ``os.replace``, so a
reader (another worker, a later run) sees the whole file or none; concurrent writers of one key
write the same content and the last one wins.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = b"draftray-latent-cache-v1"
TENSOR = "tensor"
_HEX64 = re.compile(r"[0-9a-f]{64}")

logger = logging.getLogger(__name__)


def cacheable(transform) -> bool:
    """True when ``transform`` (rayjobs.data.images.ImageTransform) gives the same pixels every time."""
    return bool(transform.center_crop) and not transform.random_flip


class LatentCache:
    """Tensors on disk under ``directory``, keyed by content. ``hits``/``misses`` count lookups;
    ``corrupt`` counts the unreadable files among the misses (each logged at warning level, then recomputed)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    @staticmethod
    def key(*parts: bytes | str) -> str:
        """sha256 hex of the parts; each is length-prefixed and typed, so ("ab","c") != ("a","bc")."""
        digest = hashlib.sha256(FORMAT)
        for part in parts:
            if isinstance(part, str):
                tag, data = b"s", part.encode("utf-8")
            elif isinstance(part, (bytes, bytearray, memoryview)):
                tag, data = b"b", bytes(part)
            else:
                raise TypeError(f"cache key parts are bytes or str, got {type(part).__name__}")
            digest.update(tag + len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    @classmethod
    def image_key(cls, image_bytes: bytes, transform, model_id: str) -> str:
        """Key of the latent of one encoded image under ``transform`` by the encoder ``model_id``.

        Raises ValueError for a random transform (see ``cacheable``).
        """
        if not cacheable(transform):
            raise ValueError(f"latent cache needs a deterministic transform (center crop, no flip), got {transform.settings()}")
        return cls.key("image", image_bytes, transform.settings(), model_id)

    def path(self, key: str) -> Path:
        """Where the tensor of ``key`` lives (``key`` must be a sha256 hex digest)."""
        if not _HEX64.fullmatch(key):
            raise ValueError(f"cache key must be 64 lowercase hex digits, got {key!r}")
        return self.directory / key[:2] / f"{key}.safetensors"

    def get_or_compute(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor of ``key`` (on CPU), else ``fn()`` stored and returned as fn gave it.

        An unreadable cache file (damaged disk) counts as a miss (and in ``corrupt``) and is rewritten.
        """
        tensor = self.load(key)
        if tensor is not None:
            return tensor
        tensor = fn()
        self.store(key, tensor)
        return tensor

    def load(self, key: str) -> torch.Tensor | None:
        """The cached tensor of ``key`` on CPU, or None (counted as a miss; an unreadable file is also counted
        in ``corrupt`` and logged with its path and reason)."""
        path = self.path(key)
        if path.is_file():
            try:
                tensor = load_file(path)[TENSOR]
                self.hits += 1
                return tensor
            except (SafetensorError, OSError, KeyError, ValueError) as err:
                # Said, not silent: a disk that damages files keeps costing encoder passes, and only the log shows it.
                self.corrupt += 1
                logger.warning("latent cache: %s is unreadable (%s: %s); recomputing it", path, type(err).__name__, err)
        self.misses += 1
        return None

    def store(self, key: str, tensor: torch.Tensor) -> None:
        """Writes ``tensor`` (copied to CPU) as the value of ``key``, atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}-", suffix=".tmp")
        os.close(fd)
        try:
            save_file({TENSOR: tensor.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
