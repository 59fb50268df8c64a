"""Inpainting masks (docs/inpainting.md), data side: random masks, dataset masks (files and columns, aligned
with their images), config checks, and the batch keys of data.inpaint. Nothing is downloaded."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from shortrun import SHORT
from toydata import write_toy_images

import rayjobs.data.load as data_module
from models.masks import binarize, random_masks, random_rectangles, random_strokes
from rayjobs.config import load_config
from rayjobs.data.batches import check_data
from rayjobs.data.images import ImageTextDataset, ImageTransform
from rayjobs.data.load import check_records, find_images, load_records
from rayjobs.data.records import MASK
from rayjobs.errors import UserError
from rayjobs.training.loop import LocalContext, Worker

FAST = [*SHORT, "train.batch_size=2", "train.eval_every=0"]
KINDS = ["rectangles", "strokes", "mixed"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coverage(masks: torch.Tensor) -> torch.Tensor:
    return masks.float().mean(dim=(1, 2, 3))  # [B]


def assert_partial_binary(masks: torch.Tensor, shape) -> None:
    assert masks.shape == shape and masks.dtype == torch.float32
    assert ((masks == 0) | (masks == 1)).all()
    cover = coverage(masks)
    assert (cover > 0).all() and (cover < 1).all()


# ---- random masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_random_masks_are_binary_partial_and_seeded(kind):
    masks = random_masks(kind, 32, 24, 40, gen(0))
    assert_partial_binary(masks, (32, 1, 24, 40))
    assert torch.equal(masks, random_masks(kind, 32, 24, 40, gen(0)))
    assert not torch.equal(masks, random_masks(kind, 32, 24, 40, gen(1)))
    assert len({m.numpy().tobytes() for m in masks}) == 32  # samples of one batch differ


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(2, 2), (3, 5), (8, 8)])
def test_tiny_masks_are_never_empty_nor_full(kind, size):
    assert_partial_binary(random_masks(kind, 200, *size, gen(3)), (200, 1, *size))


def test_one_rectangle_is_a_filled_box():
    for mask in random_rectangles(50, 32, 32, gen(0), count=(1, 1))[:, 0]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and mask.sum() == box.numel()
        assert 0.1 * 32 - 1 <= box.shape[0] <= 0.75 * 32 + 1 and 0.1 * 32 - 1 <= box.shape[1] <= 0.75 * 32 + 1


def test_strokes_look_like_strokes():
    masks = random_strokes(64, 64, 64, gen(0))
    cover = coverage(masks)
    assert 0.02 < cover.mean() < 0.3 and cover.max() < 0.6
    # thin: a stroke pixel mostly has unmasked pixels within a brush width (0.1 * 64 px) of it,
    # unlike a box's; compare each mask with its bounding box
    for mask in masks[:, 0]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mask.sum() < box  # never a filled rectangle
    assert coverage(masks).mean() < coverage(random_rectangles(64, 64, 64, gen(0))).mean()


def test_mixed_picks_per_sample():
    g = gen(5)
    pick = torch.rand((40,), generator=g) < 0.5
    rects, strokes = random_rectangles(40, 16, 16, g), random_strokes(40, 16, 16, g)
    mixed = random_masks("mixed", 40, 16, 16, gen(5))
    assert 0 < pick.sum() < 40
    assert torch.equal(mixed[pick], strokes[pick]) and torch.equal(mixed[~pick], rects[~pick])


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask kind"):
        random_masks("circles", 1, 8, 8, gen(0))
    with pytest.raises(ValueError, match="height, width >= 2"):
        random_masks("strokes", 1, 1, 8, gen(0))


def test_binarize():
    mask, was_binary = binarize(torch.tensor([[0.0, 0.49], [0.5, 1.0]]))
    assert torch.equal(mask, torch.tensor([[0.0, 0.0], [1.0, 1.0]])) and not was_binary
    mask, was_binary = binarize(torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(mask, torch.tensor([0.0, 1.0, 1.0])) and was_binary
    mask, _ = binarize(torch.tensor([0.2, 0.8]), threshold=0.9)
    assert torch.equal(mask, torch.zeros(2))
    assert binarize(torch.tensor([0, 255]) / 255)[1]


# ---- dataset masks ----------------------------------------------------------------------------


def left_half(width=40, height=32, rgb=True) -> Image.Image:
    """White left half, black right half (an image, or the mask of its left half)."""
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, : width // 2] = 255
    return Image.fromarray(np.stack([array] * 3, axis=-1) if rgb else array)


def mask_folder(root, n=3, size=(40, 32)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        left_half(*size).save(root / f"{i:03d}.png")
        left_half(*size, rgb=False).save(root / f"{i:03d}.mask.png")
        (root / f"{i:03d}.txt").write_text(f"item {i}")
    return root


def test_mask_files_are_not_training_images(tmp_path):
    root = mask_folder(tmp_path / "d")
    (root / "UPPER.MASK.PNG").write_bytes((root / "000.mask.png").read_bytes())
    assert [p.name for p in find_images(root)] == ["000.png", "001.png", "002.png"]
    records = load_records(root)
    assert [r.key for r in records] == ["000.png", "001.png", "002.png"] and all(MASK not in r.images for r in records)
    records = load_records(root, masks=True)
    assert [r.images[MASK].path.name for r in records] == ["000.mask.png", "001.mask.png", "002.mask.png"]


def test_folder_masks_stay_aligned_through_crop_and_flip(tmp_path):
    root = mask_folder(tmp_path / "d")
    good, _ = check_records(load_records(root, masks=True))
    dataset = ImageTextDataset(good, ImageTransform(16, center_crop=False, random_flip=True), masks=True)
    flips = set()
    for seed in range(20):
        item = dataset.get(seed % 3, random.Random(seed))
        pixels, mask = item["pixels"]["image"], item["mask"]  # [3, 16, 16], [1, 16, 16]
        assert mask.shape == (1, 16, 16) and ((mask == 0) | (mask == 1)).all()
        assert torch.equal(mask[0], (pixels[0] >= 0).float())  # the white image region is the mask
        flips.add(bool(mask[0, :, 0].all()))  # left column white: not flipped
    assert flips == {True, False}
    batch = dataset.batch([0, 1, 2], random.Random(0))
    assert batch["masks"].shape == (3, 1, 16, 16) and batch["pixels"]["image"].shape == (3, 3, 16, 16)


def test_bad_dataset_masks_name_the_file(tmp_path):
    root = mask_folder(tmp_path / "d", n=1)
    (root / "000.mask.png").unlink()
    with pytest.raises(UserError, match=r"000\.png: no mask file 000\.mask\.png beside it"):
        check_records(load_records(root, masks=True))
    left_half(20, 32, rgb=False).save(root / "000.mask.png")
    with pytest.raises(UserError, match=r"000\.mask\.png: mask is 20x32 px but its image .*000\.png is 40x32 px"):
        check_records(load_records(root, masks=True))
    Image.new("L", (40, 32), 0).save(root / "000.mask.png")
    with pytest.raises(UserError, match=r"000\.mask\.png: mask is empty"):
        check_records(load_records(root, masks=True))
    Image.new("L", (40, 32), 200).save(root / "000.mask.png")
    with pytest.raises(UserError, match=r"000\.mask\.png: mask is full"):
        check_records(load_records(root, masks=True))
    good, skipped = check_records(load_records(root, masks=True) + load_records(mask_folder(tmp_path / "ok", n=1), masks=True), skip_bad=True)
    assert len(good) == 1 and skipped[0][1].startswith("mask is full")


def test_non_binary_mask_is_thresholded_and_said_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_module, "_noted_nonbinary", [])
    root = mask_folder(tmp_path / "d", n=2)
    for i in range(2):
        array = np.asarray(left_half(rgb=False)).copy()
        array[:, 20:] = 60  # grey, below the threshold
        Image.fromarray(array).save(root / f"{i:03d}.mask.png")
    good, _ = check_records(load_records(root, masks=True))
    check_records(load_records(root, masks=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "000.mask.png: mask is not binary" in err[0]
    item = ImageTextDataset(good, ImageTransform(16), masks=True).get(0, random.Random(0))
    assert torch.equal(item["mask"][0], (item["pixels"]["image"][0] >= 0).float())


def test_table_masks_come_from_mask_column(tmp_path):
    root = tmp_path / "t"
    mask_folder(root / "img", n=2)
    rows = [{"file_name": f"img/{i:03d}.png", "mask": f"img/{i:03d}.mask.png", "text": "x"} for i in range(2)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(root, masks=True, mask_column="mask")
    assert [r.images[MASK].path.name for r in records] == ["000.mask.png", "001.mask.png"]
    check_records(records)
    with pytest.raises(UserError, match="set data.mask_column"):
        load_records(root, masks=True)
    with pytest.raises(UserError, match=r"no column 'seg' or 'seg_file_name'.*data.mask_column"):
        load_records(root, masks=True, mask_column="seg")
    with pytest.raises(UserError, match="data.mask_column is for metadata.jsonl"):
        load_records(root / "img", masks=True, mask_column="mask")


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.mask_kind=dataset"], "mask_kind: dataset .* set inpaint: true"),
        (["data.inpaint=true", "data.source=x", "data.mask_column=m"], "mask_column is set but mask_kind is 'mixed'"),
        (["data.inpaint=true"], "inpaint: masks belong to the images of data.source"),
        (["data.inpaint=true", "data.source=x", "data.cache_latents=true"], "inpaint: .*set cache_latents: false"),
        (["data.inpaint=true", "data.source=x", "data.mask_kind=ovals"], "data.mask_kind"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_config_accepts_mask_settings():
    cfg = load_config(None, ["data.inpaint=true", "data.source=x", "data.mask_kind=dataset", "data.mask_column=mask"])
    assert cfg.data.inpaint and cfg.data.mask_kind == "dataset" and cfg.data.mask_column == "mask"
    assert load_config(None, []).data.inpaint is False


# ---- batches ----------------------------------------------------------------------------------


def _worker(tmp_path, source, *extra) -> Worker:
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", f"data.source={source}", "data.inpaint=true", *extra])
    return Worker(cfg, LocalContext(tmp_path))


def test_denoise_batch_has_mask_and_masked_latents(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 4)
    worker = _worker(tmp_path, data, "objective.preset=finetune")  # the toy 4-channel UNet: keys still there
    batch = worker.batch(0, 0)
    assert set(batch) == {"generator", "latents", "captions", "mask", "masked_latents"}
    assert batch["latents"].shape == batch["masked_latents"].shape == (2, 4, 8, 8)
    assert_partial_binary(batch["mask"], (2, 1, 32, 32))
    assert not torch.equal(batch["latents"], batch["masked_latents"])
    again = worker.batch(0, 0)
    assert torch.equal(batch["mask"], again["mask"]) and torch.equal(batch["masked_latents"], again["masked_latents"])
    assert not torch.equal(batch["mask"], worker.batch(1, 0)["mask"])
    plain = Worker(load_config(None, FAST + [f"run.output_dir={tmp_path}", f"data.source={data}", "objective.preset=finetune"]), LocalContext(tmp_path))
    reference = plain.batch(0, 0)  # inpainting adds keys, the other draws stay as they were
    assert torch.equal(reference["latents"], batch["latents"]) and reference["captions"] == batch["captions"]


def test_dataset_masks_reach_the_batch(tmp_path):
    data = mask_folder(tmp_path / "data", n=3, size=(32, 32))
    worker = _worker(tmp_path, data, "objective.preset=finetune", "data.mask_kind=dataset", "data.random_flip=true")
    for step in range(4):
        batch = worker.batch(step, 0)
        flipped = batch["mask"][:, 0, :, 0] == 0  # [B, H]: the right half white
        assert batch["mask"].shape == (2, 1, 32, 32) and (flipped.all(1) | (~flipped).all(1)).all()
        assert batch["mask"][:, 0].sum(dim=(1, 2)).tolist() == [512.0, 512.0]


def test_reward_batch_has_images_to_repaint(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 3)
    worker = _worker(tmp_path, data, "data.mask_kind=strokes")  # the default (reward) preset
    batch = worker.batch(0, 0)
    assert set(batch) == {"generator", "prompts", "inpaint_pixels", "inpaint_mask"}
    assert batch["inpaint_pixels"].shape == (2, 3, 32, 32) and batch["inpaint_pixels"].abs().max() <= 1
    assert_partial_binary(batch["inpaint_mask"], (2, 1, 32, 32))
    plain = Worker(load_config(None, FAST + [f"run.output_dir={tmp_path}"]), LocalContext(tmp_path))
    assert plain.batch(0, 0)["prompts"] == batch["prompts"]


def test_preflight_names_a_mismatched_mask(tmp_path):
    data = mask_folder(tmp_path / "data", n=2, size=(32, 32))
    left_half(16, 32, rgb=False).save(data / "001.mask.png")
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", f"data.source={data}", "data.inpaint=true", "data.mask_kind=dataset"])
    with pytest.raises(UserError, match=r"data.source .*001\.mask\.png: mask is 16x32 px"):
        check_data(cfg)  # the reward preset reads data.source too when inpainting
