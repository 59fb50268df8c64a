"""Data layer of the supervised methods: layouts, checks, transforms, dataset, prompts, latent cache.

Every image is made here with PIL (tiny, e.g. 20x12 px); nothing is downloaded.
"""

import io
import json
import logging
import os
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from rayjobs.data.images import ImageTextDataset, ImageTransform
from rayjobs.data.latent_cache import LatentCache, cacheable
from rayjobs.data.load import check_records, load_records
from rayjobs.data.prompts import load_prompts_source
from rayjobs.errors import UserError


def png_bytes(width=20, height=12, seed=0, fmt="PNG") -> bytes:
    """A noisy RGB image (noise so that a cut file is really truncated mid-data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def snapshot(root):
    """{relative path: (bytes, mtime_ns)} of every file under root."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- layouts ------------------------------------------------------------------------------------


def test_captioned_folder_recursive_sorted_and_case_insensitive(tmp_path):
    write(tmp_path / "b" / "dog.JPG", png_bytes(fmt="JPEG"))
    write(tmp_path / "b" / "dog.txt", "a dog\n")
    write(tmp_path / "a.png", png_bytes())
    write(tmp_path / "a.txt", "  a cat  ")
    write(tmp_path / "c.webp", png_bytes(fmt="WEBP"))
    write(tmp_path / "c.txt", "a bird")
    write(tmp_path / "notes.md", "not an image")
    write(tmp_path / ".cache" / "x.png", png_bytes())  # hidden: ignored
    records = load_records(tmp_path, ["image"], "text")
    assert [r.key for r in records] == ["a.png", "b/dog.JPG", "c.webp"]
    assert [r.text for r in records] == ["a cat", "a dog", "a bird"]
    assert records[1].images["image"].path == tmp_path / "b" / "dog.JPG"
    good, skipped = check_records(records)
    assert len(good) == 3 and skipped == []


def test_fixed_caption_folder_needs_no_captions(tmp_path):
    for name in ["2.bmp", "1.jpeg"]:
        write(tmp_path / name, png_bytes(fmt="BMP" if name.endswith("bmp") else "JPEG"))
    records = load_records(tmp_path, ["image"], "text", fixed_caption="a photo of sks dog")
    assert [(r.key, r.text) for r in records] == [("1.jpeg", "a photo of sks dog"), ("2.bmp", "a photo of sks dog")]
    with pytest.raises(UserError, match="images but no captions.*data.fixed_caption") as err:
        load_records(tmp_path, ["image"], "text")
    assert str(tmp_path) in one_line_error(err)


