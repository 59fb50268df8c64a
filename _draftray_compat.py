"""Import-time fix-ups shared by every draftray package (imported first by each).

torchvision on CPU-only torch: the only torchvision wheel on PyPI that matches
torch 2.13.0 is a CUDA build. Importing it on the CPU torch fails with
``operator torchvision::nms does not exist`` while it registers fake kernels
for its compiled ops, and transformers/diffusers then fail to import CLIP and
pipeline classes. We never call those ops (nms/qnms are detection ops), so
declaring their schemas lets the Python part of torchvision import. Applied
only when the real ops are absent, so a matching torchvision is left alone.
"""

import torch


def _declare_missing_torchvision_ops() -> None:
    try:
        torch.ops.torchvision.nms  # the real (compiled) op is present
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: keeps a reference below
    for name in ("nms", "qnms"):
        schema_args = "Tensor dets, Tensor scores, float iou_threshold"
        lib.define(f"{name}({schema_args}) -> Tensor")
    _KEEP.append(lib)  # a Library unregisters its ops when garbage-collected


_KEEP: list = []
_declare_missing_torchvision_ops()
