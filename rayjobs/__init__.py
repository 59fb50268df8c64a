"""Config schema, training loop, Ray Train/Tune/Jobs glue and the `draftray` CLI.

The only package that imports ray (DESIGN.md, dependency direction).
"""

import _draftray_compat  # noqa: F401  (must run before torchvision/diffusers import)
