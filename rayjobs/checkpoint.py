"""Checkpoints: trainable weights (safetensors), optimizer + LR schedule, step, RNG states.

Layout of one checkpoint directory (every rank writes its own RNG file; Ray
Train merges the ranks' files into one checkpoint):
    trainable.safetensors   the trainable weights (LoRA A/B or the full UNet) and EMA, rank 0 (ddp only)
    optimizer.pt            optimizer (ddp only), LR-scheduler (and float16 grad-scaler) state dicts, rank 0
    state.json              {"step": optimizer steps done}, rank 0
    rng_rank{r}.pt          torch CPU (and CUDA) RNG state of rank r
    dcp/                    fsdp: weights, optimizer and EMA shards (torch.distributed.checkpoint), every rank
    deepspeed/ckpt/         deepspeed: module + EMA (rank 0) and ZeRO optimizer partitions (every rank)
(rayjobs/sharding.py decides what goes where.)
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
    """``weights`` empty / ``optimizer`` None: kept elsewhere (a sharded strategy)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    if weights:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, directory / WEIGHTS)
    state = {"lr_schedule": lr_schedule.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():  # float16's loss scale (an empty dict otherwise)
        state["grad_scaler"] = scaler.state_dict()
    torch.save(state, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps({"step": step}), encoding="utf-8")


def load(directory: Path, rank: int, optimizer, lr_schedule, scaler=None) -> tuple[int, dict[str, torch.Tensor]]:
    """Restores optimizer (where saved here), schedule and this rank's RNG; returns (step, rank 0's weights on CPU)."""
    directory = Path(directory)
    step = json.loads((directory / STATE).read_text(encoding="utf-8"))["step"]
    weights = load_file(directory / WEIGHTS) if (directory / WEIGHTS).exists() else {}
    opt = torch.load(directory / OPTIMIZER, weights_only=True)
    if "optimizer" in opt:
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


def save_sharded(directory: Path, state: dict) -> None:
    """Collective: torch.distributed.checkpoint writes this rank's shards (``__<rank>_0.distcp``) and rank 0
    the ``.metadata``; file names are rank-distinct, so Ray Train's merge of the ranks' directories is whole."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory: Path, state: dict) -> None:
    """Collective: loads in place into ``state``'s tensors (DTensor shards are resharded to this run's layout)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(directory))
