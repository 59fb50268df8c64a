"""Where reward weights come from: a local path, the Hugging Face cache, or a cached URL. Never a download,
except in ``fetch`` (the ``draftray weights fetch`` command, for users with network access).

A weight location ("spec") is one string, in one of three forms:

- a local file or directory: ``/models/PickScore_v1``, ``~/ckpt/HPS_v2.1_compressed.pt``;
- a hub id: ``org/repo`` for a whole model directory, ``org/repo:file`` for one file of it;
  resolved in the Hugging Face cache only (``local_files_only``);
- an ``https://`` URL of one file: resolved in torch's hub cache (``torch.hub.get_dir()/checkpoints``),
  the same place torchvision keeps its ImageNet weights.

Resolution happens at start-up, before any cluster resources are taken; a missing location gives one
line naming the config key, the location, and the two ways out (fetch it, or point the key at a path).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from torch import nn


class MissingWeightsError(ValueError):
    """A weight location that resolves to nothing on this machine (or to a file that cannot be read)."""


@dataclass(frozen=True)
class Source:
    """One weight location a reward needs.

    key: the reward setting naming it (``reward.kwargs.<key>`` in a config); spec: its value;
    kind: "file" (one weights file), "model" (a transformers model directory) or "processor" (a
    directory with tokenizer / image-processor files); what: a few words for messages; fetch_name: the ``draftray weights fetch`` name.
    """

    key: str
    spec: str
    kind: str
    what: str
    fetch_name: str


def _is_url(spec: str) -> bool:
    return spec.startswith(("https://", "http://"))


def _hub_parts(spec: str) -> tuple[str, str | None]:
    """'org/repo' -> (org/repo, None); 'org/repo:file' -> (org/repo, file)."""
    repo, _, filename = spec.partition(":")
    return repo, (filename or None)


def _looks_like_hub(spec: str) -> bool:
    repo, _ = _hub_parts(spec)
    return repo.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(repo).exists()


def url_cache_path(url: str) -> Path:
    """Where a URL's file lives once fetched: torch's hub cache, by the URL's file name."""
    name = unquote(Path(urlparse(url).path).name)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _missing(src: Source, where: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{src.key}: {src.what} not found ({src.spec!r}: {where}); run `draftray weights fetch {src.fetch_name}` "
        f"where there is network access, or set {src.key} to a local {'file' if src.kind == 'file' else 'directory'}"
    )


def resolve(src: Source) -> Path:
    """The local path of a weight location; MissingWeightsError when it is not on this machine."""
    spec = src.spec
    local = Path(os.path.expanduser(spec))
    if local.exists():
        if src.kind == "file" and not local.is_file():
            raise MissingWeightsError(f"{src.key}: {src.what}: {spec!r} is a directory, expected a file")
        if src.kind != "file" and not local.is_dir():
            raise MissingWeightsError(f"{src.key}: {src.what}: {spec!r} is a file, expected a directory")
        return local
    if _is_url(spec):
        path = url_cache_path(spec)
        if path.is_file():
            return path
        raise _missing(src, f"not in torch's hub cache {path.parent}")
    if _looks_like_hub(spec):
        return _resolve_hub(src)
    raise _missing(src, "no such local path, and not a hub id 'org/repo' or 'org/repo:file' or an https URL")


def _resolve_hub(src: Source) -> Path:
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    repo, filename = _hub_parts(src.spec)
    if (src.kind == "file") != (filename is not None):
        form = "'org/repo:file'" if src.kind == "file" else "'org/repo' (a whole directory)"
        raise MissingWeightsError(f"{src.key}: {src.what}: {src.spec!r} must be a local path or {form}")
    try:
        if filename is not None:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001  (LocalEntryNotFoundError, offline-mode errors, bad repo ids)
        raise _missing(src, f"not in the Hugging Face cache {constants.HF_HUB_CACHE}") from None


def fetch(src: Source) -> Path:
    """Download one weight location into its cache (network needed); returns the local path.

    A local path is only checked. Hub directories take configs, tokenizer files and safetensors
    weights (``.bin`` only when the repo has no safetensors).
    """
    local = Path(os.path.expanduser(src.spec))
    if local.exists():
        return resolve(src)
    if _is_url(src.spec):
        path = url_cache_path(src.spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(src.spec, str(path), progress=True)  # writes a temp file, then renames
        return path
    if not _looks_like_hub(src.spec):
        raise MissingWeightsError(f"{src.key}: {src.spec!r} is neither a local path, a hub id nor an https URL")
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    repo, filename = _hub_parts(src.spec)
    if filename is not None:
        return Path(hf_hub_download(repo, filename))
    files = list_repo_files(repo)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    return Path(snapshot_download(repo, allow_patterns=["*.json", "*.txt", *weights]))


def load_tensors_only(path: Path, key: str, what: str):
    """torch.load with weights_only=True: tensors, plain containers and numbers, never an arbitrary
    object. A file that needs more (a full pickle: unpickling it could run any code) is refused in
    one line; it is never loaded with weights_only=False (docs/security.md)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line or "Unsupported operand" in line]
        detail = lines[0].split(" was not")[0].removeprefix("WeightsUnpickler error: ") if lines else "objects other than tensors"
        raise MissingWeightsError(
            f"{key}: {what}: {path} is a pickle that holds more than tensors ({detail}); refused, since loading it could "
            "run code from the file; use a .safetensors file or a plain state_dict saved with torch.save"
        ) from None


def check_weights_file(path: Path, key: str, what: str) -> None:
    """Cheap start-up check that a weights file is readable: a safetensors header, or a torch zip
    archive's central directory (at the end of the file, so a truncated download fails here)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                z.namelist()
        else:  # a legacy (pre-1.6) torch pickle: no index to check, load it (tensors only, never code)
            load_tensors_only(path, key, what)
    except MissingWeightsError:
        raise
    except Exception as err:  # noqa: BLE001  (each format fails its own way)
        raise MissingWeightsError(f"{key}: {what}: {path} is not a readable weights file ({err}); fetch it again") from None


def check_model_dir(path: Path, key: str, what: str) -> None:
    """A transformers model directory: config.json and readable weights."""
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"{key}: {what}: {path} has no config.json (not a transformers model directory)")
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        raise MissingWeightsError(f"{key}: {what}: {path} has no model weights (*.safetensors or pytorch_model.bin)")
    for f in weights:
        check_weights_file(f, key, what)


def probe(src: Source, path: Path, key: str | None = None) -> None:
    """Start-up check of a resolved location: a readable weights file, a model directory with config and
    weights, or a processor directory with tokenizer files."""
    key = key or src.key
    if src.kind == "file":
        check_weights_file(path, key, src.what)
    elif src.kind == "model":
        check_model_dir(path, key, src.what)
    elif not ((path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()):
        raise MissingWeightsError(f"{key}: {src.what}: {path} has no tokenizer files (vocab.json or tokenizer.json)")


def load_state_dict_file(path: Path, key: str, what: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict: safetensors, or a torch file holding it (under "state_dict" if wrapped).
    DDP's "module." prefix is removed."""
    check_weights_file(path, key, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = load_tensors_only(path, key, what)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MissingWeightsError(f"{key}: {what}: {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], path: Path, key: str, what: str) -> None:
    """Strict load with one clear line on a mismatch (wrong file for this architecture)."""
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:2]
        raise MissingWeightsError(f"{key}: {what}: {path} does not fit the architecture ({' '.join(first)})") from None