def test_imagefolder_metadata_jsonl(tmp_path):
    write(tmp_path / "imgs" / "x.png", png_bytes())
    write(tmp_path / "y.png", png_bytes(seed=1))
    rows = [{"file_name": "imgs/x.png", "text": "first"}, {"file_name": "y.png", "text": "second"}]
    write(tmp_path / "metadata.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = load_records(tmp_path, ["image"], "text")
    assert [(r.key, r.text) for r in records] == [("metadata.jsonl#1", "first"), ("metadata.jsonl#2", "second")]
    assert records[0].images["image"].path == tmp_path / "imgs" / "x.png"
    with pytest.raises(UserError, match="no column 'caption' \\(columns: file_name, text\\)") as err:
        load_records(tmp_path, ["image"], "caption")
    assert "metadata.jsonl" in one_line_error(err)


def test_instructpix2pix_triples_from_metadata(tmp_path):
    write(tmp_path / "in.png", png_bytes(seed=1))
    write(tmp_path / "out.png", png_bytes(seed=2))
    row = {"input_image": "in.png", "edit_prompt": "make it snow", "edited_image": "out.png"}
    write(tmp_path / "metadata.jsonl", json.dumps(row) + "\n")
    (record,) = load_records(tmp_path, ["input_image", "edited_image"], "edit_prompt")
    assert record.text == "make it snow"
    assert record.images["input_image"].path == tmp_path / "in.png"
    assert record.images["edited_image"].path == tmp_path / "out.png"
    ds = ImageTextDataset(check_records([record])[0], ImageTransform(8, center_crop=False, random_flip=True))
    batch = ds.batch([0, 0, 0], random.Random(0))
    assert batch["pixels"]["input_image"].shape == batch["pixels"]["edited_image"].shape == (3, 3, 8, 8)
    assert batch["texts"] == ["make it snow"] * 3 and batch["keys"] == ["metadata.jsonl#1"] * 3


def test_parquet_path_bytes_and_struct_cells(tmp_path):
    write(tmp_path / "data" / "img" / "p.png", png_bytes(seed=3))
    cells = ["img/p.png", png_bytes(seed=4), {"bytes": png_bytes(seed=5), "path": "orig.png"}]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    first = pa.table({"image": pa.array([cells[0]]), "text": ["by path"]})
    second = pa.table({"image": pa.array([cells[1]]), "text": ["by bytes"]})
    third = pa.table({"image": pa.array([cells[2]], type=struct), "text": ["by struct"]})
    pq.write_table(first, tmp_path / "data" / "a.parquet")
    pq.write_table(second, tmp_path / "data" / "b.parquet")
    pq.write_table(third, tmp_path / "data" / "c.parquet")
    records = load_records(tmp_path, ["image"], "text")
    assert [(r.key, r.text) for r in records] == [
        ("data/a.parquet#0", "by path"), ("data/b.parquet#0", "by bytes"), ("data/c.parquet#0", "by struct")]
    assert records[0].images["image"].path == tmp_path / "data" / "img" / "p.png"
    assert records[1].images["image"].data == cells[1]
    assert records[2].images["image"].data == cells[2]["bytes"]
    assert len(check_records(records)[0]) == 3
    single = load_records(tmp_path / "data" / "b.parquet", ["image"], "text")
    assert [r.key for r in single] == ["b.parquet#0"]


def save_to_disk_folder(root, rows):
    """What datasets' Dataset.save_to_disk writes: an arrow IPC stream, dataset_info.json, state.json."""
    root.mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([r[0] for r in rows], type=image), "text": [r[1] for r in rows]})
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    write(root / "dataset_info.json", json.dumps({"citation": "", "description": "", "features": features}))
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "f", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    write(root / "state.json", json.dumps(state))


def test_save_to_disk_arrow_folder(tmp_path):
    write(tmp_path / "ds" / "rel.png", png_bytes(seed=7))
    rows = [({"bytes": png_bytes(seed=6), "path": "/gone/a.png"}, "embedded"), ({"bytes": None, "path": "rel.png"}, "by path")]
    save_to_disk_folder(tmp_path / "ds", rows)
    records = load_records(tmp_path / "ds", ["image"], "text")
    assert [(r.key, r.text) for r in records] == [
        ("data-00000-of-00001.arrow#0", "embedded"), ("data-00000-of-00001.arrow#1", "by path")]
    assert records[0].images["image"].data == rows[0][0]["bytes"]
    assert records[1].images["image"].path == tmp_path / "ds" / "rel.png"
    assert len(check_records(records)[0]) == 2
    # A DatasetDict folder reads its train split.
    write(tmp_path / "dd" / "dataset_dict.json", json.dumps({"splits": ["train"]}))
    save_to_disk_folder(tmp_path / "dd" / "train", rows[:1])
    assert [r.text for r in load_records(tmp_path / "dd", ["image"], "text")] == ["embedded"]


def test_unknown_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nope", ["image"], "text")
    write(tmp_path / "x.csv", "a,b")
    with pytest.raises(UserError, match="not a data source"):
        load_records(tmp_path / "x.csv", ["image"], "text")
    write(tmp_path / "two" / "a.png", png_bytes())
    with pytest.raises(UserError, match="one image per item"):
        load_records(tmp_path / "two", ["a", "b"], "text", fixed_caption="x")


