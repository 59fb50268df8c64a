"""The demo command end to end (its own local Ray, slow tier), shortened to 2 steps; and the progress it prints."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rayjobs.cluster.driver import Progress, progress_fields
from rayjobs.runlog import read_metrics

# tqdm's bar: "train: 100%|####| 2/2 [00:03<00:00, 1.5s/it, loss=-1.98, reward=2.01, kl=0.0123]"
BAR = re.compile(r"train:\s+\d+%\|.*\| (?P<n>\d+)/(?P<total>\d+) \[[^,\]]*(?:, [^,\]=]+)?(?P<post>(?:, \w+=[^,\]]+)*)\]")


def bar_fields(stderr: str) -> tuple[int, int, dict[str, str]]:
    """The last progress bar state written to stderr: (step, total, {term: shown value})."""
    states = [m for part in re.split(r"[\r\n]", stderr) if (m := BAR.search(part))]
    assert states, stderr[-2000:]
    last = states[-1]
    post = dict(kv.split("=", 1) for kv in last["post"].split(", ") if kv)
    return int(last["n"]), int(last["total"]), post


def test_progress_line_shows_the_logged_terms_of_the_last_step(tmp_path, capsys):
    records = [{"step": 1, "loss": -1.5, "reward": 1.75, "kl": 0.03125, "time": 1.0},
               {"step": 0, "eval/reward_mean": 1.6, "eval/reward_std": 0.25, "eval/kl": 0.0},
               {"step": 2, "loss": -1.875, "reward": 2.0625, "kl": 0.0625, "time": 2.0}]  # fmt: skip
    progress = Progress(tmp_path, total=2)
    progress.begin()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    progress.poll()
    progress.end()
    err = capsys.readouterr().err
    assert bar_fields(err) == (2, 2, {"loss": "-1.875", "reward": "2.062", "kl": "0.0625"})
    assert "eval step 0: reward 1.6 ± 0.25, kl 0\n" in err


@pytest.mark.ray
@pytest.mark.slow
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
    last = [m for m in read_metrics(run) if "loss" in m][-1]
    assert bar_fields(proc.stderr) == (2, 2, progress_fields(last))  # the progress line shows the last step's terms

    # The exported LoRA (attention + conv targets) loads into diffusers through `draftray sample`.
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "rayjobs.cli", "sample", "--model", "toy", "--lora", str(run / "export"),
           "--prompt", "a red circle", "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["000_seed0.png"]
