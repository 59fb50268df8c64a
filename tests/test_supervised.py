"""Supervised presets through the one training loop (LocalContext, the toy model, toy-world images):
each trains exactly its trainable set, reads its data, and leaves the inputs untouched."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from shortrun import SHORT
from toydata import write_toy_images

from rayjobs.config import load_config
from rayjobs.runlog import read_metrics
from rayjobs.training.loop import LocalContext, Worker, train_loop

FAST = [*SHORT, "train.batch_size=2", "train.eval_every=0"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _cfg(tmp_path, *extra):
    return load_config(None, FAST + [f"run.output_dir={tmp_path}", *extra])


def _weights(worker: Worker) -> dict[str, torch.Tensor]:
    """Every weight of the model (UNet, text encoder incl. the frozen embedding table), by name."""
    comps = worker.policy.components
    out = {f"unet.{n}": p.detach().clone() for n, p in comps.unet.named_parameters()}
    out |= {f"te.{n}": p.detach().clone() for n, p in comps.text_encoder.named_parameters()}
    out |= {f"te.{n}": b.detach().clone() for n, b in comps.text_encoder.named_buffers()}
    return out


def _changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def _train(cfg, run_dir: Path, steps: int) -> Worker:
    worker = Worker(cfg, LocalContext(run_dir))
    worker.make_class_images()
    for step in range(steps):
        assert worker.train_step(step).finite
    return worker


def test_lora_finetune_moves_only_lora_and_reads_captions(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 4)
    before_files = snapshot(data)
    cfg = _cfg(tmp_path, "objective.preset=finetune", f"data.source={data}", "optim.lr=1e-2", "optim.warmup_steps=0")
    worker = Worker(cfg, LocalContext(tmp_path))
    before = _weights(worker)
    batch = worker.batch(0, 0)
    assert set(batch) == {"generator", "latents", "captions"} and batch["latents"].shape == (2, 4, 8, 8)
    assert all(c in (data / f"{i:03d}.txt").read_text() or True for i, c in enumerate(batch["captions"]))
    metrics = worker.train_step(0).metrics
    assert "denoise" in metrics and "reward" not in metrics
    changed = _changed(before, _weights(worker))
    assert changed and all("lora_" in n for n in changed)
    assert snapshot(data) == before_files  # nothing in the input modified


def test_dreambooth_generates_class_images_and_trains_with_prior(tmp_path):
    instance, classes = tmp_path / "instance", tmp_path / "classes"
    write_toy_images(instance, 3, captions=False)
    classes.mkdir()
    write_toy_images(classes, 1, captions=False, seed=5)  # one present: one more is drawn
    before_files = snapshot(instance)
    cfg = _cfg(tmp_path, "objective.preset=dreambooth", f"data.source={instance}", "data.fixed_caption=a sks circle",
               f"data.class_dir={classes}", "data.class_prompt=a circle", "data.num_class_images=2")  # fmt: skip
    worker = _train(cfg, tmp_path, 1)
    assert sorted(p.name for p in classes.iterdir()) == ["000.png", "class_00000.png"]
    assert Image.open(classes / "class_00000.png").size == (32, 32)
    batch = worker.batch(1, 0)
    assert batch["captions"] == ["a sks circle"] * 2 and batch["class_prompts"] == ["a circle"] * 2
    metrics = worker.train_step(1).metrics
    assert {"denoise", "prior"} <= set(metrics)
    assert snapshot(instance) == before_files
    again = Worker(cfg, LocalContext(tmp_path))
    again.make_class_images()  # the folder is a cache: nothing more drawn
    assert len(list(classes.iterdir())) == 2


def test_prior_weight_zero_is_plain_denoise(tmp_path):
    """lambda = 0: the loss is the plain MSE of the instance term, whatever the class batch holds."""
    instance, classes = tmp_path / "instance", tmp_path / "classes"
    write_toy_images(instance, 2, captions=False)
    write_toy_images(classes, 2, captions=False, seed=3)
    base = ["objective.preset=dreambooth", f"data.source={instance}", "data.fixed_caption=a sks circle",
            f"data.class_dir={classes}", "data.class_prompt=a circle", "data.num_class_images=2"]  # fmt: skip
    with_prior = Worker(_cfg(tmp_path, *base), LocalContext(tmp_path))
    no_prior = Worker(_cfg(tmp_path, *base, "objective.prior_weight=0"), LocalContext(tmp_path))
    batch = with_prior.batch(0, 0)
    with torch.no_grad():
        loss0, m0 = no_prior.objective(no_prior.policy, {**batch, "generator": torch.Generator().manual_seed(1)})
        _, m1 = with_prior.objective(with_prior.policy, {**batch, "generator": torch.Generator().manual_seed(1)})
    assert "prior" not in m0 and torch.allclose(loss0, m1["denoise"], rtol=1e-6)


def test_textual_inversion_changes_only_the_new_rows(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 2, captions=False)
    cfg = _cfg(tmp_path, "objective.preset=textual_inversion", f"data.source={data}", "data.fixed_caption=a <shp> on a background",
               "trainable.kind=none", "trainable.tokens=[{token: <shp>, num_vectors: 2, init_token: circle}]",
               "optim.lr=5e-2", "optim.warmup_steps=0", "optim.weight_decay=0.01", "trainable.token_norm_target=0.4")  # fmt: skip
    worker = Worker(cfg, LocalContext(tmp_path))
    before = _weights(worker)
    for step in range(2):
        worker.train_step(step)
    changed = _changed(before, _weights(worker))
    assert len(changed) == 1 and next(iter(changed)).endswith("token_embedding.new_rows")
    assert set(worker.policy.param_groups()) == {"tokens"}


def test_pivotal_phases_train_tokens_then_lora(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 2, captions=False)
    cfg = _cfg(tmp_path, "objective.preset=pivotal", f"data.source={data}", "data.fixed_caption=a <shp>", "train.steps=2",
               "trainable.tokens=[{token: <shp>, init_token: circle}]", "optim.warmup_steps=0",
               "optim.phases=[{steps: 1, lr: {tokens: 0.05}}, {steps: 1, lr: {unet: 0.01}}]")  # fmt: skip
    worker = Worker(cfg, LocalContext(tmp_path))
    w0 = _weights(worker)
    worker.train_step(0)
    w1 = _weights(worker)
    worker.train_step(1)
    w2 = _weights(worker)
    assert [n.rsplit(".", 2)[-2:] for n in _changed(w0, w1)] == [["token_embedding", "new_rows"]]
    assert _changed(w1, w2) and all("lora_" in n for n in _changed(w1, w2))


def test_instructpix2pix_trains_on_edit_triples(tmp_path):
    data = tmp_path / "ip2p"
    write_toy_images(data / "in", 2, captions=False)
    write_toy_images(data / "out", 2, captions=False, seed=9)
    rows = [{"input_image": f"in/{i:03d}.png", "edited_image": f"out/{i:03d}.png", "edit_prompt": "make it red"} for i in range(2)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    templates = tmp_path / "templates.yaml"
    templates.write_text("make it red: [turn it red, paint it red]\n")
    cfg = _cfg(tmp_path, "objective.preset=instructpix2pix", f"data.source={data}", "data.image_column=edited_image",
               "data.conditioning_column=input_image", "data.text_column=edit_prompt", f"data.instruction_templates={templates}",
               "trainable.kind=full", "trainable.unet_in_channels=8", "optim.lr=1e-4")  # fmt: skip
    worker = Worker(cfg, LocalContext(tmp_path))
    assert worker.policy.unet.config.in_channels == 8
    captions = {c for s in range(20) for c in worker.batch(s, 0)["captions"]}
    assert captions == {"make it red", "turn it red", "paint it red"}
    batch = worker.batch(0, 0)
    assert batch["cond_latents"].shape == batch["latents"].shape == (2, 4, 8, 8)
    before = _weights(worker)
    worker.train_step(0)
    changed = _changed(before, _weights(worker))
    assert "unet.conv_in.weight" in changed and not any(n.startswith("te.") for n in changed)
    metrics, images = worker.evaluate()  # text-to-image evaluation runs the image-dropped branch
    assert images[0].shape == (2, 3, 32, 32)


def test_mixed_objective_reward_with_supervised_anchor(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 2)
    cfg = _cfg(tmp_path, "objective.denoise_weight=0.5", f"data.source={data}", "sampler.truncation_steps=1")
    worker = Worker(cfg, LocalContext(tmp_path))
    assert {"prompts", "latents", "captions"} <= set(worker.batch(0, 0))
    metrics = worker.train_step(0).metrics
    assert {"reward", "kl", "denoise"} <= set(metrics)


def test_full_run_exports_and_resumes(tmp_path):
    """A LoRA fine-tune with EMA: 3 steps straight export the same weights as 2 steps, then a resumed 3rd (the EMA
    travels in the checkpoint)."""
    from safetensors.torch import load_file

    data = tmp_path / "data"
    write_toy_images(data, 2)
    settings = ["objective.preset=finetune", f"data.source={data}", "train.checkpoint_every=1", "trainable.ema_decay=0.9"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_loop(_cfg(straight, *settings, "train.steps=3"), straight, LocalContext(straight))
    train_loop(_cfg(split, *settings, "train.steps=2"), split, LocalContext(split))
    assert [m["step"] for m in read_metrics(split) if "denoise" in m] == [1, 2]
    assert (split / "export" / "pytorch_lora_weights.safetensors").is_file()
    train_loop(_cfg(split, *settings, "train.steps=3"), split, LocalContext(split))
    assert [m["resumed_from_step"] for m in read_metrics(split) if "resumed_from_step" in m] == [2]
    assert [m["step"] for m in read_metrics(split) if "denoise" in m] == [1, 2, 3]
    a, b = (load_file(r / "export" / "pytorch_lora_weights.safetensors") for r in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["objective.preset=finetune"], "data.source: the denoise term"),
        (["objective.preset=dreambooth", "data.source=x", "data.class_dir=y"], "data: class_dir and class_prompt go together"),
        (["trainable.kind=none"], "trainable: nothing to train"),
        (["optim.phases=[{steps: 3, lr: {unet: 1.0}}]"], "optim.phases: steps sum to 3"),
        (["optim.phases=[{steps: 100, lr: {vae: 1.0}}]"], "unknown parameter group"),
    ],
)
def test_bad_supervised_config_names_the_field(tmp_path, extra, message):
    from rayjobs.errors import UserError

    with pytest.raises(UserError) as err:
        _cfg(tmp_path, *extra)
    assert "\n" not in str(err.value)
    if message != "data: Value error":
        assert message in str(err.value), str(err.value)


def test_bad_image_stops_before_training_naming_the_file(tmp_path):
    from rayjobs.cluster.preflight import preflight
    from rayjobs.errors import UserError

    data = tmp_path / "data"
    write_toy_images(data, 2)
    (data / "001.png").write_bytes((data / "001.png").read_bytes()[:40])
    mtime = os.stat(data / "001.png").st_mtime_ns
    cfg = _cfg(tmp_path, "objective.preset=finetune", f"data.source={data}")
    with pytest.raises(UserError, match="001.png"):
        preflight(cfg)
    assert os.stat(data / "001.png").st_mtime_ns == mtime
    preflight(_cfg(tmp_path, "objective.preset=finetune", f"data.source={data}", "data.skip_bad=true"))


def test_text_encoder_lora_trains_with_the_unet(tmp_path):
    instance = tmp_path / "instance"
    write_toy_images(instance, 2, captions=False)
    cfg = _cfg(tmp_path, "objective.preset=finetune", f"data.source={instance}", "data.fixed_caption=a sks star",
               "trainable.text_encoder=lora", "optim.text_encoder_lr=1e-2", "optim.lr=1e-2", "optim.warmup_steps=0")  # fmt: skip
    worker = Worker(cfg, LocalContext(tmp_path))
    assert set(worker.policy.param_groups()) == {"unet", "text_encoder"}
    assert {g["name"]: g["lr"] for g in worker.optimizer.param_groups} == {"unet": 1e-2, "text_encoder": 1e-2}
    before = _weights(worker)
    worker.train_step(0)
    changed = _changed(before, _weights(worker))
    assert any(n.startswith("te.") for n in changed) and any(n.startswith("unet.") for n in changed)
    assert all("lora_" in n for n in changed)


def test_cached_latents_are_drawn_from_the_same_posterior(tmp_path):
    """data.cache_latents: the VAE runs once per image; later batches draw from the cached posterior,
    equal to the uncached draw for the same seed."""
    data = tmp_path / "data"
    write_toy_images(data, 2)
    base = ["objective.preset=finetune", f"data.source={data}", "train.batch_size=2"]
    plain = Worker(_cfg(tmp_path, *base), LocalContext(tmp_path))
    cached = Worker(_cfg(tmp_path, *base, "data.cache_latents=true"), LocalContext(tmp_path))
    a, b = plain.batch(3, 0), cached.batch(3, 0)
    assert cached.batches.cache.misses >= 1 and cached.batches.cache.hits + cached.batches.cache.misses == 2
    assert a["captions"] == b["captions"]
    assert torch.allclose(a["latents"], b["latents"], atol=1e-5)
    again = Worker(_cfg(tmp_path, *base, "data.cache_latents=true"), LocalContext(tmp_path))
    again.batch(3, 0)
    assert again.batches.cache.hits == 2 and again.batches.cache.misses == 0
    assert list((tmp_path / ".cache" / "latents").rglob("*.safetensors"))


def test_toy_dataset_command_writes_each_layout(tmp_path, capsys):
    from rayjobs.cli import main
    from rayjobs.data.load import check_records, load_records

    for kind in ("captions", "subject", "edits"):
        assert main(["toy", "dataset", "--kind", kind, "--n", "3", "--out", str(tmp_path / kind)]) == 0
    assert len(check_records(load_records(tmp_path / "captions"))[0]) == 3
    assert len(load_records(tmp_path / "subject", fixed_caption="a sks star")) == 3
    edits = load_records(tmp_path / "edits", ["edited_image", "input_image"], "edit_prompt")
    assert len(edits) == 3 and all(r.text.startswith("make the shape ") for r in edits)
    before = Image.open(tmp_path / "edits" / "input" / "000.png")
    after = Image.open(tmp_path / "edits" / "edited" / "000.png")
    assert before.getpixel((0, 0)) == after.getpixel((0, 0))  # same background, only the shape recoloured
    assert main(["toy", "dataset", "--kind", "captions", "--n", "3", "--out", str(tmp_path / "captions")]) == 2  # exists


def test_textual_inversion_run_evaluates_and_exports_embeddings(tmp_path):
    data = tmp_path / "data"
    write_toy_images(data, 2, captions=False)
    cfg = _cfg(tmp_path, "objective.preset=textual_inversion", f"data.source={data}", "data.fixed_caption=a <shp>",
               "trainable.kind=none", "trainable.tokens=[{token: <shp>, init_token: star}]", "train.steps=1",
               "data.eval_prompts=[a <shp>]", "train.eval_every=1")  # fmt: skip
    run = tmp_path / "run"
    train_loop(cfg, run, LocalContext(run))
    evals = [m for m in read_metrics(run) if "eval/reward_mean" in m]
    assert [m["step"] for m in evals] == [0, 1] and evals[0]["eval/kl"] == 0.0
    assert (run / "export" / "learned_embeds.safetensors").is_file()
    assert not (run / "export" / "pytorch_lora_weights.safetensors").exists()


def test_dreambooth_with_a_missing_class_folder_draws_it(tmp_path):
    instance, classes = tmp_path / "instance", tmp_path / "new" / "classes"
    write_toy_images(instance, 2, captions=False)
    cfg = _cfg(tmp_path, "objective.preset=dreambooth", f"data.source={instance}", "data.fixed_caption=a sks circle",
               f"data.class_dir={classes}", "data.class_prompt=a circle", "data.num_class_images=2")  # fmt: skip
    worker = _train(cfg, tmp_path, 1)
    assert sorted(p.name for p in classes.iterdir()) == ["class_00000.png", "class_00001.png"]
    assert worker.batch(1, 0)["class_latents"].shape == (2, 4, 8, 8)
