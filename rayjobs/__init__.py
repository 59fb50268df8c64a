"""The application around models/ and rewards/: config, data, one rank's training, and the Ray wings.

Only rayjobs.cluster and rayjobs.tune import ray (docs/design.md, "Dependency direction"); the layout,
one line per room, is in docs/design.md too.
"""

import _draftray_compat  # noqa: F401  (must run before torchvision/diffusers import)
from rayjobs import compat

compat.install()
