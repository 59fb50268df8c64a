"""Reading a config: YAML files (with `extends`), dotted overrides, validation into one-line errors."""

from __future__ import annotations

import re
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rayjobs.config.root import Config
from rayjobs.errors import ECHO_CHARS, UserError, capped


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
        field = capped(".".join(str(p) for p in e["loc"])) or "(top level)"  # a key may be any (long) YAML value
        if e["type"] == "extra_forbidden":
            raise UserError(f"{where} {field}: unknown key{_did_you_mean(e['loc'])} (see rayjobs/config/root.py for the fields)") from None
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"] and re.match(r"^[a-z_]+\.[a-z_.]+: ", msg):  # a cross-section check names its own field
            raise UserError(f"{where} {capped(msg, 500)}") from None
        got = "" if isinstance(e["input"], dict) else f" (got {short_repr(e['input'])})"
        raise UserError(f"{where} {field}: {capped(msg, 500)}{got}") from None


def short_repr(value: Any, limit: int = ECHO_CHARS) -> str:
    """repr(value), at most ``limit`` characters (then '…'): a 100 MB string or a huge list stays one short line.
    reprlib bounds the work as well as the text (it never builds the full repr)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 20
    r.maxlevel = 4
    try:
        text = r.repr(value)
    except ValueError:  # an int too long for repr (Python caps int-to-text conversion at 4300 digits)
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return capped(text, limit)


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


MAX_FILE_BYTES = 1 << 20  # a config file is a few KiB; prompts and data lists belong in data files
MAX_NODES = 1_000_000  # values one YAML document may expand to, each alias use counted in full


class YAMLTooLarge(Exception):
    """A YAML document whose aliases expand beyond MAX_NODES values (or into themselves)."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader (still only plain data) that refuses a key given twice in one mapping -- safe_load
    keeps the last one silently -- and a document whose aliases expand it beyond MAX_NODES values
    (nested aliases, "billion laughs": 500 bytes that validation and error messages would walk as 10**9 items)."""

    def construct_document(self, node):
        _count_nodes(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden by explicit ones: YAML's merge, not a duplicate
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader refuses it with its own message
                if first is not None:
                    again = key_node.start_mark.line
                    lines = f"on line {first + 1} and line {again + 1}" if first != again else f"on line {again + 1}"
                    raise DuplicateKeyError(None, None, f"key {short_repr(key, 60)} given twice, {lines}; keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_huge_int(self, node):
        try:
            return self.construct_yaml_int(node)
        except ValueError:  # Python refuses to parse integers of more than 4300 digits
            raise yaml.constructor.ConstructorError(None, None, "an integer of more than 4300 digits", node.start_mark) from None


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_huge_int)


def _count_nodes(root) -> None:
    """Raise YAMLTooLarge when the node graph, aliases expanded, has more than MAX_NODES nodes (or a cycle).
    Iterative, with each shared node's expanded size computed once, so the bomb itself is never expanded."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])  # fmt: skip
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_NODES:
                raise YAMLTooLarge
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YAMLTooLarge  # an alias inside its own anchor: an infinite structure
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def parse_yaml(text: str) -> Any:
    """YAML text -> plain data with ConfigLoader (raises yaml.YAMLError, YAMLTooLarge, RecursionError)."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """The file's text; UserError unless it is a regular UTF-8 file of at most MAX_FILE_BYTES."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block open() until something writes to it
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
            raise UserError(f"config file {path}: {what}; give a YAML file")
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise UserError(f"config file {path}: cannot read ({err.strerror or err})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"config file {path}: larger than {MAX_FILE_BYTES >> 20} MiB; a config holds settings, "
                        "put long lists in files (data.prompts_file)")  # fmt: skip
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in chain:
        raise UserError(f"config file {path}: 'extends' forms a cycle")
    text = _read_text(path)
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path}: not valid YAML ({at}{what}); fix the file there") from None
    except YAMLTooLarge:
        raise UserError(f"config file {path}: its aliases (*name) expand to more than {MAX_NODES:,} values (or into "
                        "themselves); write the values out instead") from None  # fmt: skip
    except RecursionError:
        raise UserError(f"config file {path}: nested too deeply; fix the file") from None
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
    where = f"override {short_repr(item)}"
    if not sep or not key:
        raise UserError(f"{where}: expected key=value with a dotted key, e.g. objective.kl_coeff=0.5")
    try:
        value = parse_yaml(raw) if raw else ""
    except DuplicateKeyError as err:
        raise UserError(f"{where}: {err.problem}") from None
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself (a run name, a path)
    except (YAMLTooLarge, RecursionError):
        raise UserError(f"{where}: the value's aliases (*name) expand to more than {MAX_NODES:,} values, or it is nested "
                        "too deeply; write the value out") from None  # fmt: skip
    set_dotted(data, key, value, where)


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
