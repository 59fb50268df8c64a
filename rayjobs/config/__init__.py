"""The config schema and its loading. Every field says its meaning and unit ("per worker" where so).

``Config()`` with no arguments is the embedded default (== configs/toy.yaml). The sections live in their
own modules (model, objective, data, reward, cluster, perf, sweep); ``root`` assembles them with the small
ones (trainable, optim, train, run) and the cross-section checks; ``load`` reads YAML with ``extends`` and
dotted overrides. Callers import the public names from here.
"""

from rayjobs.config.load import apply_override, load_config, set_dotted, to_yaml, validate
from rayjobs.config.root import PARAM_GROUPS, Config, OptimConfig, Phase, PlaceholderToken, RunConfig, TrainableConfig, TrainConfig

__all__ = [
    "PARAM_GROUPS",
    "Config",
    "OptimConfig",
    "Phase",
    "PlaceholderToken",
    "RunConfig",
    "TrainConfig",
    "TrainableConfig",
    "apply_override",
    "load_config",
    "set_dotted",
    "to_yaml",
    "validate",
]
