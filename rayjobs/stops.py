"""Stopping a run on a non-finite loss or gradient (train.on_nonfinite, docs/reliability.md): the message names
the step, the offending prompts and the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from rayjobs.contexts import WorkerContext
from rayjobs.runlog import STOP_FILE, RunLog


def _location(ctx: WorkerContext, step: int, directory: Path | None = None) -> str:
    """Where the step's checkpoint lives, for a message: the context's own answer if it has one."""
    where = getattr(ctx, "checkpoint_location", None)
    if where is not None:
        return where(step)
    return f"the step-{step} checkpoint (step_{step:06d} among the run's Ray checkpoints)"


def _nonfinite_prompts(rank: int, micro_bad: list[torch.Tensor], micro_prompts: list[list[str]]) -> str:
    """This rank's prompts of the micro-batches whose metrics were not finite; all the step's prompts when
    none were (the gradient norm alone, or another rank)."""
    bad = [i for i, flag in enumerate(torch.stack(micro_bad).tolist()) if flag] if micro_bad else []
    if bad:
        names = [p for i in bad for p in micro_prompts[i]]
        return f"prompts {names} (rank {rank}, micro-batch {', '.join(map(str, bad))})"
    names = [p for ps in micro_prompts for p in ps]
    return f"prompts of the step {names} (rank {rank}; its own metrics were finite)"


def _stop(run_dir: Path, log: RunLog | None, step: int, metrics: dict, prompts: str = "", last_good: str | None = None,
          limit: str | None = None) -> None:
    """A non-finite loss or gradient: no update was applied; keep the last good checkpoint and stop. One message
    (metrics.jsonl and the STOPPED file the CLI raises): the step, the prompts, the last good checkpoint."""
    if log is None:
        return
    message = (
        f"non-finite loss or gradient at step {step} (loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')})"
        + (f"; {limit}" if limit else "")
        + (f"; {prompts}" if prompts else "")
        + f"; stopped, last good checkpoint kept: {last_good or 'none yet'}"
    )
    log.log(step, {"stopped": message})
    (run_dir / STOP_FILE).write_text(message + "\n", encoding="utf-8")
