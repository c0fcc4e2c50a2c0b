"""Build nested dataclasses from YAML with strict keys and types.

Generic machinery only; the project's own config classes live in `config.py`.
Every error names the dotted key and where the value came from (a file and
line, or a command-line override).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config."""


def yaml_key_lines(text: str, source: str = "<yaml>") -> dict[str, int]:
    """Map each dotted key of a YAML mapping document to its 1-based line.

    A key given twice in one mapping is an error (YAML loaders silently keep the last one).
    """
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if dotted in lines:
                raise ConfigError(f"{source}:{line}: duplicate key '{dotted}' (first given at line {lines[dotted]})")
            lines[dotted] = line
            walk(value_node, dotted + ".")

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return lines


class Origin:
    """Says where a dotted key came from, for error messages."""

    def __init__(self, file: str | None = None, key_lines: dict[str, int] | None = None):
        self.file = file
        self.key_lines = key_lines or {}
        self.overrides: dict[str, str] = {}

    def describe(self, dotted: str) -> str:
        for key, override in self.overrides.items():
            if key == dotted or key.startswith(dotted + "."):
                return f"command-line override '{override}'"
        if self.file is None:
            return "<defaults>"
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):  # nearest enclosing key with a known line
            line = self.key_lines.get(".".join(parts[:end]))
            if line is not None:
                return f"{self.file}:{line}"
        return self.file


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, dotted: str, origin: Origin) -> Any:
    """Check `value` against the annotation `tp`, recursing into dataclasses and lists."""
    where = origin.describe(dotted)
    kind = typing.get_origin(tp)
    if kind in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, dotted, origin)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: '{dotted}': {value!r} matches none of {_type_name(tp)}"
        )
    if kind is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: '{dotted}' must be one of {list(allowed)}, got {value!r}")
        return value
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{dotted}' must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item, item_tp, f"{dotted}[{i}]", origin) for i, item in enumerate(value)]
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{dotted}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, origin, prefix=dotted + ".")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
        return float(value)  # PyYAML reads "1e-5" (no dot) as a string
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: '{dotted}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: '{dotted}' has an unsupported annotation {_type_name(tp)}")


def build(cls: type, data: Any, origin: Origin, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    section = prefix.rstrip(".") or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin.describe(section)}: '{section}' must be a mapping, got {type(data).__name__} {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"{origin.describe(dotted)}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, origin)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        culprit = next((n for n in names if str(err).startswith(n)), None)  # validation messages start with the field
        where = origin.describe(f"{prefix}{culprit}" if culprit else section)
        raise ConfigError(f"{where}: invalid '{section}': {err}") from err


def apply_override(data: dict, override: str, origin: Origin) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise ConfigError(f"override '{override}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': value is not valid YAML: {_yaml_problem(err)}") from err
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    origin.overrides[dotted] = override


def _yaml_error_line(err: yaml.YAMLError) -> str:
    """':LINE' of the construct that failed (an unclosed bracket's own line, not the end of the file)."""
    mark = getattr(err, "context_mark", None) or getattr(err, "problem_mark", None)
    return f":{mark.line + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message in one line, without its '<unicode string>' position blocks."""
    problem = getattr(err, "problem", None)
    if problem is None:
        return str(err)
    mark, context, context_mark = (getattr(err, name, None) for name in ("problem_mark", "context", "context_mark"))
    text = problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")
    if context:
        text += f" ({context}" + (f", from line {context_mark.line + 1})" if context_mark is not None else ")")
    return text


def load(cls: type, path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Any:
    """Load dataclass `cls` from a YAML file (or defaults when `path` is None) plus overrides."""
    origin = Origin()
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not a YAML text file (not UTF-8: byte 0x{err.object[err.start]:02x} at offset {err.start})"
            ) from err
        try:
            data = yaml.safe_load(text) or {}
            origin = Origin(str(path), yaml_key_lines(text, str(path)))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}{_yaml_error_line(err)}: not valid YAML: {_yaml_problem(err)}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override, origin)
    return build(cls, data, origin)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)
