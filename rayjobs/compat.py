"""Module paths from before ``rayjobs/`` was split into wings (config/, data/, training/, cluster/, tune/, tools/).

Run and sweep directories written by draftray 0.1 name some of these paths: Tune's ``tuner.pkl`` refers
to the sweep's callbacks by module and class (``rayjobs.sweep_resources.ReleaseTrainResources``), and
users' scripts may import the old names. A meta-path finder answers an import of an old path with the
module at its new path, so such directories still resume (``draftray sweep --resume``) and such imports
still work. Kept for one release; docs/design.md lists the layout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module -> its new home. rayjobs.config and rayjobs.data keep their names (now packages).
OLD_MODULES = {
    "rayjobs.schema": "rayjobs.config.base",
    "rayjobs.config_data": "rayjobs.config.data",
    "rayjobs.config_model": "rayjobs.config.model",
    "rayjobs.config_objective": "rayjobs.config.objective",
    "rayjobs.config_perf": "rayjobs.config.perf",
    "rayjobs.config_ray": "rayjobs.config.cluster",
    "rayjobs.config_reward": "rayjobs.config.reward",
    "rayjobs.config_sweep": "rayjobs.config.sweep",
    "rayjobs.data_tables": "rayjobs.data.tables",
    "rayjobs.image_dataset": "rayjobs.data.images",
    "rayjobs.prompt_data": "rayjobs.data.prompts",
    "rayjobs.batches": "rayjobs.data.batches",
    "rayjobs.latent_cache": "rayjobs.data.latent_cache",
    "rayjobs.text_cache": "rayjobs.data.text_cache",
    "rayjobs.loop": "rayjobs.training.loop",
    "rayjobs.optim": "rayjobs.training.optim",
    "rayjobs.checkpoint": "rayjobs.training.checkpoint",
    "rayjobs.sharding": "rayjobs.training.sharding",
    "rayjobs.contexts": "rayjobs.training.contexts",
    "rayjobs.stops": "rayjobs.training.guard",
    "rayjobs.prepare": "rayjobs.training.prepare",
    "rayjobs.class_images": "rayjobs.training.class_images",
    "rayjobs.validation": "rayjobs.training.validation",
    "rayjobs.train": "rayjobs.cluster.driver",
    "rayjobs.worker": "rayjobs.cluster.worker",
    "rayjobs.storage": "rayjobs.cluster.storage",
    "rayjobs.submit": "rayjobs.cluster.submit",
    "rayjobs.sweep": "rayjobs.tune.sweep",
    "rayjobs.sweep_resources": "rayjobs.tune.resources",
    "rayjobs.knobs": "rayjobs.tune.inference_points",
    "rayjobs.pareto": "rayjobs.tune.pareto",
    "rayjobs.pareto_plot": "rayjobs.tune.plot",
    "rayjobs.sample": "rayjobs.tools.sample",
    "rayjobs.score": "rayjobs.tools.score",
    "rayjobs.weights": "rayjobs.tools.weights",
    "rayjobs.toy": "rayjobs.tools.toy",
    "rayjobs.toy_data": "rayjobs.tools.toy_data",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the new module itself (one module object under two names, no copy)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(OLD_MODULES[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    """Put the finder on sys.meta_path once (rayjobs/__init__.py calls this)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
