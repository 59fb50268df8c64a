"""Reading a config: YAML files (with `extends`), dotted overrides, validation into one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rayjobs.config.root import Config
from rayjobs.errors import UserError


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (None = embedded default) + dotted ``key=value`` overrides -> validated Config.

    Raises UserError with one line naming the file or field on any problem.
    """
    data: dict = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        apply_override(data, item)
    return validate(data)


def validate(data: dict, where: str = "config") -> Config:
    """A nested dict -> Config, or UserError with one line naming the first bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            raise UserError(f"{where} {field}: unknown key{_did_you_mean(e['loc'])} (see rayjobs/config/root.py for the fields)") from None
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"] and re.match(r"^[a-z_]+\.[a-z_.]+: ", msg):  # a cross-section check names its own field
            raise UserError(f"{where} {msg}") from None
        got = "" if isinstance(e["input"], dict) else f" (got {e['input']!r})"
        raise UserError(f"{where} {field}: {msg}{got}") from None


def _did_you_mean(loc: tuple) -> str:
    """'; did you mean kl_coeff?' for an unknown key close to a field of its section ('' if none is)."""
    import difflib
    import typing

    from pydantic import BaseModel

    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return ""
        todo, model = [field.annotation], None
        while todo and model is None:  # unwrap Optional[X], list[X], ... to the section's model
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
            todo.extend(typing.get_args(t))
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in chain:
        raise UserError(f"config file {path}: 'extends' forms a cycle")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"config file {path}: cannot read ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path}: not valid YAML ({at}{what}); fix the file there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: top level must be a mapping of sections")
    base = data.pop("extends", None)
    if base is None:
        return data
    # A preset builds on a base: `extends: other.yaml` (relative to this file), then this file's keys win.
    return _merge(_read_yaml(path.parent / str(base), chain + (path.resolve(),)), data)


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: sections merge key by key, any other value in ``top`` replaces the base's."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(data: dict, item: str) -> None:
    """``key=value`` (value parsed as YAML) into the nested dict ``data``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: expected key=value with a dotted key, e.g. objective.kl_coeff=0.5")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    set_dotted(data, key, value, f"override {item!r}")


def set_dotted(data: dict, key: str, value: Any, where: str = "") -> None:
    """data['a']['b'] = value for key 'a.b', creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where or key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds), secrets redacted
    (rayjobs/redaction.py, docs/security.md: a value pasted into a config never lands in a run directory)."""
    from rayjobs.redaction import redact

    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)