# --- bad data -----------------------------------------------------------------------------------


@pytest.fixture
def bad_folder(tmp_path):
    """Five items: one good, a truncated PNG, a text file named .png, a missing and an empty caption."""
    root = tmp_path / "src"
    write(root / "a_good.png", png_bytes())
    write(root / "a_good.txt", "fine")
    write(root / "b_truncated.png", png_bytes(40, 40)[:300])
    write(root / "b_truncated.txt", "cut")
    write(root / "c_not_image.png", b"hello, I am text")
    write(root / "c_not_image.txt", "liar")
    write(root / "d_no_caption.png", png_bytes())
    write(root / "e_empty_caption.png", png_bytes())
    write(root / "e_empty_caption.txt", "  \n")
    return root


@pytest.mark.parametrize("name,reason", [
    ("b_truncated.png", "cannot decode image"),
    ("c_not_image.png", "cannot decode image"),
    ("d_no_caption.png", "no caption file d_no_caption.txt"),
    ("e_empty_caption.txt", "empty caption"),
])
def test_each_bad_item_is_a_one_line_error_naming_it(bad_folder, name, reason):
    before = snapshot(bad_folder)
    records = [r for r in load_records(bad_folder, ["image"], "text") if r.key.startswith(("a_", name[:2]))]
    with pytest.raises(UserError) as err:
        check_records(records, skip_bad=False)
    message = one_line_error(err)
    assert message.startswith(f"data.source {bad_folder / name}: {reason}")
    assert message.endswith("or set data.skip_bad: true")
    assert snapshot(bad_folder) == before


def test_skip_bad_keeps_the_good_and_lists_the_rest(bad_folder):
    before = snapshot(bad_folder)
    good, skipped = check_records(load_records(bad_folder, ["image"], "text"), skip_bad=True)
    assert [r.key for r in good] == ["a_good.png"]
    assert [os.path.basename(name) for name, _ in skipped] == [
        "b_truncated.png", "c_not_image.png", "d_no_caption.png", "e_empty_caption.txt"]
    assert snapshot(bad_folder) == before


