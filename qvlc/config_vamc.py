"""The vamc-style config layout of existing Qwen2-VL deployment repos, mapped onto qvlc's native schema."""

from __future__ import annotations

from typing import Any

from qvlc.errors import ConfigError

_VAMC_DTYPES = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "float32": "fp32", "fp32": "fp32", "float": "fp32"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


NATIVE_ONLY = ("validate",)
VAMC_EQUIVALENT = {"part": "frontend.model_kwargs.build_visual", "model": "frontend.checkpoint",
                   "export": "frontend.shape / frontend.model_kwargs.tp / backend.dtype", "output": "workspace.path"}


def from_vamc(raw: dict[str, Any]) -> dict[str, Any]:
    """Map the vamc-style layout used by existing Qwen2-VL deployment repos onto the native schema."""
    flat = _flatten(raw)
    used: set[str] = set()

    def take(key: str) -> Any:
        used.add(key)
        return flat.get(key)

    build_visual = take("frontend.model_kwargs.build_visual")
    if build_visual is not None and not isinstance(build_visual, bool):
        raise ConfigError(f"expected true or false, got {build_visual!r}",
                          fix="write frontend.model_kwargs.build_visual: true (visual part) or false (LLM part)",
                          key="frontend.model_kwargs.build_visual")
    part = "visual" if build_visual else "llm"
    native: dict[str, Any] = {"name": take("name"), "part": part, "model": {}, "export": {}, "output": {}}
    for section in NATIVE_ONLY:  # native sections with no vamc equivalent are understood as they are
        if section in raw:
            native[section] = raw[section]
            used.update(k for k in flat if k == section or k.startswith(section + "."))
    clash = [k for k in ("part", "model", "export", "output") if k in raw]
    if clash:
        raise ConfigError(f"native key {clash[0]!r} inside a vamc-style config (one with a frontend: block)",
                          fix=f"use the vamc key ({VAMC_EQUIVALENT[clash[0]]}) or write a native config without "
                              "frontend:", key=clash[0])
    quantize = sorted((k for k in flat if k.split(".")[:2] in (["frontend", "quantize"], ["frontend", "dataset"])),
                      key=lambda k: (not k.startswith("frontend.quantize"), k))
    if quantize:  # building fp16 where int8 was asked for would pass for what the config wanted: refuse instead
        kind = flat.get("frontend.quantize.type")
        raise ConfigError(f"{'quantize type ' + repr(kind) if kind else 'a calibration dataset'} asked for: qvlc "
                          "quantizes weights round-to-nearest only (calibrated GPTQ is not implemented yet), and "
                          "only from a native config", fix="write a native config with export.weights.format: int8 "
                          "(README, \"Weight quantization\"), or remove frontend.quantize and frontend.dataset for "
                          "an fp16 artifact", key=quantize[0])
    if (ck := take("frontend.checkpoint")) is not None:
        native["model"]["checkpoint"] = ck
    ids = take("frontend.shape.input_ids")
    if ids is not None:
        try:
            (prefill,), (ctx,) = ids
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"expected [[prefill_len], [max_context]], got {ids!r}",
                              fix="write frontend.shape.input_ids: [[2048], [4096]]",
                              key="frontend.shape.input_ids") from exc
        native["export"].update(prefill_len=prefill, max_context=ctx)
    pv = take("frontend.shape.pixel_values")
    if pv is not None:
        if not (isinstance(pv, list) and len(pv) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in pv)):
            raise ConfigError(f"expected [N, patch_dim] (two integers), got {pv!r}",
                              fix="write frontend.shape.pixel_values: [5120, 1176]", key="frontend.shape.pixel_values")
        native["export"]["max_patches"] = pv[0]
        native["declared_patch_dim"] = pv[1]
    full = take("backend.compile.fullatt_block_indexes")
    if full is not None:
        if not (isinstance(full, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in full)):
            raise ConfigError(f"expected a list of block indexes, got {full!r}",
                              fix="write backend.compile.fullatt_block_indexes: [7, 15, 23, 31]",
                              key="backend.compile.fullatt_block_indexes")
        native["declared_fullatt_blocks"] = tuple(full)
    if (tp := take("frontend.model_kwargs.tp")) is not None:
        native["export"]["tp"] = tp
    if (dt := take("backend.dtype")) is not None:
        if str(dt).lower() not in _VAMC_DTYPES:
            raise ConfigError(f"unsupported dtype {dt!r}", fix="use float16 or float32", key="backend.dtype")
        native["export"]["dtype"] = _VAMC_DTYPES[str(dt).lower()]
    if (ws := take("workspace.path")) is not None:
        native["output"]["dir"] = ws
    native["ignored"] = tuple(sorted(k for k in flat if k not in used))
    return native
