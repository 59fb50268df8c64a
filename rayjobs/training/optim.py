"""Optimizer, learning-rate schedule and EMA over the policy's parameter groups.

Groups (models/policy.Policy.param_groups): ``unet``, ``text_encoder``, ``tokens``, each with its own
learning rate (optim.lr, optim.text_encoder_lr, optim.token_lr). The schedule is a linear warmup
times the phase factor: with optim.phases (pivotal tuning), a group trains only in the phases that
name it, at that phase's lr; elsewhere its lr is 0, so AdamW leaves it bit-identical (the decoupled
weight decay is scaled by lr too).
"""

from __future__ import annotations

import torch

from models.policy import Policy
from rayjobs.config import OptimConfig
from rayjobs.errors import UserError


def build_optimizer(policy: Policy, o: OptimConfig) -> torch.optim.Optimizer:
    groups = [{"params": params, "lr": o.group_lr(name), "name": name} for name, params in policy.param_groups().items()]
    missing = sorted({g for phase in o.phases for g in phase.lr} - {g["name"] for g in groups})
    if missing:
        raise UserError(f"optim.phases: parameter group(s) {missing} have nothing to train (see the trainable section)")
    kwargs = dict(betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    if o.name == "adamw8bit":
        return _adamw8bit(groups, kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _adamw8bit(groups: list[dict], kwargs: dict) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: both moments in 8 bits (block-wise quantised) for tensors of at least
    4096 elements, 32-bit for smaller ones (its min_8bit_size). It runs on CUDA, and on CPU since 0.48."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("optim.name adamw8bit: bitsandbytes is not installed (pip install 'draftray[8bit]'), or use adamw") from None
    return bnb.optim.AdamW8bit(groups, **kwargs)


def phase_factor(o: OptimConfig, group: str, step: int) -> float:
    """lr multiplier of ``group`` at optimizer step ``step`` (0-based) from optim.phases; 1 without phases."""
    if not o.phases:
        return 1.0
    end = 0
    for phase in o.phases:
        end += phase.steps
        if step < end:
            return phase.lr.get(group, 0.0) / o.group_lr(group)
    return o.phases[-1].lr.get(group, 0.0) / o.group_lr(group)  # past the schedule: the last phase


def build_schedule(optimizer: torch.optim.Optimizer, o: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over optim.warmup_steps, times each group's phase factor."""
    warm = max(o.warmup_steps, 0)

    def factor(name: str):
        return lambda s: min(1.0, (s + 1) / (warm + 1)) * phase_factor(o, name, s)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["name"]) for g in optimizer.param_groups])


class EMA:
    """Exponential moving average of the trainable weights: shadow <- decay * shadow + (1 - decay) * w."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averages (call twice to undo), e.g. around an export."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(state[str(i)])
