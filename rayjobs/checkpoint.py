"""Checkpoints: trainable weights (safetensors), optimizer + LR schedule, step, RNG states.

Layout of one checkpoint directory (every rank writes its own RNG file; Ray
Train merges the ranks' files into one checkpoint):
    trainable.safetensors   the trainable weights (LoRA A/B or the full UNet), rank 0
    optimizer.pt            optimizer, LR-scheduler (and float16 grad-scaler) state dicts, rank 0
    state.json              {"step": optimizer steps done}, rank 0
    rng_rank{r}.pt          torch CPU (and CUDA) RNG state of rank r
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def save(directory: Path, rank: int, step: int, weights: dict, optimizer, lr_schedule, scaler=None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, directory / WEIGHTS)
    state = {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()}
    if scaler is not None and scaler.is_enabled():  # float16's loss scale (an empty dict otherwise)
        state["grad_scaler"] = scaler.state_dict()
    torch.save(state, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps({"step": step}), encoding="utf-8")


def load(directory: Path, rank: int, optimizer, lr_schedule, scaler=None) -> tuple[int, dict[str, torch.Tensor]]:
    """Restores optimizer, schedule and this rank's RNG; returns (step, trainable weights on CPU)."""
    directory = Path(directory)
    step = json.loads((directory / STATE).read_text(encoding="utf-8"))["step"]
    weights = load_file(directory / WEIGHTS)
    opt = torch.load(directory / OPTIMIZER, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    lr_schedule.load_state_dict(opt["lr_schedule"])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in opt:
        scaler.load_state_dict(opt["grad_scaler"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():  # a run resumed on more ranks than it had: new ranks keep their seed
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return step, weights