def test_truncated_is_bad_even_if_pil_is_told_to_load_truncated(bad_folder, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    records = [r for r in load_records(bad_folder, ["image"], "text") if r.key == "b_truncated.png"]
    with pytest.raises(UserError, match="cannot decode"):
        check_records(records)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_empty_folder_and_all_bad(tmp_path, bad_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found \\(expected .*metadata.jsonl") as err:
        load_records(tmp_path / "empty", ["image"], "text")
    assert str(tmp_path / "empty") in one_line_error(err)
    bad = [r for r in load_records(bad_folder, ["image"], "text") if not r.key.startswith("a_")]
    with pytest.raises(UserError, match="all 4 items are bad"):
        check_records(bad, skip_bad=True)
    with pytest.raises(UserError, match="no items"):
        check_records([], skip_bad=True)


def test_image_broken_after_the_check(tmp_path):
    for name in ["a", "b"]:
        write(tmp_path / f"{name}.png", png_bytes())
    records, _ = check_records(load_records(tmp_path, ["image"], "text", fixed_caption="x"))
    write(tmp_path / "a.png", b"broken")
    with pytest.raises(UserError, match=f"{tmp_path / 'a.png'}: cannot decode"):
        ImageTextDataset(records, ImageTransform(8)).batch([0, 1], random.Random(0))
    ds = ImageTextDataset(records, ImageTransform(8), skip_bad=True)
    batch = ds.batch([0, 1], random.Random(0))
    assert batch["keys"] == ["b.png", "b.png"] and batch["pixels"]["image"].shape == (2, 3, 8, 8)
    assert ds.skipped == 1


# --- transforms ---------------------------------------------------------------------------------


def test_transform_shape_range_dtype():
    image = Image.open(io.BytesIO(png_bytes(20, 12)))
    (pixels,) = ImageTransform(8, center_crop=False, random_flip=True)([image], random.Random(0))
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < 0 < pixels.max()
    (gray,) = ImageTransform(6)([Image.new("L", (12, 20), 255)], random.Random(0))
    assert gray.shape == (3, 6, 6) and torch.all(gray == 1)


def column_image(width, height):
    """Red channel = 8 * column index: every column tells where it came from."""
    red = np.tile((np.arange(width) * 8).astype(np.uint8), (height, 1))
    return Image.fromarray(np.stack([red, np.zeros_like(red), np.full_like(red, 255)], axis=-1))


def test_center_crop_takes_the_middle():
    (pixels,) = ImageTransform(10, center_crop=True)([column_image(30, 10)], random.Random(0))
    expected = torch.tensor([8.0 * c for c in range(10, 20)]) / 127.5 - 1  # columns 10..19 of 30
    assert torch.allclose(pixels[0, 0], expected) and torch.allclose(pixels[0, 9], expected)
    assert torch.all(pixels[1] == -1) and torch.all(pixels[2] == 1)


def test_same_crop_and_flip_on_every_image_of_a_record():
    image = column_image(30, 10)
    inverted = Image.fromarray(255 - np.asarray(image))
    transform = ImageTransform(10, center_crop=False, random_flip=True)
    starts = set()
    for seed in range(40):
        a, b, c = transform([image, image.copy(), inverted], random.Random(seed))
        assert torch.equal(a, b)
        assert torch.allclose(c, -a, atol=1e-6)  # the inverted twin stays aligned
        starts.add(round(float(a[0, 0, 0]), 4))
    assert len(starts) > 5  # crops (and flips) really vary


def test_flip_frequency_and_determinism():
    image = column_image(2, 2)
    transform = ImageTransform(2, center_crop=True, random_flip=True)
    rng = random.Random(0)
    flips = sum(bool(transform([image], rng)[0][0, 0, 0] > -1) for _ in range(2000))  # flipped: column 1 first
    assert 0.45 < flips / 2000 < 0.55
    random_crop = ImageTransform(6, center_crop=False, random_flip=True)
    source = Image.open(io.BytesIO(png_bytes(20, 12)))
    assert torch.equal(random_crop([source], random.Random(3))[0], random_crop([source], random.Random(3))[0])


# --- prompt sources -----------------------------------------------------------------------------


def test_prompts_from_text_and_jsonl(tmp_path):
    assert load_prompts_source(write(tmp_path / "p.txt", "a cat\n\n  a dog  \n")) == ["a cat", "a dog"]
    lines = [json.dumps({"prompt": "one"}), "", json.dumps({"prompt": "two", "txt": "x"})]
    assert load_prompts_source(write(tmp_path / "p.jsonl", "\n".join(lines))) == ["one", "two"]
    assert load_prompts_source(write(tmp_path / "q.jsonl", json.dumps({"text": "t"})), key="text") == ["t"]
    write(tmp_path / "bad.jsonl", json.dumps({"prompt": "ok"}) + "\n{nope\n")
    with pytest.raises(UserError, match="bad.jsonl: line 2: not valid JSON") as err:
        load_prompts_source(tmp_path / "bad.jsonl")
    one_line_error(err)
    with pytest.raises(UserError, match="line 1: no key 'prompt' \\(keys: text\\)"):
        load_prompts_source(tmp_path / "q.jsonl")
    with pytest.raises(UserError, match="not found"):
        load_prompts_source(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts_source(write(tmp_path / "empty.txt", "\n \n"))


def tar_with(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_prompts_from_webdataset_tar(tmp_path):
    members = [("000.txt", b"a red car"), ("000.jpg", b"\xff"), ("001.json", json.dumps({"txt": "a blue sky"}).encode()),
               ("sub/002.txt", b"a green tree\n"), ("003.jpg", b"\xff")]
    (tmp_path / "shards").mkdir()
    shard = tar_with(tmp_path / "shards" / "a.tar", members)
    assert load_prompts_source(shard) == ["a red car", "a blue sky", "a green tree"]
    tar_with(tmp_path / "shards" / "b.tar", [("9.txt", b"last")])
    assert load_prompts_source(tmp_path / "shards")[-1] == "last"
    tar_with(tmp_path / "bad.tar", [("0.json", b"{")])
    with pytest.raises(UserError, match="bad.tar: member 0.json: not valid JSON"):
        load_prompts_source(tmp_path / "bad.tar")


# --- latent cache -------------------------------------------------------------------------------


def test_latent_cache_computes_once_per_key(tmp_path):
    cache = LatentCache(tmp_path / "cache")
    calls = []

    def compute(value):
        return lambda: calls.append(value) or torch.full((4, 2, 2), float(value))

    transform = ImageTransform(8)
    key = cache.image_key(b"image bytes", transform, "toy-vae@abc/fp32")
    first = cache.get_or_compute(key, compute(1))
    again = cache.get_or_compute(key, compute(2))
    assert calls == [1] and torch.equal(first, again) and (cache.hits, cache.misses) == (1, 1)
    other = cache.image_key(b"image bytes", transform, "toy-vae@def/fp32")
    assert torch.all(cache.get_or_compute(other, compute(3)) == 3) and calls == [1, 3]
    assert (tmp_path / "cache" / key[:2] / f"{key}.safetensors").is_file()
    assert sorted(p.suffix for p in (tmp_path / "cache").rglob("*") if p.is_file()) == [".safetensors"] * 2
    assert len({key, other, cache.image_key(b"image bytez", transform, "toy-vae@abc/fp32"),
                cache.image_key(b"image bytes", ImageTransform(16), "toy-vae@abc/fp32")}) == 4
    assert LatentCache.key("ab", "c") != LatentCache.key("a", "bc") != LatentCache.key(b"ab", "c")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-tensor-name"])
def test_a_corrupt_cache_entry_is_logged_counted_and_recomputed(tmp_path, caplog, damage):
    """One damage per case (each alone must be caught): not safetensors, cut short, or a file without the tensor."""
    from safetensors.torch import save_file

    cache = LatentCache(tmp_path)
    key = LatentCache.key("k")
    cache.get_or_compute(key, lambda: torch.ones(4, 2, 2))
    path = cache.path(key)
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    else:
        save_file({"other": torch.ones(1)}, str(path))
    with caplog.at_level(logging.WARNING, logger="rayjobs.data.latent_cache"):
        again = cache.get_or_compute(key, lambda: torch.full((4, 2, 2), 2.0))
    assert torch.equal(again, torch.full((4, 2, 2), 2.0))  # recomputed, not the damaged value
    assert (cache.hits, cache.misses, cache.corrupt) == (0, 2, 1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rayjobs.data.latent_cache"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "unreadable" in warnings[0], warnings
    assert torch.equal(LatentCache(tmp_path).load(key), again)  # rewritten whole: a later run hits it


def test_a_missing_entry_is_a_plain_miss(tmp_path, caplog):
    cache = LatentCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rayjobs.data.latent_cache"):
        assert cache.load(LatentCache.key("absent")) is None
    assert (cache.misses, cache.corrupt) == (1, 0) and caplog.records == []


def test_latent_cache_needs_deterministic_transform_and_writes_atomically(tmp_path, monkeypatch):
    assert cacheable(ImageTransform(8)) and not cacheable(ImageTransform(8, random_flip=True))
    assert not cacheable(ImageTransform(8, center_crop=False))
    with pytest.raises(ValueError, match="deterministic"):
        LatentCache.image_key(b"x", ImageTransform(8, center_crop=False), "m")
    cache = LatentCache(tmp_path)
    key = LatentCache.key("k")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute(key, lambda: torch.zeros(2))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial file, no temp file left
