"""Image-text records for the supervised methods (fine-tune, DreamBooth, TI, InstructPix2Pix).

``load_records`` finds the items of a data source and ``check_records`` decodes every image once
before training, so a bad file stops the run at start-up with one line naming it (or is skipped
with ``skip_bad``). Nothing in the source is ever written. Layouts (docs/data.md):

  captioned folder   images (png/jpg/jpeg/webp/bmp, recursive) with ``cat.txt`` beside ``cat.png``
  imagefolder        a folder with ``metadata.jsonl`` (``file_name`` or one column per image)
  parquet            a ``.parquet`` file or a folder of them (path, bytes or {"bytes","path"} cells)
  save_to_disk       a Hugging Face ``Dataset.save_to_disk`` folder (``state.json`` + ``*.arrow``)
  image folder       images only, when ``fixed_caption`` gives the one prompt for all (DreamBooth)

Inpainting masks (``masks=True``, data.mask_kind: dataset) are one more image of each record, under
the key ``MASK``: ``cat.mask.png`` beside ``cat.png`` in folders (never listed as a training image),
the ``mask_column`` cell in tables. check_record requires a mask of its image's size, neither empty
nor full once thresholded at 0.5; a non-binary mask is thresholded, said once on stderr.

Table layouts are read by rayjobs/data/tables.py; decoding is shared with the training-time
dataset (rayjobs/data/images.py).

Special files (a FIFO, device or socket) are never opened: opening a FIFO blocks until something writes
to it, and a device such as /dev/zero never ends. Every file the loader would read is stat()ed first: a
special file among an item's files (image, caption, mask; or a symlink to one) makes that item bad (one
line naming it, or skipped with ``skip_bad``); one where the layout's own files go (metadata.jsonl,
state.json, .parquet, .arrow) is an error. Other files are never read, whatever they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from rayjobs.config.data import special_file
from rayjobs.data import tables
from rayjobs.data.records import (
    IMAGE_EXTENSIONS,
    MASK,
    MASK_SUFFIX,
    BadItem,
    ImageRef,
    Record,
    decode,
    one_line,
)
from rayjobs.errors import UserError

LAYOUTS = (
    "images with a .txt caption beside each, a metadata.jsonl, .parquet files, "
    "a save_to_disk folder (state.json + .arrow), or images only with data.fixed_caption"
)


def load_records(
    source: str | Path,
    image_columns: list[str] | tuple[str, ...] = ("image",),
    text_column: str = "text",
    fixed_caption: str | None = None,
    where: str = "data.source",
    masks: bool = False,
    mask_column: str | None = None,
) -> list[Record]:
    """Every item of ``source`` (layout auto-detected, see the module doc), in a deterministic order.

    ``image_columns`` names the images of one item (InstructPix2Pix: input_image, edited_image);
    ``text_column`` the caption column of table layouts. ``fixed_caption``, when given, is the
    caption of every item and no caption is read. ``where`` is the config key errors start with.
    Structural problems (no such path, unknown layout, missing column) raise UserError; per-item
    problems are left for check_records. ``masks``: each record also gets its inpainting mask under
    ``MASK``, from ``mask_column`` (table layouts, required there) or ``<stem>.mask.png`` beside each
    image (folder layouts, where ``mask_column`` must be None).
    """

    image_columns = list(image_columns)
    if not image_columns:
        raise UserError(f"{where}: no image column given (set data.image_column)")
    root = Path(source)
    if not root.exists():
        raise UserError(f"{where} {root}: not found (give a folder, a .parquet file or a save_to_disk folder)")
    _refuse_special(root, where)
    masks_spec = (masks, mask_column)
    if root.is_file():
        if root.suffix.lower() == ".parquet":
            table_mask = _table_mask(masks_spec, root, where)
            return tables.parquet_records([root], root.parent, image_columns, text_column, fixed_caption, where, table_mask)
        if root.name == "metadata.jsonl":
            table_mask = _table_mask(masks_spec, root, where)
            return tables.jsonl_records(root.parent, image_columns, text_column, fixed_caption, where, table_mask)
        raise UserError(f"{where} {root}: not a data source (expected {LAYOUTS})")
    return _folder_records(root, image_columns, text_column, fixed_caption, where, masks_spec)


def _table_mask(masks_spec: tuple[bool, str | None], root: Path, where: str) -> str | None:
    """The mask column of a table layout (None without masks); UserError when masks have no column."""
    masks, mask_column = masks_spec
    if masks and mask_column is None:
        raise UserError(
            f"{where} {root}: a table layout keeps each record's mask in a column; set data.mask_column "
            f"(or use a folder of images with a <stem>{MASK_SUFFIX} beside each)"
        )
    return mask_column if masks else None


def _folder_records(root: Path, image_columns, text_column, fixed_caption, where, masks_spec=(False, None)) -> list[Record]:
    """Picks the layout of a folder: save_to_disk, metadata.jsonl, parquet, then plain images."""

    args = (image_columns, text_column, fixed_caption, where)
    for name in LAYOUT_FILES:
        _refuse_special(root / name, where)
    if (root / "dataset_dict.json").is_file():
        return _folder_records(tables.pick_split(root, where), *args, masks_spec)
    if (root / "state.json").is_file() or (root / "dataset_info.json").is_file():
        for shard in tables.arrow_files(root, where):
            _refuse_special(shard, where)
        return tables.arrow_records(root, *args, _table_mask(masks_spec, root, where))
    if (root / "metadata.jsonl").is_file():
        return tables.jsonl_records(root, *args, _table_mask(masks_spec, root, where))
    parquets = sorted(p for p in root.rglob("*.parquet") if _is_file_or_special(p) and not _hidden(p, root))
    for path in parquets:
        _refuse_special(path, where)
    if parquets:
        return tables.parquet_records(parquets, root, *args, _table_mask(masks_spec, root, where))
    masks, mask_column = masks_spec
    if masks and mask_column is not None:
        raise UserError(
            f"{where} {root}: a folder of images takes each mask from <stem>{MASK_SUFFIX} beside its image; "
            "data.mask_column is for metadata.jsonl / parquet / save_to_disk sources, unset it"
        )
    records = _image_folder_records(root, image_columns, fixed_caption, where)
    return [_with_mask_file(record) for record in records] if masks else records


LAYOUT_FILES = ("dataset_dict.json", "state.json", "dataset_info.json", "metadata.jsonl")  # read whole to pick the layout


def _refuse_special(path: Path, where: str) -> None:
    """UserError when ``path`` is a FIFO, device or socket (only stat()ed; a missing path passes)."""
    kind = special_file(path)
    if kind is not None:
        raise UserError(f"{where} {path}: {kind}, not a regular file: reading it could wait forever; remove it or replace it with the file")


def _is_file_or_special(path: Path) -> bool:
    """A regular file or a special one (FIFO, device, socket), following symlinks; not a folder, not missing."""
    return path.is_file() or special_file(path) is not None


def _special_reason(kind: str) -> str:
    return f"{kind}, not a regular file: reading it could wait forever"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def is_mask_file(path: Path) -> bool:
    """``cat.mask.png`` (any case): an inpainting mask, never a training image of its own."""
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_file(image: Path) -> Path:
    """The mask beside an image of a folder layout: ``dogs/rex.jpg`` -> ``dogs/rex.mask.png``."""
    return image.with_name(image.stem + MASK_SUFFIX)


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, extension case-insensitive, hidden entries and
    ``*.mask.png`` masks skipped), sorted. A FIFO, device or socket with an image's name is listed too, so
    check_record reports it instead of it vanishing from the data unsaid; it is never opened."""
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p) and _is_file_or_special(p)]
    return sorted((p for p in found if not _hidden(p, root)), key=lambda p: p.relative_to(root).as_posix())


