"""The diffusion model: components, adapters, sampling, objectives, export.

Never imports ray, never names a device, never reads global config
(docs/design.md, dependency direction).
"""

import _draftray_compat  # noqa: F401  (must run before torchvision/diffusers import)
