"""The record types every data module shares: an image reference, a record, the mask key, bad items."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile

from rayjobs.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


MASK = ":mask"  # Record.images key of an item's inpainting mask (not a column name a table can have)


MASK_SUFFIX = ".mask.png"  # folder layouts: cat.mask.png is the mask of cat.png / cat.jpg / ...


DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: a file (``path``) or encoded bytes held in memory (``data``).

    ``name`` is what error messages show: the file path, or ``table#row column`` for bytes.
    Both ``path`` and ``data`` are None when the source has no image there (a null cell).
    """

    name: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    def read_bytes(self) -> bytes:
        """The encoded image (file contents or the embedded bytes). Raises BadItem."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise BadItem(self.name, "no image (empty cell)", "fill it in or drop the row")
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise BadItem(self.name, "image file not found", "fix the path or remove the item") from None
        except OSError as err:
            raise BadItem(self.name, f"cannot read image file ({err.strerror or err})", "fix its permissions") from None


@dataclass(frozen=True)
class Record:
    """One training item: images by column, the caption, and a stable ``key``.

    ``key`` is the image path relative to the source (captioned folders) or ``file#row`` (tables:
    0-based row of a parquet/arrow file, 1-based line of metadata.jsonl). ``text`` is None when the
    caption is missing; ``problem`` then says why (found while loading, reported by check_records).
    """

    key: str
    images: dict[str, ImageRef]
    text: str | None
    problem: str | None = None
    name: str = ""  # what errors about the record as a whole (its caption) show; defaults to key


class BadItem(Exception):
    """One unusable item: ``name`` (file or table row), ``reason`` (what is wrong), ``fix`` (what to do)."""

    def __init__(self, name: str, reason: str, fix: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.fix = name, reason, fix

    def user_error(self, where: str) -> UserError:
        """The one-line UserError: ``data.source NAME: REASON; FIX, or set data.skip_bad: true``."""
        return UserError(one_line(f"{where} {self.name}: {self.reason}; {self.fix}, or set data.skip_bad: true"))


def one_line(text: str) -> str:
    """Collapses newlines and runs of spaces so an error prints as one line."""
    return " ".join(str(text).split())


def decode(ref: ImageRef, verify: bool = False) -> Image.Image:
    """Opens and fully decodes one image (``load()``), so truncated files fail here, not later.

    ``verify`` also runs PIL's structural check first (PNG chunk CRCs, missing end chunk).
    Truncated images are always errors: PIL's global LOAD_TRUNCATED_IMAGES is forced off meanwhile.
    Raises BadItem naming the image.
    """
    data = ref.read_bytes()
    if not data:
        raise BadItem(ref.name, "empty image file", "fix or remove it")
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        if verify:
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except DECODE_ERRORS:
        raise BadItem(ref.name, "cannot decode image (truncated or not an image)", "fix or remove it") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
