"""The training loop without Ray (LocalContext): metrics, checkpoints, resume, NaN stop."""

import json
import sys
from pathlib import Path

import pytest
import torch
from shortrun import SHORT

from rayjobs.config import load_config
from rayjobs.runlog import STOP_FILE, read_metrics
from rayjobs.training.guard import NonFiniteGuard, StepResult
from rayjobs.training.loop import LocalContext, Worker, train_loop

sys.path.insert(0, str(Path(__file__).parent))  # for 'faults:...' rewards

FAST = [*SHORT, "sampler.truncation_steps=2", "train.batch_size=1"]


def _cfg(tmp_path, *extra):
    return load_config(None, FAST + [f"run.output_dir={tmp_path}", *extra])


def test_run_writes_metrics_grids_checkpoints_and_export(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=1")
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    # the step records keep the finite flag as a number; the stop request never reaches them
    assert all(m["finite"] == 1.0 and "stop_requested" not in m for m in metrics if "loss" in m)
    evals = [m for m in metrics if "eval/reward_mean" in m]
    assert [m["step"] for m in evals] == [0, 2]
    assert evals[0]["eval/kl"] == 0.0  # LoRA starts at the base model
    assert all(Path(m["eval/grid"]).is_file() for m in evals)
    # base vs tuned, same prompts and seeds: the step-0 grid | 16 px gap | the final grid
    from PIL import Image

    sizes = [Image.open(m["eval/grid"]).size for m in evals]
    compare = Image.open(tmp_path / "samples" / "base_vs_final.png")
    assert compare.size == (sizes[0][0] + 16 + sizes[1][0], sizes[0][1])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["local_step_000001", "local_step_000002"]
    ckpt = tmp_path / "checkpoints" / "local_step_000002"
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 2}
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "tensorboard").iterdir())


def test_resume_continues_from_checkpoint_with_identical_weights(tmp_path):
    """3 steps straight == 2 steps, then a new process resuming for the 3rd (per-step seeding)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_loop(_cfg(straight, "train.steps=3", "train.eval_every=0"), straight, LocalContext(straight))
    train_loop(_cfg(split, "train.steps=2", "train.eval_every=0"), split, LocalContext(split))
    train_loop(_cfg(split, "train.steps=3", "train.eval_every=0"), split, LocalContext(split))
    assert any(m.get("resumed_from_step") == 2 for m in read_metrics(split))
    a = Worker(_cfg(straight), LocalContext(straight))
    b = Worker(_cfg(split), LocalContext(split))
    assert a.restore() == b.restore() == 3
    for (name, pa), pb in zip(a.policy.named_trainable().items(), b.policy.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(
        tmp_path,
        "train.steps=5",
        "train.checkpoint_every=1",
        "train.eval_every=0",
        "reward.name=faults:NaNFrom",
        "reward.kwargs={at_call: 3}",
    )
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    assert "non-finite loss" in (tmp_path / STOP_FILE).read_text()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["local_step_000001", "local_step_000002"]
    assert not (tmp_path / "export").exists()
    assert max(m["step"] for m in read_metrics(tmp_path) if "loss" in m) == 2


def test_stop_request_ends_the_run_and_a_restart_clears_it(tmp_path):
    """A sweep trial stopped by Tune's scheduler (rayjobs/tune/sweep.py) ends at its next step, no export;
    starting the run again (prepare_run_dir) removes the request, so the run trains to the end."""
    from rayjobs.cluster.driver import prepare_run_dir
    from rayjobs.runlog import STOP_REQUEST

    cfg = _cfg(tmp_path, "train.steps=3", "train.checkpoint_every=1", "train.eval_every=0")
    prepare_run_dir(cfg, tmp_path)
    (tmp_path / STOP_REQUEST).touch()
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    assert [m["stopped"] for m in read_metrics(tmp_path) if "stopped" in m] == ["stop requested (early stopping)"]
    assert not any("loss" in m for m in read_metrics(tmp_path)) and not (tmp_path / "export").exists()
    prepare_run_dir(cfg, tmp_path)
    train_loop(cfg, tmp_path, LocalContext(tmp_path))
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == [1, 2, 3] and (tmp_path / "export").is_dir()


def test_grad_accumulation_averages_micro_batches(tmp_path):
    """grad_accum=2 with batch 1 gives the same update direction as the mean of two micro-batch grads."""
    cfg = _cfg(tmp_path, "train.grad_accum=2", "optim.grad_clip=0")
    w = Worker(cfg, LocalContext(tmp_path))
    grads = []
    for micro in range(2):
        w.optimizer.zero_grad()
        loss, _ = w.objective(w.policy, w.batch(0, micro))
        loss.backward()
        grads.append([p.grad.clone() for p in w.params])
    w.optimizer.zero_grad()
    result = w.train_step(0)
    metrics = result.metrics
    assert result.finite and not result.stop_requested
    assert not {"finite", "stop_requested"} & set(metrics)  # the flags live beside the metrics, not among them
    expect = torch.sqrt(sum(((g0 + g1) / 2).pow(2).sum() for g0, g1 in zip(*grads)))
    assert metrics["grad_norm"] == pytest.approx(float(expect), rel=1e-4)


def _step(finite: bool) -> StepResult:
    return StepResult({"loss": 1.0 if finite else float("nan"), "grad_norm": 0.5}, finite=finite, stop_requested=False)


def test_guard_stop_policy_stops_at_the_first_non_finite_step():
    guard = NonFiniteGuard("stop", max_skipped=10)
    finite = _step(True)
    assert not guard.should_stop(finite)
    assert set(finite.metrics) == {"loss", "grad_norm"}  # no skip counters under "stop"
    assert guard.should_stop(_step(False), "prompts ['a'] (rank 0, micro-batch 0)")
    assert guard.limit is None  # the message names no limit: any non-finite step stops


def test_guard_skip_policy_counts_and_stops_after_max_skipped_in_a_row():
    guard = NonFiniteGuard("skip", max_skipped=3)
    record = []
    for finite in (True, False, False, True, False, False):  # never 3 in a row: a finite step resets the count
        result = _step(finite)
        assert not guard.should_stop(result, "prompts ['a'] (rank 0, micro-batch 0)")
        record.append(result.metrics)
    assert [m["skipped_nonfinite"] for m in record] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert [m["skipped_nonfinite_total"] for m in record] == [0.0, 1.0, 2.0, 2.0, 3.0, 4.0]
    assert ["skipped_prompts" in m for m in record] == [False, True, True, False, True, True]
    assert record[1]["skipped_prompts"] == "prompts ['a'] (rank 0, micro-batch 0)"
    third = _step(False)
    assert guard.should_stop(third)
    assert guard.limit == "3 consecutive non-finite steps (train.max_skipped=3)"
    assert "skipped_nonfinite" not in third.metrics  # the stopping step is not counted as skipped
    assert guard.skipped == 4


def test_guard_skip_logs_prompts_only_where_given():
    """Ranks other than 0 pass no prompts: they count the skip, but only rank 0's record names the prompts."""
    guard = NonFiniteGuard("skip", max_skipped=10)
    result = _step(False)
    assert not guard.should_stop(result)
    assert result.metrics["skipped_nonfinite"] == 1.0 and "skipped_prompts" not in result.metrics
