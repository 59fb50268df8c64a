"""An offline CLIP tokenizer built from the BPE vocabulary open_clip ships.

Stable Diffusion 1.x uses OpenAI's CLIP BPE (49408 tokens). open_clip carries
the same merges as ``bpe_simple_vocab_16e6.txt.gz``; we write them out in the
Hugging Face layout (vocab.json + merges.txt) and load ``CLIPTokenizer`` from
that directory. (Passing ``vocab_file=`` to the transformers 5 constructor
silently yields a 2-token vocabulary, so we always go through
``from_pretrained(dir)``.)
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 77  # CLIP text context, tokens
_N_MERGES = 49152 - 256 - 2  # merges used by OpenAI CLIP (the file has more)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _write_tokenizer_files(directory: Path) -> None:
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]  # line 0 is a version header
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}  # 49408 entries
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def write_compact_tokenizer(directory: str | os.PathLike) -> None:
    """Replace a saved tokenizer/ folder's files by vocab.json + merges.txt (1.5 MB instead of a 3.6 MB
    tokenizer.json); CLIPTokenizer.from_pretrained builds the same tokenizer from them."""
    directory = Path(directory)
    for f in directory.iterdir():
        f.unlink()
    _write_tokenizer_files(directory)


def cache_dir() -> Path:
    """Where draftray keeps files it builds itself ($DRAFTRAY_CACHE, default ~/.cache/draftray)."""
    return Path(os.environ.get("DRAFTRAY_CACHE", Path.home() / ".cache" / "draftray"))


def clip_tokenizer_dir() -> Path:
    """Directory holding the offline CLIP tokenizer files, written once (atomically)."""
    target = cache_dir() / "clip-tokenizer"
    if not (target / "tokenizer_config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".clip-tokenizer-"))
        _write_tokenizer_files(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its files are identical
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return target


def build_clip_tokenizer() -> CLIPTokenizer:
    """The SD 1.x CLIP tokenizer, built without any download."""
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
