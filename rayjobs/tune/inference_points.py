"""Inference-time points of a sweep: LoRA scale and annealed importance guidance, evaluated on a trial's checkpoints after training.

Every checkpoint of a trial (with sweep.checkpoint_evals: every evaluated step) is evaluated again
on the same eval prompts and seeds, once per knob, without more training. Each evaluation is a
candidate point of the front, written to <trial>/inference.jsonl with its kind ("lora_scale" or
"aig"), knob value and sample grid (<trial>/samples/step_<step>_<kind>_<knob>.png), beside the
trial's own metrics.jsonl. Points already in inference.jsonl are not evaluated again (--resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from safetensors.torch import load_file

from models.inference import aig_weights, lora_scale, parse_aig
from rayjobs.config import Config, load_config
from rayjobs.runlog import INFERENCE_FILE, read_metrics, save_grid
from rayjobs.training import checkpoint
from rayjobs.training.loop import LocalContext, Worker


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint directory) of every complete checkpoint of the run, by step: under
    <run_dir>/checkpoints, or <ray.storage_path>/<run name> when the run's config sets a filesystem path
    there (rayjobs/cluster/storage.py). With s3:// or gs:// storage there are none here to read."""
    found = {}
    config = Path(run_dir) / "config.yaml"
    storage = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("ray", {}).get("storage_path") if config.is_file() else None
    if storage and "://" in storage:
        return []
    pattern = f"{Path(run_dir).name}/*/" if storage else "checkpoints/*/"
    for state in Path(storage or run_dir).glob(pattern + checkpoint.STATE):
        if (state.parent / checkpoint.WEIGHTS).is_file() and checkpoint.is_complete(state.parent):  # not one cut off mid-write
            found[json.loads(state.read_text(encoding="utf-8"))["step"]] = state.parent
    return sorted(found.items())


def knob_labels(lora_scales: list[float], aig: list[str]) -> list[tuple[str, str]]:
    """[(kind, knob)] in the order they are evaluated; knob is the label written to the records."""
    return [("lora_scale", f"{s:g}") for s in lora_scales] + [("aig", label) for label in aig]


def _evaluate(worker: Worker, kind: str, knob: str) -> tuple[dict, list]:
    if kind == "lora_scale":
        with lora_scale(worker.policy, float(knob)):
            return worker.evaluate()
    schedule, p, f = parse_aig(knob)
    return worker.evaluate(blend=aig_weights(schedule, worker.cfg.sampler.steps, p=p, f=f))


def evaluate_knobs(cfg: Config, run_dir: Path, lora_scales: list[float], aig: list[str], device: str = "cpu") -> list[dict]:
    """Each knob on each checkpoint (step > 0: step 0 is the base model itself) of the trial in run_dir.

    Returns the records evaluated now; inference.jsonl is rewritten (atomically) with these and the earlier ones.
    """
    run_dir = Path(run_dir)
    known = {(r["step"], r["kind"], r["knob"]): r for r in read_metrics(run_dir, INFERENCE_FILE)}
    todo = [(step, d, [k for k in knob_labels(lora_scales, aig) if (step, *k) not in known]) for step, d in checkpoints(run_dir) if step > 0]
    todo = [t for t in todo if t[2]]
    if not todo:
        return []
    worker = Worker(cfg, LocalContext(run_dir, device))
    new = []
    for step, directory, knobs in todo:
        worker.policy.load_trainable_state_dict(load_file(directory / checkpoint.WEIGHTS))
        for kind, knob in knobs:
            metrics, images = _evaluate(worker, kind, knob)
            grid = run_dir / "samples" / f"step_{step:06d}_{kind}_{knob}.png"
            save_grid(images, grid)
            new.append({"step": step, "kind": kind, "knob": knob, **metrics, "eval/grid": str(grid)})
    records = sorted([*known.values(), *new], key=lambda r: (r["step"], r["kind"], r["knob"]))
    tmp = run_dir / (INFERENCE_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, run_dir / INFERENCE_FILE)
    return new


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
