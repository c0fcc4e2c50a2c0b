"""Load pydantic models from YAML with strict keys and types.

Generic machinery only; the project's own config classes live in `config.py`.
Every error names the dotted key and where the value came from (a file and
line, or a command-line override).
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

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

    def _override_of(self, dotted: str) -> str | None:
        """The override that set `dotted`, a key inside it, or a section holding it."""
        for key, override in self.overrides.items():
            if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
                return override
        return None

    def line_of(self, dotted: str) -> int:
        """For ordering problems: the key's line in the file, after the file for an override."""
        if self._override_of(dotted) is not None:
            return 1 << 30
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.key_lines:
                return self.key_lines[".".join(parts[:end])]
        return 0

    def describe(self, dotted: str) -> str:
        override = self._override_of(dotted)
        if override is not None:
            return f"command-line override '{override}'"
        if self.file is None:
            return "<defaults>"
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):  # nearest enclosing key with a known line
            line = self.key_lines.get(".".join(parts[:end]))
            if line is not None:
                return f"{self.file}:{line}"
        return self.file


def yaml11_float(value: Any) -> Any:
    """PyYAML reads "1e-5" (no dot) as a string; give such a string back as the float it means."""
    if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
        return float(value)
    return value


TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}
BOUND_SYMBOLS = {"ge": (">=", "["), "gt": (">", "("), "le": ("<=", "]"), "lt": ("<", ")")}


def validate(cls: type[BaseModel], data: Any, origin: Origin) -> Any:
    """`cls` validated from plain data; a problem raises ConfigError naming the key and where it came from.

    With several problems, the one given first in the file is reported.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = [_explain(cls, error, origin) for error in err.errors()]
        raise ConfigError(min(problems)[1]) from None


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: `Model`, or the item of `list[Model]`; None for a plain value."""
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _field_at(cls: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model holding the last named key of `loc`, and that key's field (None past the model tree).
    A list index steps into the list's item model."""
    model, info = cls, None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            break
        info = model.model_fields[part]
        model = section_model(info.annotation) or model
    return model, info


def _explain(cls: type[BaseModel], error: dict, origin: Origin) -> tuple[int, str]:
    """(line in the file, for ordering; the message) of one pydantic error."""
    kind, value = error["type"], error.get("input")
    keys = [part for part in error["loc"] if isinstance(part, str)]  # the rest are list indices
    dotted = "".join(f".{part}" if isinstance(part, str) else f"[{part}]" for part in error["loc"])[1:] or "<top level>"
    where = origin.describe(".".join(keys))
    line = origin.line_of(".".join(keys))
    section = dotted.rpartition(".")[0] or "<top level>"  # the key's section, with list indices
    if kind == "extra_forbidden":
        parent, _ = _field_at(cls, tuple(keys[:-1]))
        known = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(keys[-1], known, n=1)
        prefix = section + "." if len(keys) > 1 else ""
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
        return line, f"{where}: unknown key '{dotted}'{hint}"
    if kind in TYPE_NAMES:
        return line, f"{where}: '{dotted}' must be {TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        _, info = _field_at(cls, tuple(keys))
        allowed = list(typing.get_args(info.annotation)) if info is not None else error["ctx"]["expected"]
        return line, f"{where}: '{dotted}' must be one of {allowed}, got {value!r}"
    if kind == "list_type":
        return line, f"{where}: '{dotted}' must be a list, got {type(value).__name__} {value!r}"
    if kind == "model_type":
        return line, f"{where}: '{dotted}' must be a mapping, got {type(value).__name__} {value!r}"
    if kind == "value_error":  # a validator's message, which starts with the field it is about
        message = str(error["ctx"]["error"])
        if not _is_leaf(cls, keys):  # a whole-section check: point at the field the message names
            model, _ = _field_at(cls, error["loc"])
            culprit = next((name for name in model.model_fields if message.startswith(name)), None)
            section = dotted if keys else "<top level>"
            if culprit is not None:
                where, line = origin.describe(".".join([*keys, culprit])), origin.line_of(".".join([*keys, culprit]))
        return line, f"{where}: invalid '{section}': {message}"
    if kind in ("finite_number", "too_short") or kind.startswith(("greater_than", "less_than")):
        return line, f"{where}: invalid '{section}': {keys[-1]} {_bounds(cls, keys, kind)}, got {value!r}"
    return line, f"{where}: '{dotted}': {error['msg']}, got {value!r}"


def _is_leaf(cls: type[BaseModel], keys: list[str]) -> bool:
    """True when `keys` names a plain value, not a section or a list of them (nor the top level)."""
    _, info = _field_at(cls, tuple(keys))
    return info is not None and section_model(info.annotation) is None


def _bounds(cls: type[BaseModel], keys: list[str], kind: str) -> str:
    """'must be > 0', 'must be in [0, 1)', 'must be finite' or 'must not be empty', from the field's constraints."""
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "too_short":
        return "must not be empty"
    _, info = _field_at(cls, tuple(keys))
    bounds = {
        name: getattr(item, name)
        for item in (info.metadata if info else [])
        for name in BOUND_SYMBOLS
        if getattr(item, name, None) is not None
    }
    low = next(((name, bounds[name]) for name in ("ge", "gt") if name in bounds), None)
    high = next(((name, bounds[name]) for name in ("le", "lt") if name in bounds), None)
    if low and high:
        return f"must be in {BOUND_SYMBOLS[low[0]][1]}{low[1]:g}, {high[1]:g}{BOUND_SYMBOLS[high[0]][1]}"
    name, bound = low or high
    return f"must be {BOUND_SYMBOLS[name][0]} {bound:g}"


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


def load(cls: type[BaseModel], path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Any:
    """Load model `cls` from a YAML file (or defaults when `path` is None) plus overrides."""
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
    return validate(cls, data, origin)


def to_dict(obj: BaseModel) -> dict:
    return obj.model_dump()


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def flow_yaml(value: Any) -> str:
    """A setting's value as YAML in one line (a list of sections as plain mappings)."""
    if isinstance(value, list):
        value = [item.model_dump() if isinstance(item, BaseModel) else item for item in value]
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 16).strip()[1:-1]


def dump_described(model: BaseModel, indent: str = "") -> str:
    """`dump`, with each field's description as a comment on its line (the result loads back the same)."""
    lines = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        comment = f"  # {info.description}" if info.description else ""
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:{comment}\n" + dump_described(value, indent + "  "))
        else:
            flow = flow_yaml(value)
            lines.append(f"{indent}{name}: {flow}{comment}\n")
    return "".join(lines)
