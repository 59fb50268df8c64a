"""InstructPix2Pix validation edits during training (data.eval_images) and the text-embedding cache
(data.cache_text_embeddings): both through the Worker on the toy model, nothing downloaded."""

import json

import pytest
import torch
from PIL import Image
from toydata import finetune_worker, write_toy_images

from models.ip2p import edit
from rayjobs.cluster.preflight import preflight
from rayjobs.config import load_config
from rayjobs.data import text_cache
from rayjobs.data.images import eval_pixels
from rayjobs.errors import UserError
from rayjobs.runlog import read_metrics
from rayjobs.training.loop import LocalContext, Worker, train_loop

FAST = ["sampler.steps=3", "data.eval_prompts=[make it red, make it blue]", "data.eval_seeds=[0,1]", "train.batch_size=2", "train.eval_every=0"]


def _edits_cfg(tmp_path, *extra):
    data = tmp_path / "ip2p"
    write_toy_images(data / "in", 2, captions=False)
    write_toy_images(data / "out", 2, captions=False, seed=9)
    rows = [{"input_image": f"in/{i:03d}.png", "edited_image": f"out/{i:03d}.png", "edit_prompt": "make it red"} for i in range(2)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_images = f"[{data / 'in' / '000.png'}, {data / 'in' / '001.png'}]"
    return load_config(None, FAST + [
        f"run.output_dir={tmp_path}", "objective.preset=instructpix2pix", f"data.source={data}", "data.image_column=edited_image",
        "data.conditioning_column=input_image", "data.text_column=edit_prompt", "trainable.kind=full",
        "trainable.unet_in_channels=8", f"data.eval_images={eval_images}", "train.steps=1", *extra])  # fmt: skip


def test_validation_edits_are_logged_at_every_evaluation(tmp_path):
    cfg = _edits_cfg(tmp_path)
    run = tmp_path / "run"
    train_loop(cfg, run, LocalContext(run))
    grids = {m["step"]: m["eval/edit_grid"] for m in read_metrics(run) if "eval/edit_grid" in m}
    assert sorted(grids) == [0, 1]
    first = Image.open(grids[0])
    assert first.size[0] > first.size[1]  # 2 rows (images) x 3 columns (the input, then 2 edits)
    assert (run / "samples" / "edits_step_000001.png").is_file() and (run / "samples" / "step_000001.png").is_file()


def test_a_validation_row_is_the_input_then_its_edits_by_the_eval_prompts(tmp_path):
    cfg = _edits_cfg(tmp_path)
    worker = Worker(cfg, LocalContext(tmp_path))
    rows = worker.validation_edits()
    assert [r.shape for r in rows] == [(3, 3, 32, 32)] * 2
    pixels = eval_pixels(cfg)[1]  # [3, 32, 32] in [-1, 1]
    assert torch.allclose(rows[1][0], (pixels + 1) / 2)
    direct = edit(worker.policy, list(cfg.data.eval_prompts), pixels[None].expand(2, -1, -1, -1), worker.settings, 1.5,
                  torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(rows[1][1:], direct)


def test_bad_validation_inputs_are_refused_before_training(tmp_path):
    bad = tmp_path / "eval.png"
    cfg = _edits_cfg(tmp_path, f"data.eval_images=[{bad}]")
    bad.write_bytes((tmp_path / "ip2p" / "in" / "001.png").read_bytes()[:30])
    with pytest.raises(UserError, match=r"^data.eval_images .*eval.png: cannot decode"):
        preflight(cfg)
    # One change from the valid edits config each: the image above, the model here (with a good image: a bad
    # one too would let the case pass on the image alone).
    good = tmp_path / "ip2p" / "in" / "001.png"
    with pytest.raises(UserError, match="data.eval_images: validation edits need an InstructPix2Pix UNet"):
        load_config(None, FAST + [f"data.eval_images=[{good}]"])


def _caption_worker(tmp_path, *extra) -> Worker:
    return finetune_worker(tmp_path, FAST, *extra, n=4)


def test_cached_text_states_equal_the_encoder_and_persist(tmp_path):
    worker = _caption_worker(tmp_path, "data.cache_text_embeddings=true")
    prompts = ["a red circle", "a blue square", "a red circle", ""]
    cached = worker.policy.encode_prompts(prompts).states  # [4, 77, D]
    assert torch.equal(cached[0], cached[2])
    assert torch.allclose(cached, worker.policy._encode(prompts).states, atol=1e-6)
    files = list((tmp_path / ".cache" / "text").rglob("*.safetensors"))
    assert len(files) == 3  # one per distinct prompt
    again = _caption_worker(tmp_path, "data.cache_text_embeddings=true")  # a later run: served from disk
    assert torch.equal(again.policy.encode_prompts(prompts).states, cached)
    assert again.policy.text_cache.disk.hits == 3 and again.policy.text_cache.disk.misses == 0


def test_the_memory_layer_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(text_cache, "MEMORY_ENTRIES", 2)
    worker = _caption_worker(tmp_path, "data.cache_text_embeddings=true")
    worker.policy.encode_prompts(["a", "b", "c"])
    assert list(worker.policy.text_cache.memory) == ["b", "c"]


def test_a_cached_run_trains_as_an_uncached_one(tmp_path):
    plain = _caption_worker(tmp_path / "plain", "optim.lr=1e-2")
    cached = _caption_worker(tmp_path / "cached", "optim.lr=1e-2", "data.cache_text_embeddings=true")
    for step in range(2):
        a, b = plain.train_step(step).metrics, cached.train_step(step).metrics
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, p in plain.policy.named_trainable().items():
        assert torch.allclose(p, cached.policy.named_trainable()[name], atol=1e-5)


def test_text_cache_is_refused_while_the_text_path_trains(tmp_path):
    with pytest.raises(UserError, match="data.cache_text_embeddings: the text encoder trains"):
        load_config(None, ["data.cache_text_embeddings=true", "trainable.text_encoder=lora"])
