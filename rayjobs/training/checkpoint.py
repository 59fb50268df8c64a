"""Checkpoints: trainable weights (safetensors), optimizer + LR schedule, step, RNG states.

Layout of one checkpoint directory (every rank writes its own RNG file; Ray
Train merges the ranks' files into one checkpoint):
    trainable.safetensors   the trainable weights (LoRA A/B or the full UNet) and EMA, rank 0 (ddp only)
    optimizer.pt            optimizer (ddp only), LR-scheduler (and float16 grad-scaler) state dicts, rank 0
    state.json              {"step": optimizer steps done}, rank 0
    rng_rank{r}.pt          torch CPU (and CUDA) RNG state of rank r
    dcp/                    fsdp: weights, optimizer and EMA shards (torch.distributed.checkpoint), every rank
    deepspeed/ckpt/         deepspeed: module + EMA (rank 0) and ZeRO optimizer partitions (every rank)
    manifest.json           rank 0, written last: each of its files with size and sha256, the world size
    manifest_rank{r}.json   rank r > 0, written last: its RNG file (and the names of its shard files)
(rayjobs/training/sharding.py decides what goes where.)

Atomic (docs/reliability.md): every file is written under a temporary name in the same directory,
fsynced and ``os.replace``d into place, and a rank's manifest comes after all its files. A checkpoint
is complete only when rank 0's manifest and those of every rank it names are there and the files
match them: ``load`` (``verify``) refuses anything else. Shard files (dcp/, deepspeed/) are written by
their libraries (DCP writes its ``.metadata`` last); the manifests name them (presence is checked, not
their bytes: ranks may write same-named files there).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

# The manifests and their check need no torch (the driver checks checkpoints before a run): rayjobs/training/manifest.py.
from rayjobs.training.manifest import FORMAT, MANIFEST, CheckpointError, is_complete, manifest_name, sha256, verify  # noqa: F401

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
TMP_PREFIX = ".tmp-"  # files being written; never part of a checkpoint

logger = logging.getLogger(__name__)

# Test hook: called with each file's final path right after it is in place (tests/test_reliability.py).
on_file_written: Callable[[Path], None] | None = None


def _fsync(path: Path) -> None:
    """Flush ``path`` to the disk. A failure does not stop the save (the rename still makes the file whole
    under its name), but the file may not survive a power loss, so it is logged (docs/reliability.md)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        logger.warning("checkpoint: cannot open %s to fsync it (%s); it may not survive a crash of the machine", path, err)
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if not path.is_dir():  # some filesystems refuse fsync on a directory (EINVAL): expected, not a loss
            logger.warning("checkpoint: fsync of %s failed (%s); it may not survive a crash of the machine", path, err)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name next to ``path``, fsync, then rename it into place."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if on_file_written is not None:
        on_file_written(path)


def begin(directory: Path, rank: int) -> None:
    """Before anything of a (re)written checkpoint: drop this rank's old manifest, so it is incomplete until done."""
    (Path(directory) / manifest_name(rank)).unlink(missing_ok=True)


def save(directory: Path, rank: int, step: int, weights: dict, optimizer, lr_schedule, scaler=None, world_size: int = 1) -> None:
    """``weights`` empty / ``optimizer`` None: kept elsewhere (a sharded strategy). Writes this rank's manifest last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    begin(directory, rank)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    written = [f"rng_rank{rank}.pt"]
    _write_atomic(directory / written[0], lambda p: torch.save(rng, p))
    if rank == 0:
        if weights:
            tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            _write_atomic(directory / WEIGHTS, lambda p: save_file(tensors, p))
            written.append(WEIGHTS)
        state = {"lr_schedule": lr_schedule.state_dict()}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scaler is not None and scaler.is_enabled():  # float16's loss scale (an empty dict otherwise)
            state["grad_scaler"] = scaler.state_dict()
        _write_atomic(directory / OPTIMIZER, lambda p: torch.save(state, p))
        _write_atomic(directory / STATE, lambda p: p.write_text(json.dumps({"step": step}), encoding="utf-8"))
        written += [OPTIMIZER, STATE]
    sharded = sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*")
        if p.is_file() and p.parent != directory and not p.name.startswith(TMP_PREFIX)
    )
    manifest = {
        "format": FORMAT,
        "rank": rank,
        "step": step,
        "world_size": world_size,
        "files": {name: {"size": (directory / name).stat().st_size, "sha256": sha256(directory / name)} for name in written},
        "sharded": sharded,
    }
    _write_atomic(directory / manifest_name(rank), lambda p: p.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
    _fsync(directory)


def load(directory: Path, rank: int, optimizer, lr_schedule, scaler=None) -> tuple[int, dict[str, torch.Tensor]]:
    """Restores optimizer (where saved here), schedule and this rank's RNG; returns (step, rank 0's weights on CPU).
    Refuses (CheckpointError) a checkpoint that ``verify`` does not pass."""
    directory = Path(directory)
    verify(directory)
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
