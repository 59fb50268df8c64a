"""Table layouts of a data source: metadata.jsonl (imagefolder), parquet, save_to_disk arrow.

Image cells are a path (relative to the table's folder, or absolute), raw encoded bytes, or the
Hugging Face ``Image`` struct ``{"bytes": ..., "path": ...}`` (bytes win when both are set).
Embedded bytes are held in memory. The ``datasets`` library is not needed: arrow files are read
with pyarrow. See rayjobs/data/load.py for the records these build.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayjobs.data.records import MASK, ImageRef, Record, one_line
from rayjobs.errors import UserError

COLUMN_HINT = "set data.image_column / data.conditioning_column / data.text_column to its column names"


def _image_ref(cell, base: Path, name: str) -> tuple[ImageRef, str | None]:
    """One image cell -> (ImageRef, problem or None). ``base`` resolves relative paths."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data:
            return ImageRef(f"{name} ({path})" if path else name, data=bytes(data)), None
        cell = path
    if cell is None or cell == "":
        return ImageRef(name), None  # check_records reports "no image (empty cell)"
    if isinstance(cell, str):
        path = base / cell
        return ImageRef(str(path), path=path), None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return ImageRef(name, data=bytes(cell)), None
    return ImageRef(name), f"image cell holds {type(cell).__name__}, not a path or image bytes"


def _table_record(row: dict, key: str, name: str, base: Path, columns: dict[str, str], text_column, fixed_caption) -> Record:
    """``columns`` maps each image column of the record to the table column holding it."""
    images, problems = {}, []
    for column, source in columns.items():
        images[column], problem = _image_ref(row.get(source), base, f"{name} {source}")
        if problem:
            problems.append(f"{source}: {problem}")
    if fixed_caption is not None:
        text = fixed_caption
    else:
        text = row.get(text_column)
        if text is None:
            problems.append(f"no caption (column '{text_column}' is empty)")
        elif not isinstance(text, str):
            problems.append(f"column '{text_column}' holds {type(text).__name__}, not text")
            text = None
    return Record(key, images, text, "; ".join(problems) or None, name=name)


def _columns(available: set[str], image_columns, text_column, fixed_caption, name: str, where: str, jsonl: bool, mask_column=None) -> dict:
    """Image column -> table column; UserError when the table lacks a needed column.

    metadata.jsonl also accepts ``<column>_file_name`` and, for a single image column, ``file_name``.
    ``mask_column`` (inpainting masks) maps to the key MASK; jsonl also accepts ``<mask_column>_file_name``.
    """
    mapping = {}
    for column in image_columns:
        candidates = [column]
        if jsonl:
            candidates += [f"{column}_file_name"] + (["file_name"] if len(image_columns) == 1 else [])
        found = [c for c in candidates if c in available]
        if not found:
            _missing(" or ".join(repr(c) for c in candidates), available, name, where)
        mapping[column] = found[0]
    if mask_column is not None:
        candidates = [mask_column] + ([f"{mask_column}_file_name"] if jsonl else [])
        found = [c for c in candidates if c in available]
        if not found:
            _missing(" or ".join(repr(c) for c in candidates), available, name, where, "set data.mask_column to the mask's column")
        mapping[MASK] = found[0]
    if fixed_caption is None and text_column not in available:
        _missing(repr(text_column), available, name, where)
    return mapping


def _wanted(columns: dict[str, str], text_column: str, fixed_caption) -> list[str]:
    """The table columns to read: the image columns, plus the caption unless it is fixed."""
    return sorted(set(columns.values()) | ({text_column} if fixed_caption is None else set()))


def _missing(what: str, available: set[str], name: str, where: str, hint: str = COLUMN_HINT):
    have = ", ".join(sorted(available)) or "none"
    raise UserError(one_line(f"{where} {name}: no column {what} (columns: {have}); {hint}"))


