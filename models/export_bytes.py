"""safetensors files whose bytes are a pure function of (tensors, metadata): exports are byte-identical.

safetensors' writer (Rust) already lays the tensors out in a fixed order (by dtype, then name) and writes
their header entries in that order, but it keeps ``__metadata__`` in a Rust ``HashMap``, whose iteration order
is seeded afresh for every map: the same metadata comes out in a different key order from one call (and one
process) to the next, whatever order the Python dict had. So a file with two or more metadata keys is written
here without metadata by safetensors, and its header is re-serialised with ``__metadata__`` first and its keys
sorted (docs/exports.md, "Byte-identical files"). The result is a valid safetensors file (the format: an
8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8, the data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save

HEADER_ALIGN = 8  # safetensors pads the header with spaces so the data starts 8-byte aligned
METADATA = "__metadata__"


def _split(raw: bytes) -> tuple[dict, bytes]:
    """(header as an ordered dict, data bytes) of a safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 + n:
        raise ValueError(f"not a safetensors file: header of {n} bytes, file of {len(raw)}")
    return json.loads(raw[8 : 8 + n].decode("utf-8")), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text + data


def _sorted_metadata(metadata: dict[str, str]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata keys and values must be strings; not so for {bad}")
    return dict(sorted(metadata.items()))


def with_sorted_metadata(raw: bytes, metadata: dict[str, str] | None) -> bytes:
    """``raw`` (a safetensors file's bytes) with ``__metadata__`` replaced by ``metadata`` in sorted key order
    (none: removed); the tensor entries and the data are kept as they are."""
    header, data = _split(raw)
    header.pop(METADATA, None)
    if metadata:
        header = {METADATA: _sorted_metadata(metadata), **header}
    return _join(header, data)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The file bytes of ``tensors`` + ``metadata``: the same bytes for the same inputs, in any process."""
    raw = save(tensors)  # no metadata: the header holds the tensor entries only, in safetensors' fixed order
    return with_sorted_metadata(raw, metadata) if metadata else raw


def _write(path: Path, data: bytes) -> None:
    # write beside, then rename: a reader (or a crash) never sees half a file
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with byte-identical output for the same tensors and metadata."""
    path = Path(path)
    _write(path, safetensors_bytes(tensors, metadata))
    return path


def sort_metadata_in_place(path: str | os.PathLike) -> Path:
    """Rewrite a safetensors file another library wrote (diffusers' ``save_lora_weights``) with its
    ``__metadata__`` keys sorted; the tensors and their bytes are untouched."""
    path = Path(path)
    raw = path.read_bytes()
    header, _ = _split(raw)
    fixed = with_sorted_metadata(raw, header.get(METADATA))
    if fixed != raw:
        _write(path, fixed)
    return path