def _image_folder_records(root: Path, image_columns, fixed_caption, where) -> list[Record]:
    """Captioned folder (``cat.txt`` beside ``cat.png``), or images only with ``fixed_caption``."""
    if len(image_columns) != 1:
        raise UserError(
            f"{where} {root}: a folder of images holds one image per item, but {len(image_columns)} image "
            "columns are set; use a metadata.jsonl or parquet with one column per image"
        )
    images = find_images(root)
    if not images:
        raise UserError(f"{where} {root}: no images found (expected {LAYOUTS})")
    if fixed_caption is None and not any(p.with_suffix(".txt").is_file() for p in images):
        raise UserError(
            f"{where} {root}: images but no captions (expected a .txt beside each image or a "
            "metadata.jsonl); set data.fixed_caption to use one prompt for every image"
        )
    column = image_columns[0]
    return [_captioned(root, path, column, fixed_caption) for path in images]


def _captioned(root: Path, path: Path, column: str, fixed_caption: str | None) -> Record:
    key = path.relative_to(root).as_posix()
    images = {column: ImageRef(name=str(path), path=path)}
    if fixed_caption is not None:
        return Record(key, images, fixed_caption, name=str(path))
    caption = path.with_suffix(".txt")
    kind = special_file(caption)
    if kind is not None:  # never read_text() it: a FIFO blocks the open until something writes to it
        return Record(key, images, None, f"caption file {caption.name} is {_special_reason(kind)}", name=str(path))
    try:
        text = caption.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        return Record(key, images, None, f"no caption file {caption.name} beside it", name=str(path))
    except UnicodeDecodeError:
        return Record(key, images, None, f"caption file {caption.name} is not UTF-8 text", name=str(path))
    except OSError as err:
        return Record(key, images, None, f"cannot read caption file {caption.name} ({err.strerror})", name=str(path))
    return Record(key, images, text, name=str(caption))


