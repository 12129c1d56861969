"""The one reader of a checkpoint's JSON files (config.json, the image and video processor configs, the
tokenizer's config, the chat template, the safetensors index): every way such a file can be wrong — too large,
not UTF-8, not JSON, nested too deeply, not an object — is a ``CheckpointError`` (exit 2) naming the file and
the fix, never an exception from the parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qvlc.errors import CheckpointError

MAX_JSON_BYTES = 64 << 20  # a checkpoint's largest JSON (tokenizer.json: ~11 MB for Qwen2-VL)
RESTORE = "restore the file that ships with the checkpoint"


def read_json_object(path: Path, *, required: bool = True, fix: str = RESTORE, missing_fix: str = "",
                     key: str = "model.checkpoint") -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is absent and not ``required``. ``fix`` is said of a damaged
    file, ``missing_fix`` (default: ``fix``) of a missing one."""
    path = Path(path)
    if not path.is_file():
        if not required:
            return None
        raise CheckpointError(f"{path.parent} has no {path.name}", fix=missing_fix or fix, key=key)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {size} bytes; qvlc reads checkpoint JSON files of at most {MAX_JSON_BYTES}",
                              fix=fix, key=key)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", fix=fix,
                              key=key) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", fix=fix, key=key) from None
    except RecursionError:
        raise CheckpointError(f"{path} is JSON nested too deeply to be a checkpoint file", fix=fix, key=key) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object", fix=fix, key=key)
    return data


def field_error(path: Path, field: str, value: Any, expected: str, key: str = "model.checkpoint") -> CheckpointError:
    """A field of a checkpoint JSON file that has the wrong type or value."""
    shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
    return CheckpointError(f"{path}: {field} is {shown}, expected {expected}", fix=RESTORE, key=key)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError, RecursionError):
        return False
