"""Config: presets load, the embedded default is configs/toy.yaml, overrides and `extends` merge."""

from pathlib import Path

import pytest

from rayjobs.config import Config, load_config, to_yaml
from rayjobs.errors import UserError

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(path):
    load_config(path)


def test_toy_yaml_is_the_embedded_default():
    assert load_config(CONFIGS / "toy.yaml") == Config() == load_config(None)


def test_extends_merges_sections_key_by_key():
    draft = load_config(CONFIGS / "sd15-draft.yaml")
    base = load_config(CONFIGS / "sd15-draftplus.yaml")
    assert draft.objective.weights.kl_coeff == 0.0 and base.objective.weights.kl_coeff == 0.2
    assert draft.sampler == base.sampler and draft.model == base.model


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_overrides_parse_yaml_values_and_win_over_file():
    cfg = load_config(CONFIGS / "toy.yaml", ["optim.lr=3e-4", "data.eval_seeds=[5, 6]", "ray.use_gpu=true"])
    assert cfg.optim.lr == 3e-4 and cfg.data.eval_seeds == [5, 6] and cfg.ray.use_gpu is True


def test_preset_kl_defaults():
    assert load_config(None, ["objective.kl_coeff=null"]).objective.weights.kl_coeff == 0.03
    assert load_config(None, ["objective.preset=draft", "objective.kl_coeff=null"]).objective.weights.kl_coeff == 0.0


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):
                yield from walk(ann)
            else:
                yield f"{model.__name__}.{name}", field.description

    undocumented = [name for name, desc in walk(Config) if not desc]
    assert not undocumented
