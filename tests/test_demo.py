"""The demo command end to end (its own local Ray), shortened to 2 steps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def test_draftray_train_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rayjobs.cli", "train", "train.steps=2", "train.eval_every=2", "sampler.steps=6",
           "data.eval_seeds=[0,1]", f"run.output_dir={tmp_path}", "run.name=demo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(proc.stdout.strip().splitlines()[-1])
    assert run == tmp_path / "demo"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "samples", "checkpoints", "export", "tensorboard"} <= names
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["base_vs_final.png", "step_000000.png", "step_000002.png"]
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert "train" in proc.stderr and "reward" in proc.stderr  # the progress line

    # The exported LoRA (attention + conv targets) loads into diffusers through `draftray sample`.
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "rayjobs.cli", "sample", "--model", "toy", "--lora", str(run / "export"),
           "--prompt", "a red circle", "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["000_seed0.png"]
