"""The `perf:` section: speed switches that leave the result unchanged (docs/performance.md).

Every switch is off by default, and each is tested to give the same loss as with it off
(tests/test_perf.py). models/perf.py applies them; rayjobs/training/loop.py (Worker) calls it.
The memory-for-compute switches are elsewhere: trainable.gradient_checkpointing, memory.*.
DDP's gradient buckets are ray.ddp_bucket_cap_mb / ray.ddp_gradient_as_bucket_view.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from rayjobs.config.base import Strict


class PerfConfig(Strict):
    attention: Literal["default", "sdpa", "xformers", "math"] = Field(
        "default",
        description="the UNet's attention processor: default (diffusers' choice: PyTorch SDPA on torch 2), sdpa "
        "(AttnProcessor2_0: torch's flash / memory-efficient kernels on CUDA), xformers (XFormersAttnProcessor; "
        "pip install xformers), math (AttnProcessor: plain matmul + softmax, the reference implementation)",
    )
    channels_last: bool = Field(
        False, description="UNet and VAE weights (and so their conv activations) in channels_last memory format: "
        "faster convolutions on tensor-core GPUs under bf16/fp16; no effect on results"
    )
    compile: Literal["none", "sampling", "all"] = Field(
        "none",
        description="torch.compile the UNet: sampling = only the no-grad calls (the T-K sampling steps, evaluation); "
        "all = also the gradient steps and the supervised terms. The first call of each shape compiles (tens of "
        "seconds per graph, reported as the compile_s metric); the gradient path's module is never replaced",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile mode: default, reduce-overhead (CUDA graphs of the fixed-shape no-grad steps; CUDA "
        "only), max-autotune (Triton GEMM autotuning; minutes of compile time)",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend: inductor (generated kernels: the fast one), aot_eager or eager "
        "(no code generation: for debugging a graph break or a wrong result)"
    )
    reward_dtype: Literal["model", "float32", "bfloat16"] = Field(
        "model",
        description="the reward model's weights and compute dtype: model (= model.dtype, under its autocast), float32 "
        "(autocast off inside the reward), bfloat16 (bf16 weights under bf16 autocast, even with model.dtype float32: "
        "half the reward's memory; scores differ from float32 by bf16 rounding, ~1e-2 relative)",
    )

    @field_validator("attention")
    @classmethod
    def _xformers_installed(cls, value: str) -> str:
        if value == "xformers":
            from diffusers.utils import is_xformers_available

            if not is_xformers_available():
                raise ValueError("xformers is not installed (pip install xformers, built for this torch); use sdpa")
        return value

    @field_validator("compile_mode")
    @classmethod
    def _mode_needs_compile(cls, value: str, info: ValidationInfo) -> str:
        if value != "default" and info.data.get("compile") == "none":
            raise ValueError(f"{value} needs perf.compile sampling or all (it is none)")
        return value
