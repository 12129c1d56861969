"""An artifact's JSON files read (``read_json_file``), and frozen dataclasses ↔ JSON with every field's type checked
on the way in: how manifest.json is read back typed.
A malformed document is an ``IntegrityError`` naming the field (``manifest.llm.prefill_len: expected a int``)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from qvlc.errors import IntegrityError, QvlcError
from qvlc.precision import KvCache, Precision


def read_json_file(path: Path, what: str, max_bytes: int = 64 << 20) -> Any:
    """The parsed JSON of an artifact's file (manifest.json, preprocess.json): the one reader, so every way such a
    file can be damaged — too large, not UTF-8, not JSON, nested too deeply — is an IntegrityError naming it."""
    size = path.stat().st_size
    if size > max_bytes:
        raise IntegrityError(f"{path} is {size} bytes; {what} is at most {max_bytes}", fix="recompile the artifact",
                             key=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else f"not valid JSON ({exc})"
        raise IntegrityError(f"{path} is {problem}", fix="recompile the artifact", key=str(path)) from None


def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Precision):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def from_json(typ: Any, data: Any, where: str) -> Any:
    """Build ``typ`` from parsed JSON, checking every field's type; QvlcError names the first bad field."""
    def bad(expected: str) -> QvlcError:
        return IntegrityError(f"{where}: expected {expected}, got {json.dumps(data)[:80]}",
                         fix="the manifest was edited or damaged: recompile the artifact", key=where)

    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        return from_json(next(a for a in args if a is not type(None)), data, where)
    if dataclasses.is_dataclass(typ):
        if not isinstance(data, dict):
            raise bad(f"an object ({typ.__name__})")
        hints = typing.get_type_hints(typ)
        kwargs = {}
        for f in fields(typ):
            if f.name in data:
                kwargs[f.name] = from_json(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise IntegrityError(f"{where} has no field {f.name!r}",
                                fix="the manifest is damaged or from an older qvlc: recompile the artifact",
                                key=f"{where}.{f.name}")
        return typ(**kwargs)
    if origin is tuple:
        if not isinstance(data, list):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise bad(f"a list of {len(args)}")
        return tuple(from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if typ in (Precision, KvCache):
        try:
            return typ(data)
        except ValueError:
            raise bad(f"one of {[p.value for p in typ]}") from None
    if typ is dict:
        if not isinstance(data, dict):
            raise bad("an object")
        return data
    if typ is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise bad("a number")
        return float(data)
    if typ in (int, str, bool):
        if not isinstance(data, typ) or (typ is int and isinstance(data, bool)):
            raise bad(f"a {typ.__name__}")
        return data
    raise TypeError(f"contract type {typ!r} has no reader")  # a bug in this file
