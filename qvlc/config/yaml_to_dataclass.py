"""Building a typed, frozen dataclass tree from parsed YAML: every key known (with a did-you-mean), every value
of its annotated type (booleans, integers, enums and string lists strictly), every error a ConfigError naming
the key and the fix. Generic: knows nothing of qvlc's own keys beyond the ``auto`` word and the hidden fields."""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from qvlc.errors import ConfigError, quoted

AUTO = "auto"  # export.fp32_layers: auto (the modules the range check flags)
HIDDEN_FIELDS = ("ignored", "llm_holds_patches", "declared_patch_dim", "declared_fullatt_blocks")


def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``typ``; YAML gives us ints, floats, bools and strings."""
    if isinstance(typ, type) and issubclass(typ, Enum):
        choices = [m.value for m in typ]
        if value not in choices:
            raise ConfigError(
                f"{quoted(value)} is not one of {', '.join(map(repr, choices))}",
                fix=f"set {key} to one of {', '.join(map(str, choices))}",
                key=key,
            )
        return typ(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {quoted(value)}", fix=f"write {key}: true|false", key=key)
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {quoted(value)}", fix=f"write {key} as a number, e.g. 0.99",
                              key=key)
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {quoted(value)}", fix=f"write {key} as a whole number",
                              key=key)
        return value
    if get_origin(typ) is tuple and isinstance(get_args(typ)[0], type) and issubclass(get_args(typ)[0], Enum):
        member = get_args(typ)[0]  # a list of enum values, e.g. validate.runtimes: [onnxruntime, tvm]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"expected a non-empty list, got {quoted(value)}",
                              fix=f"write {key}: [{', '.join(m.value for m in member)}]", key=key)
        return tuple(_coerce(v, member, key) for v in value)
    if typ == tuple[str, ...]:  # a list of strings; the single word auto is ("auto",)
        if value == AUTO:
            return (AUTO,)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"expected a list of module names or auto, got {quoted(value)}",
                              fix=f"write {key}: [model.visual.blocks.31.mlp, ...] or {key}: auto", key=key)
        if AUTO in value:
            raise ConfigError("auto cannot be combined with module names", fix=f"write {key}: auto, or only names",
                              key=key)
        return tuple(value)
    if typ is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected a string, got {quoted(value)}", fix=f"quote the value of {key}", key=key)
        return str(value)
    raise TypeError(f"unsupported config annotation {quoted(typ)} for {key}")  # a bug in this file, not user input


def build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {quoted(data)}",
                          fix=f"write {prefix} as a block of key: value lines",
                          key=prefix)
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name not in HIDDEN_FIELDS]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                "unknown key",
                fix=f"{_did_you_mean(str(key), names)}valid keys here: {', '.join(names)}",
                key=full,
            )
        typ = hints[key]
        if is_dataclass(typ):
            kwargs[key] = build(typ, value if value is not None else {}, full)
        else:
            kwargs[key] = _coerce(value, typ, full)
    missing = [n for n in names if n not in kwargs and _required(cls, n)]
    if missing:
        raise ConfigError("missing required key", fix=f"add {', '.join(missing)}",
                          key=".".join(filter(None, [prefix, missing[0]])))
    return cls(**kwargs)


def _required(cls: type, name: str) -> bool:
    from dataclasses import MISSING

    f = next(f for f in fields(cls) if f.name == name)
    return f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
