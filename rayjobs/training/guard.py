"""Non-finite losses and gradients (train.on_nonfinite, docs/reliability.md): ``NonFiniteGuard`` stops or skips
such a step, and the stop message names the step, the offending prompts and the last good checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rayjobs.runlog import STOP_FILE, RunLog
from rayjobs.training.contexts import WorkerContext


def checkpoint_location(ctx: WorkerContext, step: int, directory: Path | None = None) -> str:
    """Where the step's checkpoint lives, for a message: the context's own answer if it has one."""
    where = getattr(ctx, "checkpoint_location", None)
    if where is not None:
        return where(step)
    return f"the step-{step} checkpoint (step_{step:06d} among the run's Ray checkpoints)"


def describe_nonfinite_prompts(rank: int, micro_bad: list[torch.Tensor], micro_prompts: list[list[str]]) -> str:
    """This rank's prompts of the micro-batches whose metrics were not finite; all the step's prompts when
    none were (the gradient norm alone, or another rank)."""
    bad = [i for i, flag in enumerate(torch.stack(micro_bad).tolist()) if flag] if micro_bad else []
    if bad:
        names = [p for i in bad for p in micro_prompts[i]]
        return f"prompts {names} (rank {rank}, micro-batch {', '.join(map(str, bad))})"
    names = [p for ps in micro_prompts for p in ps]
    return f"prompts of the step {names} (rank {rank}; its own metrics were finite)"


def write_stop(run_dir: Path, log: RunLog | None, step: int, metrics: dict, prompts: str = "", last_good: str | None = None,
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


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's outcome (Worker.train_step), the same on every rank: the control flags apart from
    the metrics, which are only what is logged and reported (averaged over ranks)."""

    metrics: dict[str, float]
    finite: bool  # False: some rank saw a non-finite loss or gradient norm, and no update was applied
    stop_requested: bool  # a sweep's scheduler asked this trial to stop (rank 0's view, all-reduced)


class NonFiniteGuard:
    """train.on_nonfinite for one rank: "stop" stops at the first non-finite step; "skip" drops such steps and
    stops only after ``max_skipped`` of them in a row. Every rank sees the same all-reduced ``finite`` flag, so
    every rank's guard makes the same choice at the same step."""

    def __init__(self, on_nonfinite: str, max_skipped: int):
        self.skip = on_nonfinite == "skip"
        self.max_skipped = max_skipped
        self.skipped = 0  # non-finite steps skipped in this process (a resumed run counts from 0 again)
        self.consecutive = 0  # non-finite steps in a row, the current one included
        self.limit: str | None = None  # why the run stopped, for the message; None under "stop"

    def should_stop(self, result: StepResult, prompts: str | None = None) -> bool:
        """Called once per step. True: stop the run now (write_stop, with ``limit``). Otherwise, under "skip",
        adds ``skipped_nonfinite``, ``skipped_nonfinite_total`` and, on a skipped step when ``prompts`` is
        given (rank 0: the log's only writer), ``skipped_prompts`` to ``result.metrics``."""
        if not result.finite:
            self.consecutive += 1
            if not self.skip or self.consecutive >= self.max_skipped:
                if self.skip:
                    self.limit = f"{self.consecutive} consecutive non-finite steps (train.max_skipped={self.max_skipped})"
                return True
            self.skipped += 1
        else:
            self.consecutive = 0
        if self.skip:
            result.metrics["skipped_nonfinite"] = float(not result.finite)
            result.metrics["skipped_nonfinite_total"] = float(self.skipped)
            if not result.finite and prompts is not None:
                result.metrics["skipped_prompts"] = prompts
        return False
