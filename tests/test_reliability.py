"""Reliability (docs/reliability.md): train.on_nonfinite stop | skip, and atomic checkpoints (manifest last,
incomplete or tampered ones refused, resume from the newest complete one), in-process (LocalContext)."""

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayjobs.config import load_config
from rayjobs.runlog import STOP_FILE, read_metrics
from rayjobs.training import checkpoint
from rayjobs.training.loop import LocalContext, Worker, train_loop

sys.path.insert(0, str(Path(__file__).parent))  # for 'faults:...' rewards
import rayrun  # noqa: E402  (the short toy run's overrides; no Ray started here)

FAST = [*rayrun.FAST, "train.checkpoint_every=1"]


def _cfg(tmp_path, *extra):
    return load_config(None, FAST + [f"run.output_dir={tmp_path}", *extra])


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"local_step_{step:06d}"


def test_stop_names_step_prompt_and_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=5", "reward.name=faults:NaNFrom", "reward.kwargs={at_call: 3}")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    message = (tmp_path / STOP_FILE).read_text().strip()
    assert message.startswith("non-finite loss or gradient at step 3 (loss=nan")
    assert any(repr(p) in message for p in cfg.data.prompts), message  # the micro-batch's prompt
    assert "micro-batch 0" in message
    assert message.endswith(f"last good checkpoint kept: {_ckpt(tmp_path, 2)}")
    assert [m["stopped"] for m in read_metrics(tmp_path) if "stopped" in m] == [message]  # one message
    assert not (tmp_path / "export").exists()
    checkpoint.verify(_ckpt(tmp_path, 2))  # still loadable
    assert Worker(cfg, LocalContext(tmp_path)).restore() == 2


def test_stop_before_any_checkpoint_says_none_yet(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=3", "reward.name=faults:NaNFrom", "reward.kwargs={at_call: 1}")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    assert (tmp_path / STOP_FILE).read_text().strip().endswith("last good checkpoint kept: none yet")


def test_skip_leaves_weights_optimizer_and_schedule_untouched_and_counts(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=3", "train.on_nonfinite=skip", "reward.name=faults:NaNAt", "reward.kwargs={at_call: 2}")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    assert not (tmp_path / STOP_FILE).exists() and (tmp_path / "export").is_dir()  # the run completed
    steps = {m["step"]: m for m in read_metrics(tmp_path) if "loss" in m}
    assert [steps[s]["skipped_nonfinite"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert [steps[s]["skipped_nonfinite_total"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert steps[2]["loss"] == "nan" and steps[3]["loss"] != "nan"
    assert any(p in steps[2]["skipped_prompts"] for p in cfg.data.prompts)
    # the skipped step 2 changed nothing: its checkpoint is bit-identical to step 1's (but the step count)
    w1, w2, w3 = (load_file(_ckpt(tmp_path, s) / checkpoint.WEIGHTS) for s in (1, 2, 3))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 trained again
    o1, o2 = (torch.load(_ckpt(tmp_path, s) / checkpoint.OPTIMIZER, weights_only=True) for s in (1, 2))
    assert o1["lr_schedule"] == o2["lr_schedule"]
    s1, s2 = o1["optimizer"]["state"], o2["optimizer"]["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_skip_stops_after_max_consecutive(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=8", "train.on_nonfinite=skip", "train.max_skipped=3",
               "reward.name=faults:NaNFrom", "reward.kwargs={at_call: 2}")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    message = (tmp_path / STOP_FILE).read_text().strip()
    assert message.startswith("non-finite loss or gradient at step 4 ")
    assert "3 consecutive non-finite steps (train.max_skipped=3)" in message
    assert message.endswith(f"last good checkpoint kept: {_ckpt(tmp_path, 3)}")
    steps = {m["step"]: m for m in read_metrics(tmp_path) if "loss" in m}
    assert sorted(steps) == [1, 2, 3] and steps[3]["skipped_nonfinite_total"] == 2.0
    assert not (tmp_path / "export").exists()


def test_incomplete_checkpoint_is_refused_and_resume_picks_the_previous(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=2")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    partial = _ckpt(tmp_path, 3)  # a write interrupted: some files, no manifest
    partial.mkdir()
    (partial / "rng_rank0.pt").write_bytes((_ckpt(tmp_path, 2) / "rng_rank0.pt").read_bytes())
    (partial / checkpoint.STATE).write_text(json.dumps({"step": 3}))
    w = Worker(cfg, LocalContext(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="is incomplete: no manifest.json"):
        checkpoint.load(partial, 0, w.optimizer, w.schedule)
    with LocalContext(tmp_path).latest_checkpoint() as found:
        assert found == _ckpt(tmp_path, 2)
    assert w.restore() == 2


def _save_and_hang(cfg, run: Path, started) -> None:
    """The child: saves step 2 straight into its checkpoint directory, stops forever after the first file."""
    worker = Worker(cfg, LocalContext(run))
    worker.restore()

    def hang(path: Path) -> None:
        started.set()
        time.sleep(600)

    checkpoint.on_file_written = hang
    worker.save(_ckpt(run, 2), 2)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=1")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    # spawn, not fork: a fork copies the parent's locks but not its other threads (pytest-xdist's, a run lock's
    # heartbeat), and a child that needs a lock one of them held at the fork waits for ever.
    mp = multiprocessing.get_context("spawn")
    started = mp.Event()
    child = mp.Process(target=_save_and_hang, args=(cfg, tmp_path, started))
    child.start()
    try:
        assert started.wait(120), "the child never wrote a file"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    killed = _ckpt(tmp_path, 2)
    assert (killed / "rng_rank0.pt").is_file() and not (killed / checkpoint.MANIFEST).exists()
    assert not checkpoint.is_complete(killed)
    with LocalContext(tmp_path).latest_checkpoint() as found:
        assert found == _ckpt(tmp_path, 1)
    # resume picks step 1 and trains on; the step-2 checkpoint is rewritten whole
    train_loop(_cfg(tmp_path, "train.steps=2"), tmp_path, LocalContext(tmp_path))
    assert any(m.get("resumed_from_step") == 1 for m in read_metrics(tmp_path))
    assert checkpoint.verify(killed)["step"] == 2


def test_tampered_checkpoint_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=1")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    ckpt = _ckpt(tmp_path, 1)
    weights = ckpt / checkpoint.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    w = Worker(cfg, LocalContext(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="trainable.safetensors does not match the sha256 in manifest.json"):
        checkpoint.load(ckpt, 0, w.optimizer, w.schedule)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(checkpoint.CheckpointError, match=r"trainable.safetensors has \d+ bytes, manifest.json lists \d+"):
        checkpoint.verify(ckpt)
    assert w.restore() == 0  # LocalContext: no complete checkpoint left
