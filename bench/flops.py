"""Model FLOPs utilisation: FLOPs of one step counted by torch's FlopCounterMode, over time and the GPU's peak.

    MFU = counted FLOPs of one step / (step time * dense bf16 peak of the GPU)

FlopCounterMode counts every matmul, convolution and attention (SDPA) call it sees, forward and backward,
with their analytic formulas; elementwise work (norms, activations) is not counted, as usual for MFU.
Counting needs an eager step: a compiled graph's kernels are not dispatched one by one (bench/gpu.py
counts on the eager UNet, the same math). Recomputation under checkpointing is counted, since it runs.
"""

from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, from the vendors' data sheets. Matched in this order
# against torch.cuda.get_device_name() (so "H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward and backward, whatever it runs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def mfu(flops: int, seconds: float, peak: float | None) -> float | None:
    """FLOPs per second as a fraction of ``peak`` TFLOPS (None without a peak)."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
