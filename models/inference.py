"""Inference-time knobs that trade reward for faithfulness without more training.

LoRA scale s (DRaFT, Clark et al. 2023, "LoRA scaling"): the adapters' contribution times s,
0 < s <= 1 interpolates between the base model (s = 0) and the tuned one (s = 1).

Annealed importance guidance (AIG, NeMo-Aligner's DRaFT+ inference; docs/references.md): at denoising
step i of T (i = 0 the noisiest) the sampler uses

    eps_i = (1 - w_i) * eps_base + w_i * eps_tuned

with w_i from a schedule: ``base`` (0), ``draft`` (1), ``linear`` (i/T), ``power`` ((i/T)^p) and
``step`` (1 once i/T >= f). The base model lays out the image early, the tuned model its details late.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: parse_aig is used by the config schema, which must not import peft
    from models.policy import Policy

SCHEDULES = ("base", "draft", "linear", "power", "step")


def aig_weights(schedule: str, steps: int, p: float = 1.0, f: float = 0.5) -> tuple[float, ...]:
    """(w_0, ..., w_{T-1}) for T = ``steps``; i = 0 is the noisiest step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"AIG schedule must be one of {SCHEDULES}, got {schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "power" and p < 0:
        raise ValueError(f"power schedule needs p >= 0, got {p}")
    if schedule == "step" and not 0.0 <= f <= 1.0:
        raise ValueError(f"step schedule needs 0 <= f <= 1, got {f}")
    fractions = [i / steps for i in range(steps)]
    return tuple(
        {"base": 0.0, "draft": 1.0, "linear": x, "power": x**p, "step": float(x >= f)}[schedule] for x in fractions
    )


def parse_aig(label: str) -> tuple[str, float, float]:
    """'linear' | 'base' | 'draft' | 'power_<p>' | 'step_<f>' -> (schedule, p, f); inverse of describe_aig."""
    name, _, arg = label.partition("_")
    try:
        value = float(arg) if arg else None
    except ValueError:
        value = None
    if name in ("linear", "base", "draft") and not arg:
        return name, 1.0, 0.5
    if name in ("power", "step") and value is not None:
        aig_weights(name, 1, p=value if name == "power" else 1.0, f=value if name == "step" else 0.5)  # range checks
        return (name, value, 0.5) if name == "power" else (name, 1.0, value)
    raise ValueError(f"AIG schedule {label!r}: expected linear, base, draft, power_<p> or step_<f> (e.g. power_2, step_0.5)")


def describe_aig(schedule: str, p: float = 1.0, f: float = 0.5) -> str:
    """A short label for plots and tables: linear, power_2, step_0.5, base, draft."""
    return {"power": f"power_{p:g}", "step": f"step_{f:g}"}.get(schedule, schedule)


def _lora_layers(unet: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_scale(policy: Policy, scale: float):
    """Multiply every LoRA layer's scaling by ``scale`` inside the block; the exact values come back after.

    peft computes a LoRA layer as W x + scaling * B A x, so scale 0 is the base model exactly.
    """
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"LoRA scale must be in [0, 1], got {scale}")
    layers = _lora_layers(policy.unet)
    if not layers:
        raise ValueError("LoRA scale needs a LoRA policy (trainable.kind: lora)")
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            for name in layer.scaling:
                layer.scaling[name] = layer.scaling[name] * scale
        yield policy
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.clear()
            layer.scaling.update(scaling)