def jsonl_records(root: Path, image_columns, text_column, fixed_caption, where, mask_column=None) -> list[Record]:
    """imagefolder: ``root/metadata.jsonl``, one JSON object per line; keys ``metadata.jsonl#LINE``."""
    path = root / "metadata.jsonl"
    rows = read_jsonl(path, where)
    if not rows:
        raise UserError(f"{where} {path}: no rows (expected one JSON object per line)")
    available = set().union(*(row.keys() for _, row in rows))
    columns = _columns(available, image_columns, text_column, fixed_caption, str(path), where, jsonl=True, mask_column=mask_column)
    return [
        _table_record(row, f"metadata.jsonl#{line}", f"{path} line {line}", root, columns, text_column, fixed_caption)
        for line, row in rows
    ]


def read_jsonl(path: Path, where: str) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; UserError naming a bad line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(one_line(f"{where} {path}: cannot read ({getattr(err, 'strerror', None) or err})")) from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} {path}: line {number}: not valid JSON ({err.msg}); fix the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where} {path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def parquet_records(files: list[Path], root: Path, image_columns, text_column, fixed_caption, where, mask_column=None) -> list[Record]:
    """Rows of every parquet file in order; keys ``<file relative to root>#ROW`` (0-based per file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for file in files:
        try:
            available = set(pq.read_schema(file).names)
            columns = _columns(available, image_columns, text_column, fixed_caption, str(file), where, jsonl=False, mask_column=mask_column)
            rows = pq.read_table(file, columns=_wanted(columns, text_column, fixed_caption)).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise UserError(one_line(f"{where} {file}: cannot read parquet ({err})")) from None
        records += _rows_records(rows, file, root, columns, text_column, fixed_caption)
    return records


def _rows_records(rows: list[dict], file: Path, root: Path, columns, text_column, fixed_caption) -> list[Record]:
    prefix = file.relative_to(root).as_posix()
    return [
        _table_record(row, f"{prefix}#{i}", f"{file} row {i}", file.parent, columns, text_column, fixed_caption)
        for i, row in enumerate(rows)
    ]


def arrow_files(root: Path, where: str) -> list[Path]:
    """The arrow shards of a save_to_disk folder: state.json's ``_data_files`` order, else sorted."""
    state = root / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(one_line(f"{where} {state}: not a save_to_disk state.json ({err})")) from None
        files = [root / name for name in names]
    else:
        files = sorted(root.glob("*.arrow"))
    if not files:
        raise UserError(f"{where} {root}: save_to_disk folder without .arrow files")
    return files


def _arrow_table(source):
    """The whole table of an open arrow file (IPC stream as ``datasets`` writes; IPC file also read)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def arrow_records(root: Path, image_columns, text_column, fixed_caption, where, mask_column=None) -> list[Record]:
    """A ``Dataset.save_to_disk`` folder; keys ``<shard>.arrow#ROW`` (0-based per shard)."""
    import pyarrow as pa

    records = []
    for file in arrow_files(root, where):
        try:
            with pa.memory_map(str(file)) as source:  # rows are copied out before the map closes
                table = _arrow_table(source)
                available = set(table.column_names)
                columns = _columns(available, image_columns, text_column, fixed_caption, str(file), where, jsonl=False, mask_column=mask_column)
                rows = table.select(_wanted(columns, text_column, fixed_caption)).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise UserError(one_line(f"{where} {file}: cannot read arrow file ({err})")) from None
        records += _rows_records(rows, file, root, columns, text_column, fixed_caption)
    return records


def pick_split(root: Path, where: str) -> Path:
    """A ``DatasetDict.save_to_disk`` folder: its ``train`` split, else an error listing the splits."""
    try:
        splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(one_line(f"{where} {root}/dataset_dict.json: cannot read ({err})")) from None
    if "train" in splits and (root / "train").is_dir():
        return root / "train"
    names = ", ".join(map(str, splits)) or "none"
    raise UserError(f"{where} {root}: a DatasetDict with splits {names} and no train split; point {where} at one split folder")
