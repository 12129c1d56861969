"""The vamc-style config layout of existing Qwen2-VL deployment repos, mapped onto qvlc's native schema."""

from __future__ import annotations

from typing import Any, Callable

from qvlc.errors import ConfigError, quoted

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


QUANTIZE_TYPES = {"w8a16_gptq": "int8"}  # frontend.quantize.type → export.weights.format, calibrated by GPTQ
KV_TYPES = {"w16kv8": "int8"}  # frontend.quantize.type → export.kv_cache, with fp16 weights and activations
DATASET_KEYS = {"path": "path", "nsamples": "nsamples", "seqlen": "seqlen"}


def _quantize(flat: dict[str, Any], take) -> dict[str, Any]:
    """frontend.quantize and the calibration dataset (``dataset:`` or ``frontend.dataset:``) → export.weights.

    ``w8a16_gptq`` is int8 weights calibrated by GPTQ with fp16 activations (``backend.dtype: int8`` names the
    weights; the activations are fp16). Every other quantize type is refused, never ignored: an fp16 artifact
    built where int8 was asked for would pass for what the config wanted."""
    keys = [k for k in flat if k.startswith(("frontend.quantize.", "frontend.dataset.", "dataset."))]
    if not keys:
        return {}
    kind = take("frontend.quantize.type")
    if kind in KV_TYPES:
        return _kv_quantize(flat, take, kind)
    if kind not in QUANTIZE_TYPES:
        what = f"quantize type {quoted(kind)}" if kind is not None else \
            "a calibration dataset without frontend.quantize.type"
        raise ConfigError(f"{what}: qvlc implements {', '.join((*QUANTIZE_TYPES, *KV_TYPES))} (int8 weights, "
                          "GPTQ-calibrated, fp16 activations; fp16 weights with an int8 KV cache)",
                          fix="use frontend.quantize.type: w8a16_gptq or w16kv8, or remove frontend.quantize "
                          "and the dataset block for an fp16 artifact", key="frontend.quantize.type")
    calibration: dict[str, Any] = {}
    for k in keys:
        if k == "frontend.quantize.type":
            continue
        section, _, leaf = k.rpartition(".")
        if section == "frontend.quantize" or leaf not in (*DATASET_KEYS, "name"):
            raise ConfigError(f"{k} is not a key qvlc understands in a vamc quantize/dataset block",
                              fix="keep frontend.quantize.type and dataset.{name, path, nsamples, seqlen}", key=k)
        value = take(k)
        if leaf in DATASET_KEYS:
            calibration[DATASET_KEYS[leaf]] = value
    name = flat.get("dataset.name", flat.get("frontend.dataset.name"))
    if name is not None and "path" not in calibration:
        raise ConfigError(f"dataset {quoted(name)} has no path: qvlc reads calibration texts from a local file "
                          "(there is no dataset download)",
                          fix="add dataset.path: a JSON/JSONL file of texts, or remove the dataset block for qvlc's "
                              "built-in set", key="dataset.path")
    dt = flat.get("backend.dtype")
    if dt is not None and str(dt).lower() != "int8":
        raise ConfigError(f"frontend.quantize.type {kind} with backend.dtype {quoted(dt)}",
                          fix="write backend.dtype: int8 "
                          "(the int8 weights; activations are fp16)", key="backend.dtype")
    take("backend.dtype")
    return {"dtype": "fp16", "opset": 21, "weights": {"format": QUANTIZE_TYPES[kind], "method": "gptq",
                                                      **({"calibration": calibration} if calibration else {})}}


def _kv_quantize(flat: dict[str, Any], take, kind: str) -> dict[str, Any]:
    """``w16kv8``: fp16 weights and activations, the KV cache int8 (export.kv_cache). vamc calibrates static
    per-channel cache scales on its dataset; qvlc computes a scale per token and head as the cache is written, so a
    dataset block is not read (it is listed among the ignored keys)."""
    dt = take("backend.dtype")
    if dt is not None and _VAMC_DTYPES.get(str(dt).lower()) != "fp16":
        raise ConfigError(f"frontend.quantize.type {kind} with backend.dtype {quoted(dt)}",
                          fix="write backend.dtype: float16 (w16kv8 keeps fp16 weights; only the cache is int8)",
                          key="backend.dtype")
    return {"dtype": "fp16", "kv_cache": KV_TYPES[kind]}


def _shapes(take: Callable[[str], Any], native: dict[str, Any]) -> None:
    """frontend.shape.* and backend.compile.fullatt_block_indexes onto ``native`` (checked for shape here)."""
    ids = take("frontend.shape.input_ids")
    if ids is not None:
        try:
            (prefill,), (ctx,) = ids
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"expected [[prefill_len], [max_context]], got {quoted(ids)}",
                              fix="write frontend.shape.input_ids: [[2048], [4096]]",
                              key="frontend.shape.input_ids") from exc
        native["export"].update(prefill_len=prefill, max_context=ctx)
    pv = take("frontend.shape.pixel_values")
    if pv is not None:
        if not (isinstance(pv, list) and len(pv) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in pv)):
            raise ConfigError(f"expected [N, patch_dim] (two integers), got {quoted(pv)}",
                              fix="write frontend.shape.pixel_values: [5120, 1176]", key="frontend.shape.pixel_values")
        native["export"]["max_patches"] = pv[0]
        native["declared_patch_dim"] = pv[1]
    full = take("backend.compile.fullatt_block_indexes")
    if full is not None:
        if not (isinstance(full, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in full)):
            raise ConfigError(f"expected a list of block indexes, got {quoted(full)}",
                              fix="write backend.compile.fullatt_block_indexes: [7, 15, 23, 31]",
                              key="backend.compile.fullatt_block_indexes")
        native["declared_fullatt_blocks"] = tuple(full)


def from_vamc(raw: dict[str, Any]) -> dict[str, Any]:
    """Map the vamc-style layout used by existing Qwen2-VL deployment repos onto the native schema."""
    flat = _flatten(raw)
    used: set[str] = set()

    def take(key: str) -> Any:
        used.add(key)
        return flat.get(key)

    build_visual = take("frontend.model_kwargs.build_visual")
    if build_visual is not None and not isinstance(build_visual, bool):
        raise ConfigError(f"expected true or false, got {quoted(build_visual)}",
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
        raise ConfigError(f"native key {quoted(clash[0])} inside a vamc-style config (one with a frontend: block)",
                          fix=f"use the vamc key ({VAMC_EQUIVALENT[clash[0]]}) or write a native config without "
                              "frontend:", key=clash[0])
    native["export"].update(_quantize(flat, take))
    if (ck := take("frontend.checkpoint")) is not None:
        native["model"]["checkpoint"] = ck
    _shapes(take, native)
    if (tp := take("frontend.model_kwargs.tp")) is not None:
        native["export"]["tp"] = tp
    if (dt := take("backend.dtype")) is not None and "weights" not in native["export"]:
        if str(dt).lower() not in _VAMC_DTYPES:
            fix = ("use float16 or float32" if str(dt).lower() != "int8" else
                   "int8 is a quantized build: add frontend.quantize.type: w8a16_gptq (and a dataset: block)")
            raise ConfigError(f"unsupported dtype {quoted(dt)}", fix=fix, key="backend.dtype")
        native["export"]["dtype"] = _VAMC_DTYPES[str(dt).lower()]
    if (ws := take("workspace.path")) is not None:
        native["output"]["dir"] = ws
    native["ignored"] = tuple(sorted(k for k in flat if k not in used))
    return native
