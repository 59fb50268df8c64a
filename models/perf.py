"""Speed switches applied to modules (docs/performance.md): attention processor, channels_last,
torch.compile of the no-grad UNet calls, the reward's precision. Pure functions on modules: no global
config, no device named; rayjobs/training/loop.py calls them from the `perf:` section.

None of them changes what is computed, only how (tests/test_perf.py compares each with it off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

ATTENTION = {"sdpa": AttnProcessor2_0, "xformers": XFormersAttnProcessor, "math": AttnProcessor}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def set_attention(unet: torch.nn.Module, kind: str) -> None:
    """Every attention layer of ``unet`` gets the processor ``kind`` ('default' leaves diffusers' choice).
    LoRA is unaffected: the processors call the (peft-wrapped) to_q/to_k/to_v/to_out projections."""
    if kind == "default":
        return
    if kind not in ATTENTION:
        raise ValueError(f"attention must be default or one of {', '.join(ATTENTION)}, got {kind!r}")
    if kind == "xformers":
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ValueError("attention xformers: xformers is not installed (pip install xformers); use sdpa")
    unet.set_attn_processor(ATTENTION[kind]())


def channels_last(*modules: torch.nn.Module | None) -> None:
    """4-d weights (convolutions) to channels_last, in place: the convolutions then run NHWC (tensor cores
    prefer it); inputs need no conversion, torch's conv follows the weight's format."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


@dataclass
class CompileStats:
    """What the compiled UNet did: calls it served, and the wall time of each new signature's first call
    (compilation + one run; the steady-state cost of one call is the difference to a later one)."""

    calls: int = 0
    compile_s: float = 0.0
    seen: set = field(default_factory=set)


class NoGradCompiled:
    """A UNet callable that sends no-grad calls to a compiled UNet and calls with grad to ``eager``.

    ``compiled`` wraps the very same module (torch.compile shares its parameters), so an optimizer step
    on the LoRA weights is seen by the next compiled call; ``eager`` (the UNet, or its DDP wrapper) keeps
    the gradient path as it was. ``grad_compiled``: a compiled ``eager`` for the calls with grad
    (perf.compile all). ``cudagraphs``: mark each call a new step for CUDA graphs (mode reduce-overhead),
    whose outputs a later replay overwrites (the caller combines them into new tensors at once).
    """

    def __init__(self, eager: Callable, compiled: Callable, grad_compiled: Callable | None = None,
                 cudagraphs: bool = False, stats: CompileStats | None = None):
        self.eager, self.compiled, self.grad_compiled = eager, compiled, grad_compiled
        self.cudagraphs = cudagraphs
        self.stats = stats if stats is not None else CompileStats()

    def with_eager(self, eager: Callable) -> "NoGradCompiled":
        """The same compiled UNet (and statistics) with another gradient path (Worker.unwrapped)."""
        return NoGradCompiled(eager, self.compiled, None, self.cudagraphs, self.stats)

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        grad = torch.is_grad_enabled()  # a Python flag: no host sync
        net = self.compiled if not grad else self.eager if self.grad_compiled is None else self.grad_compiled
        if net is self.eager:
            return net(sample, *args, **kwargs)
        if self.cudagraphs and not grad:
            torch.compiler.cudagraph_mark_step_begin()
        self.stats.calls += 1
        key = (grad, torch.is_inference_mode_enabled(), tuple(sample.shape), sample.dtype)
        if key in self.stats.seen:
            return net(sample, *args, **kwargs)
        t0 = time.perf_counter()
        out = net(sample, *args, **kwargs)
        self.stats.compile_s += time.perf_counter() - t0
        self.stats.seen.add(key)
        return out


def compile_unet(unet: torch.nn.Module, eager: Callable | None = None, scope: str = "sampling", mode: str = "default",
                 backend: str = "inductor") -> NoGradCompiled:
    """torch.compile ``unet`` for its no-grad calls (scope 'sampling') or all calls ('all': ``eager``, the
    gradient path's module, compiled too). Compilation is lazy: the first call of each shape pays it."""
    if scope not in ("sampling", "all"):
        raise ValueError(f"compile scope must be sampling or all, got {scope!r}")
    options = dict(backend=backend, mode=None if mode == "default" else mode, dynamic=False)
    eager = eager if eager is not None else unet
    compiled = torch.compile(unet, **options)
    grad_compiled = None
    if scope == "all":  # the same compiled module when there is no wrapper (one cache, grad modes guarded apart)
        grad_compiled = compiled if eager is unet else torch.compile(eager, **options)
    return NoGradCompiled(eager, compiled, grad_compiled, cudagraphs=mode == "reduce-overhead")


class RewardPrecision(torch.nn.Module):
    """A reward run in its own dtype, whatever the surrounding autocast: float32 (autocast off inside) or
    bfloat16 (bf16 weights, bf16 autocast inside). Same contract: (images [B,3,H,W] in [0,1], prompts) ->
    float32 [B]; ``parts`` is passed through when the reward has it (rewards.combine.RewardSum)."""

    def __init__(self, reward: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.reward, self.dtype = reward, dtype
        reward.to(dtype=dtype)
        if hasattr(reward, "parts"):
            self.parts = self._parts

    def _run(self, fn, images: torch.Tensor, prompts):
        device = images.device.type
        bf16 = self.dtype == torch.bfloat16
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return fn(images.to(self.dtype), prompts)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return self._run(self.reward, images, prompts).float()

    def _parts(self, images: torch.Tensor, prompts):
        total, parts = self._run(self.reward.parts, images, prompts)
        return total.float(), {name: r.float() for name, r in parts.items()}


def reward_in(reward, dtype: str):
    """``reward`` wrapped to run in ``dtype`` ('float32' or 'bfloat16'); 'model' returns it as it is (it runs
    in model.dtype under the step's autocast), as is a plain-callable reward (no weights to cast)."""
    if dtype == "model" or not isinstance(reward, torch.nn.Module):
        return reward
    if dtype not in DTYPES:
        raise ValueError(f"reward dtype must be model, float32 or bfloat16, got {dtype!r}")
    return RewardPrecision(reward, DTYPES[dtype])
