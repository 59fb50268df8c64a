"""`draftray sample` with what the supervised presets export: LoRA scale, textual-inversion embeddings,
schedulers, and InstructPix2Pix editing of a full fine-tune exported as a pipeline directory."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shortrun import SHORT
from toydata import write_toy_images

from rayjobs.cli import main
from rayjobs.config import load_config
from rayjobs.training.loop import LocalContext, train_loop

FAST = [*SHORT, "train.batch_size=2", "train.eval_every=0"]
SAMPLE = ["sample", "--prompt", "a <shp> circle", "--steps", "3", "--seed", "1"]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(next(path.glob("*.png"))), dtype=np.int16)


@pytest.fixture(scope="module")
def ti_lora_run(tmp_path_factory):
    """2 steps of pivotal tuning (token rows + UNet LoRA together) on toy images; its export/."""
    root = tmp_path_factory.mktemp("pti")
    data = root / "data"
    write_toy_images(data, 2, captions=False)
    cfg = load_config(None, FAST + [f"run.output_dir={root}", "objective.preset=pivotal", f"data.source={data}",
                                    "data.fixed_caption=a <shp> circle", "train.steps=2", "optim.lr=5e-2",
                                    "trainable.tokens=[{token: <shp>, num_vectors: 2, init_token: circle}]"])  # fmt: skip
    train_loop(cfg, root / "run", LocalContext(root / "run"))
    return root / "run" / "export"


def test_pivotal_export_holds_lora_kohya_and_embeddings(ti_lora_run):
    names = {p.name for p in ti_lora_run.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "learned_embeds.safetensors"} <= names


def test_sample_with_lora_and_embeddings_and_scale(ti_lora_run, tmp_path):
    base = ["--model", "toy", "--embeddings", str(ti_lora_run / "learned_embeds.safetensors")]
    assert main(SAMPLE + base + ["--out", str(tmp_path / "emb")]) == 0
    assert main(SAMPLE + base + ["--lora", str(ti_lora_run), "--out", str(tmp_path / "lora")]) == 0
    assert main(SAMPLE + base + ["--lora", str(ti_lora_run), "--lora-scale", "0", "--out", str(tmp_path / "zero")]) == 0
    emb, lora, zero = (_png(tmp_path / d) for d in ("emb", "lora", "zero"))
    assert np.array_equal(zero, emb)  # LoRA at scale 0 is the model without it
    assert np.abs(lora - emb).max() > 0


@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver++"])
def test_sample_with_a_scheduler(tmp_path, scheduler):
    argv = ["sample", "--model", "toy", "--prompt", "a red circle", "--steps", "4", "--scheduler", scheduler]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv[:-2] + ["--out", str(tmp_path / "ddim")]) == 0
    assert np.abs(_png(tmp_path / "a") - _png(tmp_path / "ddim")).max() > 0


def test_instructpix2pix_full_export_edits_an_image(tmp_path, capsys):
    data = tmp_path / "ip2p"
    write_toy_images(data / "in", 2, captions=False)
    write_toy_images(data / "out", 2, captions=False, seed=9)
    (data / "metadata.jsonl").write_text(
        "".join(f'{{"input_image": "in/{i:03d}.png", "edited_image": "out/{i:03d}.png", "edit_prompt": "make it red"}}\n' for i in range(2))
    )
    cfg = load_config(None, FAST + [f"run.output_dir={tmp_path}", "objective.preset=instructpix2pix", f"data.source={data}",
                                    "data.image_column=edited_image", "data.conditioning_column=input_image",
                                    "data.text_column=edit_prompt", "trainable.kind=full", "trainable.unet_in_channels=8",
                                    "train.steps=1", "optim.lr=1e-4"])  # fmt: skip
    run = tmp_path / "run"
    train_loop(cfg, run, LocalContext(run))
    assert (run / "export" / "model_index.json").is_file()
    argv = ["sample", "--model", str(run / "export"), "--prompt", "make it red", "--steps", "3", "--image", str(data / "in" / "000.png")]
    assert main(argv + ["--out", str(tmp_path / "edit")]) == 0
    assert Image.open(next((tmp_path / "edit").glob("*.png"))).size == (32, 32)
    rc = main(["sample", "--model", "toy", "--prompt", "x", "--image", str(data / "in" / "000.png"), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "8" in capsys.readouterr().err and not (tmp_path / "bad").exists()
