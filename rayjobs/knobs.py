"""Inference-time points of a sweep: LoRA scale and annealed importance guidance (issue 5).

For a finished trial, its final trainable weights (the latest checkpoint) are evaluated again on the
same eval prompts and seeds, once per knob, without more training. Each evaluation is a candidate
point of the front, written to <trial>/inference.jsonl with its kind ("lora_scale" or "aig") and
knob value, beside the trial's own metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from models.inference import aig_weights, lora_scale, parse_aig
from rayjobs import checkpoint
from rayjobs.config import Config, load_config
from rayjobs.loop import LocalContext, Worker
from rayjobs.runlog import INFERENCE_FILE



def latest_weights(run_dir: Path) -> tuple[int, Path] | None:
    """(step, trainable.safetensors) of the newest checkpoint under <run_dir>/checkpoints, or None."""
    found = []
    for state in Path(run_dir).glob("checkpoints/*/" + checkpoint.STATE):
        if (state.parent / checkpoint.WEIGHTS).is_file():
            found.append((json.loads(state.read_text(encoding="utf-8"))["step"], state.parent / checkpoint.WEIGHTS))
    return max(found) if found else None


def evaluate_knobs(cfg: Config, run_dir: Path, lora_scales: list[float], aig: list[str], device: str = "cpu") -> list[dict]:
    """One evaluation per knob on the trial's final weights; records written to <run_dir>/inference.jsonl (replacing an earlier pass)."""
    latest = latest_weights(run_dir)
    if latest is None or not (lora_scales or aig):
        return []
    step, weights = latest
    worker = Worker(cfg, LocalContext(run_dir, device))
    worker.policy.load_trainable_state_dict(load_file(weights))
    records = []
    for scale in lora_scales:
        with lora_scale(worker.policy, scale):
            metrics, _ = worker.evaluate()
        records.append({"step": step, "kind": "lora_scale", "knob": f"{scale:g}", **metrics})
    for label in aig:
        schedule, p, f = parse_aig(label)
        metrics, _ = worker.evaluate(blend=aig_weights(schedule, cfg.sampler.steps, p=p, f=f))
        records.append({"step": step, "kind": "aig", "knob": label, **metrics})
    with open(Path(run_dir) / INFERENCE_FILE, "w", encoding="utf-8") as out:
        for rec in records:
            out.write(json.dumps(rec) + "\n")
    return records


def run_knobs_remote(cfg: Config, run_dirs: list[Path]) -> None:
    """Every trial's knobs as Ray tasks with one trial worker's resources (a GPU where trials use them)."""
    import ray

    knobs = cfg.sweep.inference
    if not (knobs.lora_scales or knobs.aig):
        return
    gpu = cfg.ray.use_gpu

    @ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if gpu else 0)
    def one(run_dir: str) -> int:
        trial = load_config(Path(run_dir) / "config.yaml")  # the trial's own values (kl_coeff, lr, ...)
        return len(evaluate_knobs(trial, Path(run_dir), knobs.lora_scales, knobs.aig, "cuda" if gpu else "cpu"))

    ray.get([one.remote(str(d)) for d in run_dirs])
