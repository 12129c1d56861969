"""A checkpoint's image and video processor configs read into the host's ``PreprocessConfig`` (what
``preprocess.json`` records), checked against the vision config and given the family's video rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qvlc.checkpoint.json_files import RESTORE, field_error, read_json_object
from qvlc.errors import CheckpointError, QvlcError
from qvlc.host.preprocess import PreprocessConfig
from qvlc.models.common.dims import VisionDims

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG_NAME = "video_preprocessor_config.json"


def read_preprocess_config(folder: Path) -> PreprocessConfig:
    """``preprocessor_config.json`` of a Hugging Face folder; Qwen2-VL's defaults when it is absent.

    Pixel bounds come from ``min_pixels``/``max_pixels``, else from ``size`` (shortest_edge/longest_edge or
    min_pixels/max_pixels); keys that are absent keep the defaults. A value of the wrong type is a
    ``CheckpointError`` naming the file and the field.
    """
    path = Path(folder) / PREPROCESSOR_CONFIG_NAME
    raw = read_json_object(path, required=False)
    if raw is None:
        return PreprocessConfig()
    raw = raw.get("image_processor", raw)
    size = _object(raw.get("size"), path, "size")
    values: dict[str, Any] = {}
    for name, alts in (("min_pixels", ("shortest_edge", "min_pixels")), ("max_pixels", ("longest_edge", "max_pixels"))):
        value = raw.get(name, size.get(alts[0], size.get(alts[1])))
        if value is not None:
            values[name] = _int(value, path, name)
    for name in ("patch_size", "temporal_patch_size", "merge_size"):
        if raw.get(name) is not None:
            values[name] = _int(raw[name], path, name)
    for name in ("image_mean", "image_std"):
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, list) and value and all(_is_number(v) for v in value):
            values[name] = tuple(float(v) for v in value)
        elif _is_number(value):
            values[name] = (float(value),) * 3
        else:
            raise field_error(path, name, value, "a number or a list of numbers")
    if raw.get("rescale_factor") is not None:
        if not _is_number(raw["rescale_factor"]):
            raise field_error(path, "rescale_factor", raw["rescale_factor"], "a number")
        values["rescale_factor"] = float(raw["rescale_factor"])
    values.update(_video_pixels(Path(folder)))
    try:
        return PreprocessConfig(**values)
    except QvlcError as exc:  # a value out of range: name the file it came from
        raise CheckpointError(f"{path}: {exc.problem}", fix=f"{exc.fix} ({RESTORE})", key="model.checkpoint") from None


def preprocess_config(checkpoint: Path, vision: VisionDims,
                      video_rules: dict[str, str] | None = None) -> PreprocessConfig:
    """The checkpoint's preprocessing, with patch/temporal/merge sizes that must agree with its vision config and
    the family's video rules (``Family.video_rules``).

    Without a preprocessor_config.json, the sizes come from the vision config (the other values keep Qwen2-VL's
    defaults); a file that disagrees with the vision config is an error.
    """
    pre = dataclasses.replace(read_preprocess_config(checkpoint), **(video_rules or {}))
    sizes = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
             "merge_size": vision.merge_size}
    if not (Path(checkpoint) / PREPROCESSOR_CONFIG_NAME).is_file():
        pre = dataclasses.replace(pre, **sizes)
    wrong = [f"{k} {getattr(pre, k)} (vision_config: {want})" for k, want in sizes.items() if getattr(pre, k) != want]
    if pre.in_chans != vision.in_chans:
        wrong.append(f"{pre.in_chans} channels of image_mean/image_std (vision_config: {vision.in_chans})")
    if wrong:
        raise CheckpointError(
            f"{PREPROCESSOR_CONFIG_NAME} disagrees with config.json: {'; '.join(wrong)}",
            fix=f"restore the {PREPROCESSOR_CONFIG_NAME} that ships with the checkpoint", key="model.checkpoint")
    return pre


def _video_pixels(folder: Path) -> dict[str, int]:
    """The video pixel bounds from the checkpoint's video_preprocessor_config.json (min/max_pixels, or
    size.shortest_edge/longest_edge); empty when it has none."""
    path = folder / VIDEO_PREPROCESSOR_CONFIG_NAME
    raw = read_json_object(path, required=False)
    if raw is None:
        return {}
    size = _object(raw.get("size"), path, "size")
    values = {f"video_{key}": raw.get(key, size.get(alt)) for key, alt in (("min_pixels", "shortest_edge"),
                                                                            ("max_pixels", "longest_edge"))}
    return {k: _int(v, path, k.removeprefix("video_")) for k, v in values.items() if v is not None}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any, path: Path, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise field_error(path, name, value, "a whole number")
    return int(value)


def _object(value: Any, path: Path, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise field_error(path, name, value, "an object")
    return value
