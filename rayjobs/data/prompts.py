"""Prompt sources for reward fine-tuning (DRaFT+): text, JSONL, or webdataset tar shards.

  prompts.txt      one prompt per line (blank lines skipped)
  prompts.jsonl    one JSON object per line; the prompt under ``key`` (default "prompt")
  prompts.tar      webdataset: samples ``<key>.txt`` (the prompt) or ``<key>.json`` ({"txt": prompt}),
                   as NeMo-Aligner's DRaFT+ reads; a folder of ``*.tar`` shards reads them in name order

Prompts keep their order; surrounding whitespace is stripped and blank prompts are skipped. A prompt longer
than MAX_PROMPT_CHARS (10,000) characters is an error (a file without line breaks, not a prompt), as is a
path that is a FIFO, device or socket (reading it would wait for a writer forever).
Every error is one line naming the file (and the line or tar member).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from rayjobs.config.data import MAX_PROMPT_CHARS, special_file
from rayjobs.data.records import one_line
from rayjobs.data.tables import read_jsonl
from rayjobs.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FORMATS = "a .txt file (one prompt per line), a .jsonl file, or webdataset .tar shards"


def load_prompts_source(path: str | Path, key: str | None = None, where: str = "data.prompts_file") -> list[str]:
    """The prompts of ``path`` in order. ``key``: the JSON field holding the prompt (default
    "prompt" for JSONL, "txt" for .json members of a tar). ``where`` is the config key errors name.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{where} {path}: not found (expected {FORMATS})")
    kind = special_file(path)
    if kind is not None:  # checked before any open(): opening a FIFO blocks until something writes to it
        raise UserError(f"{where} {path}: {kind}, not a regular file (expected {FORMATS})")
    if path.is_dir():
        prompts = [p for shard in _shards(path, where) for p in _tar_prompts(shard, key or "txt", where)]
    elif path.name.lower().endswith(TAR_SUFFIXES):
        prompts = _tar_prompts(path, key or "txt", where)
    elif path.suffix.lower() == ".jsonl":
        prompts = _jsonl_prompts(path, key or "prompt", where)
    else:
        prompts = _text_prompts(path, where)
    if not prompts:
        raise UserError(f"{where} {path}: no prompts (expected {FORMATS})")
    return prompts


def _shards(folder: Path, where: str) -> list[Path]:
    shards = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
    if not shards:
        raise UserError(f"{where} {folder}: a folder without .tar shards (expected {FORMATS})")
    return shards


def _text_prompts(path: Path, where: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{where} {path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(one_line(f"{where} {path}: cannot read ({getattr(err, 'strerror', None) or err})")) from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        prompt = _capped(line.strip(), path, f"line {number}", where)
        if prompt:
            prompts.append(prompt)
    return prompts


def _capped(prompt: str, path: Path, at: str, where: str) -> str:
    """The prompt, or UserError when it is longer than MAX_PROMPT_CHARS (checked before any tokenizer sees it)."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"{where} {path}: {at}: a prompt of {len(prompt):,} characters, over the {MAX_PROMPT_CHARS:,} allowed "
                        "(the text encoder reads 77 tokens); missing line breaks? one prompt per line")  # fmt: skip
    return prompt


def _jsonl_prompts(path: Path, key: str, where: str) -> list[str]:
    prompts = []
    for line, row in read_jsonl(path, where):
        if key not in row:
            have = ", ".join(sorted(row)) or "none"
            raise UserError(f"{where} {path}: line {line}: no key {key!r} (keys: {have}); set the prompt key")
        prompt = row[key]
        if not isinstance(prompt, str):
            raise UserError(f"{where} {path}: line {line}: {key!r} holds {type(prompt).__name__}, not text")
        if _capped(prompt.strip(), path, f"line {line}", where):
            prompts.append(prompt.strip())
    return prompts


def _split_name(name: str) -> tuple[str, str]:
    """webdataset naming: ``dir/abc.prompt.txt`` -> (``dir/abc``, ``prompt.txt``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(path: Path, where: str) -> list[tuple[str, dict[str, bytes]]]:
    """(sample key, {extension: member bytes}) in member order; consecutive members share a sample."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                sample, ext = _split_name(member.name)
                if not samples or samples[-1][0] != sample:
                    samples.append((sample, {}))
                samples[-1][1][ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(one_line(f"{where} {path}: cannot read tar ({err})")) from None
    return samples


def _tar_prompts(path: Path, key: str, where: str) -> list[str]:
    """One prompt per sample holding a .txt (preferred) or .json member; other samples are ignored."""
    prompts = []
    for sample, files in _samples(path, where):
        if "txt" in files:
            prompt = _utf8(files["txt"], path, f"{sample}.txt", where)
        elif "json" in files:
            prompt = _json_prompt(files["json"], path, f"{sample}.json", key, where)
        else:
            continue
        if _capped(prompt.strip(), path, f"member {sample}", where):
            prompts.append(prompt.strip())
    return prompts


def _utf8(data: bytes, path: Path, member: str, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{where} {path}: member {member}: not UTF-8 text") from None


def _json_prompt(data: bytes, path: Path, member: str, key: str, where: str) -> str:
    try:
        obj = json.loads(_utf8(data, path, member, where))
    except json.JSONDecodeError as err:
        raise UserError(f"{where} {path}: member {member}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{where} {path}: member {member}: no key {key!r} (expected {{\"{key}\": prompt}})")
    if not isinstance(obj[key], str):
        raise UserError(f"{where} {path}: member {member}: {key!r} holds {type(obj[key]).__name__}, not text")
    return obj[key]