def _with_mask_file(record: Record) -> Record:
    """A folder record with its ``<stem>.mask.png`` under MASK (a missing file is the record's problem)."""
    image = next(iter(record.images.values()))
    path = mask_file(image.path)
    images = {**record.images, MASK: ImageRef(name=str(path), path=path)}
    if record.problem is None and not _is_file_or_special(path):  # a special one: check_record names it
        problem = f"no mask file {path.name} beside it (data.mask_kind: dataset)"
        return Record(record.key, images, record.text, problem, name=str(image.path))
    return Record(record.key, images, record.text, record.problem, name=record.name)


def check_record(record: Record) -> None:
    """Raises BadItem for a missing/empty caption or an image that does not fully decode, and for
    a mask (under MASK) whose size differs from its image's or that is empty or full."""
    name = record.name or record.key
    if record.problem is not None:
        raise BadItem(name, record.problem, "fix it or remove the item")
    for ref in record.images.values():
        kind = special_file(ref.path) if ref.path is not None else None
        if kind is not None:  # before decode(): reading a FIFO blocks, a device may never end
            raise BadItem(ref.name, _special_reason(kind), "remove it or replace it with the image")
    if record.text is None or not record.text.strip():
        raise BadItem(name, "empty caption", "write a caption")
    sizes = {}
    for column, ref in record.images.items():
        with decode(ref, verify=True) as image:
            if MASK in record.images:
                sizes[column] = ImageOps.exif_transpose(image).size
                if column == MASK:
                    _check_mask(ref, image)
    if MASK in record.images:
        ref = record.images[MASK]
        for column, size in sizes.items():
            if column != MASK and size != sizes[MASK]:
                (w, h), (iw, ih) = sizes[MASK], size
                raise BadItem(ref.name, f"mask is {w}x{h} px but its image {record.images[column].name} is {iw}x{ih} px",
                              "give the mask its image's size")  # fmt: skip


def _check_mask(ref: ImageRef, image: Image.Image) -> None:
    """An inpainting mask (grayscale, white = repaint) thresholded at 0.5 is neither empty nor full;
    a non-binary one (values other than 0 and 255) is said once on stderr, and thresholded."""
    values = np.asarray(image.convert("L"))
    white = values >= 128  # binarize(mask / 255, 0.5), as the training-time transform does
    if not white.any():
        raise BadItem(ref.name, "mask is empty (all black: nothing to repaint)", "paint the region to repaint white")
    if white.all():
        raise BadItem(ref.name, "mask is full (all white: nothing to keep)", "paint the region to keep black")
    if not np.isin(values, (0, 255)).all():
        note_nonbinary_mask(ref.name)


_noted_nonbinary: list[str] = []  # the first non-binary mask seen by this process


def note_nonbinary_mask(name: str) -> None:
    """One line on stderr, for the first non-binary mask of the process only: a note, not an error."""
    if not _noted_nonbinary:
        _noted_nonbinary.append(name)
        print(f"data.source {name}: mask is not binary (values other than 0 and 255); every mask is thresholded at 0.5 "
              "(>= 0.5 white = repaint); said once", file=sys.stderr)  # fmt: skip


def check_records(
    records: list[Record], skip_bad: bool = False, where: str = "data.source"
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Decodes every image and checks every caption once, before training.

    Returns (good records in their order, skipped as (name, reason)). Without ``skip_bad`` the first
    bad item raises a one-line UserError naming it; an empty list, or nothing left after skipping,
    is always an error.
    """
    if not records:
        raise UserError(f"{where}: no items to train on (expected {LAYOUTS})")
    good, skipped = [], []
    for record in records:
        try:
            check_record(record)
        except BadItem as bad:
            if not skip_bad:
                raise bad.user_error(where) from None
            skipped.append((bad.name, bad.reason))
            continue
        good.append(record)
    if not good:
        name, reason = skipped[0]
        raise UserError(one_line(f"{where}: all {len(records)} items are bad (first: {name}: {reason})"))
    return good, skipped
