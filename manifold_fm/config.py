"""Strict, typed configuration: YAML files and ``key=value`` overrides validated into pydantic models.

Every config section is a :class:`Section` (a pydantic model that forbids unknown keys). This module reads the YAML,
applies dotted overrides, validates, and turns pydantic's report into one :class:`ConfigError` line naming the
dotted key::

    cfg = load_config(ToyRunConfig, "toy-sphere", overrides=["train.steps=200", "flow.path=linear"])

A name without a path separator or suffix resolves to a built-in file ``manifold_fm/configs/<name>.yaml``.

Why pydantic: typed nested sections with defaults, ``Literal`` choices, tuples, paths, numeric bounds and
cross-field validators, all declared once, where a hand-written loader needed its own type converter for each.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Strict, ValidationError

from .atomic import write_text_atomic

BUILTIN_DIR = Path(__file__).parent / "configs"

#: A boolean that accepts only ``true``/``false`` (pydantic would also take ``"yes"`` or ``1``).
StrictBool = Annotated[bool, Strict()]


class ConfigError(ValueError):
    """A configuration problem, stated in one line that names the offending key."""


class Section(BaseModel):
    """A config section: typed fields with defaults; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


S = TypeVar("S", bound=BaseModel)


def builtin_configs() -> list[str]:
    """Names of the configs shipped in ``manifold_fm/configs``."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML file: an existing path, or the built-in config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = builtin_configs()
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a built-in config{hint}; built-in: {', '.join(names) or 'none'}"
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping, with a one-line error for unreadable or malformed files."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def read_source(source: str | Path | Mapping[str, Any] | BaseModel | None) -> dict[str, Any]:
    """A config's raw mapping: from a model (dumped), a mapping (copied), a YAML path or built-in name, or ``{}``."""
    if source is None:
        return {}
    if isinstance(source, BaseModel):
        return to_dict(source)
    if isinstance(source, Mapping):
        return _deep_copy(dict(source))
    return read_yaml(resolve_config(source))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (``["a", "b"]``, ``3``); the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=200)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (a copy); intermediate mappings are created as needed."""
    out = _deep_copy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# pydantic error types -> what the value should have been
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "dict": "a mapping",
    "model": "a section (mapping)",
    "dataclass": "a section (mapping)",
    "path": "a path",
}


def _fields_at(cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the section reached from ``cls`` along ``loc`` (empty if unknown)."""
    node: Any = cls
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return []
        node = fields[part].annotation
        node = next(
            (a for a in getattr(node, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), node
        )
    fields = getattr(node, "model_fields", None)
    return list(fields) if fields else []


def _one_line(cls: type[BaseModel], exc: ValidationError, prefix: str = "") -> str:
    """The first error of a pydantic report as one line naming the dotted key."""
    err = exc.errors(include_url=False)[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    key = prefix + ".".join(str(p) for p in loc)
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        parent = prefix + "".join(f"{p}." for p in loc[:-1])
        hint = f" (did you mean '{parent}{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
        return f"unknown config key '{key}'{hint}"
    if kind == "missing" and loc and isinstance(loc[-1], int):
        return f"{prefix}{'.'.join(str(p) for p in loc[:-1])}: too few values (item {loc[-1]} is missing)"
    if kind == "missing":
        return f"missing required config key '{key}'"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        if not key:
            return msg
        # a section-level validator names its field first ("method: ..."): join it to the section's key
        return f"{key}.{msg}" if re.match(r"^[a-z_]+[:.]", msg) else f"{key}: {msg}"
    base = kind.split("_")[0]
    if base in _EXPECTED and (kind.endswith("_type") or kind.endswith("_parsing") or kind.endswith("_from_float")):
        return f"{key}: expected {_EXPECTED[base]}, got {value!r}"
    return f"{key}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {value!r}"


def validate(cls: type[S], data: Mapping[str, Any], prefix: str = "") -> S:
    """Validate ``data`` into ``cls``; any problem is one :class:`ConfigError` line naming the dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_one_line(cls, exc, prefix)) from None


def load_config(
    cls: type[S], source: str | Path | Mapping[str, Any] | BaseModel | None = None, overrides: Sequence[str] = ()
) -> S:
    """Load ``cls`` from a YAML file or built-in name (or a mapping, a model, or defaults for ``None``) plus
    ``key=value`` overrides."""
    return validate(cls, apply_overrides(read_source(source), overrides))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a config (paths as strings, tuples as lists)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write a config as YAML (atomically: temp file then rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = [
    "BUILTIN_DIR",
    "ConfigError",
    "Section",
    "StrictBool",
    "apply_overrides",
    "builtin_configs",
    "load_config",
    "parse_override",
    "read_source",
    "read_yaml",
    "resolve_config",
    "save_config",
    "to_dict",
    "validate",
]
