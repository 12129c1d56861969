"""Checks on the YAML alone, before the checkpoint is opened: names, opsets, lengths tiled in 16s, the room the KV
cache leaves, runtimes, weights and cases. Every error is a ``ConfigError`` naming the key, the value and the fix."""

from __future__ import annotations

import re

from qvlc.artifact.layout import Part
from qvlc.config.cases import check_cases
from qvlc.config.schema import MAX_OPSET, MIN_OPSET, MIN_PREFILL, Config
from qvlc.config.weights import check_weights
from qvlc.errors import ConfigError, quoted
from qvlc.precision import KvCache, Precision, Runtime

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_values(cfg: Config) -> None:
    """Checks on the YAML alone."""
    if not _NAME_RE.match(cfg.name):
        raise ConfigError(f"{quoted(cfg.name)} is not a usable folder name",
                          fix="use letters, digits, '.', '_' and '-' only", key="name")
    if cfg.name.endswith(".failed"):
        raise ConfigError(f"{quoted(cfg.name)} ends with .failed, the suffix qvlc gives the folder of a failed compile",
                          fix=f"use another name, e.g. {cfg.name[:-len('.failed')] or 'model'}", key="name")
    e = cfg.export
    if e.opset != 0 and not MIN_OPSET <= e.opset <= MAX_OPSET:
        raise ConfigError(f"opset {e.opset} is outside what qvlc exports and proves ({MIN_OPSET}..{MAX_OPSET})",
                          fix=f"use an opset from {MIN_OPSET} to {MAX_OPSET}", key="export.opset")
    _positive(cfg.validate.decode_steps, "validate.decode_steps")
    _positive(cfg.validate.generate_tokens, "validate.generate_tokens")
    _positive(e.tp, "export.tp")
    _positive(e.workers, "export.workers")
    _positive(e.chunk_width, "export.chunk_width")
    if cfg.part == Part.LLM:
        _multiple_of_16(e.prefill_len, "export.prefill_len", MIN_PREFILL)
        _multiple_of_16(e.max_context, "export.max_context", MIN_PREFILL + 16)
        if e.prefill_len >= e.max_context:
            raise ConfigError(
                f"prefill_len {e.prefill_len} leaves no room to decode in max_context {e.max_context}",
                fix=f"raise export.max_context above {e.prefill_len} (e.g. {e.prefill_len * 2}) "
                    f"or lower export.prefill_len",
                key="export.prefill_len",
            )
        if e.prefill_len < MIN_PREFILL:
            raise ConfigError(f"prefill_len {e.prefill_len} is too short to validate",
                              fix=f"use export.prefill_len >= {MIN_PREFILL}", key="export.prefill_len")
        if e.prefill_chunk:
            _prefill_chunk(e.prefill_chunk, e.prefill_len)
        room = e.max_context - 1 - e.prefill_len  # decode calls the KV cache holds after the prefill window
        v = cfg.validate
        for key, value, calls in (("validate.decode_steps", v.decode_steps, v.decode_steps),
                                  ("validate.generate_tokens", v.generate_tokens, v.generate_tokens - 1)):
            name = key.split(".")[1]
            if v.enabled and calls > room:
                raise ConfigError(f"{name} {value} needs {calls} decode calls, the KV cache leaves room for {room} "
                                  f"(max_context {e.max_context} - prefill_len {e.prefill_len} - 1)",
                                  fix=f"use {name} <= {room + (value - calls)}, or raise export.max_context", key=key)
    else:
        _visual_export(e)
    _runtimes(cfg.validate.runtimes)
    check_weights(cfg)
    if cfg.validate.runtime_cases < 0:
        raise ConfigError(f"must be 0 (every case) or more, got {cfg.validate.runtime_cases}",
                          fix="set validate.runtime_cases to 0 or a positive count", key="validate.runtime_cases")
    check_cases(cfg.validate.cases, cfg.part.value, bool(e.prefill_chunk))
    if e.fp32_layers and e.dtype != Precision.FP16:
        raise ConfigError(f"fp32_layers keeps modules in fp32 inside an fp16 graph; this compile is {e.dtype}",
                          fix="remove export.fp32_layers, or set export.dtype: fp16", key="export.fp32_layers")


def _visual_export(e) -> None:
    """The visual part's export keys: its shapes, and no LLM-only option."""
    _multiple_of_16(e.max_patches, "export.max_patches")
    if e.attention_block:
        _multiple_of_16(e.attention_block, "export.attention_block")
    if e.prefill_chunk:
        raise ConfigError(f"prefill_chunk {e.prefill_chunk} given for the visual part, which has no prompt",
                          fix="remove export.prefill_chunk from the visual config", key="export.prefill_chunk")
    if e.kv_cache != KvCache.FP:
        raise ConfigError(f"kv_cache {e.kv_cache} given for the visual part, which has no KV cache",
                          fix="remove export.kv_cache from the visual config", key="export.kv_cache")
    if e.tp != 1:
        raise ConfigError(f"tp {e.tp} given for the visual part, which is never split across ranks",
                          fix="remove export.tp from the visual config (or set it to 1)", key="export.tp")


def _runtimes(runtimes: tuple[Runtime, ...]) -> None:
    key = "validate.runtimes"
    if Runtime.ONNXRUNTIME not in runtimes:
        raise ConfigError("onnxruntime is missing: it runs every case first and chooses the greedy tokens the other "
                          "runtimes are fed", fix=f"write {key}: [onnxruntime, {', '.join(map(str, runtimes))}]",
                          key=key)
    if len(set(runtimes)) != len(runtimes):
        raise ConfigError(f"a runtime is listed twice: {[str(r) for r in runtimes]}",
                          fix=f"list each runtime once, e.g. {key}: [onnxruntime, tvm]", key=key)
    for runtime in runtimes:
        if not runtime.installed:
            raise ConfigError(f"{runtime} is listed but not installed", fix=f"{runtime.install_hint}, or remove "
                              f"{runtime} from {key}", key=key)


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"must be at least 1, got {value}", fix=f"set {key} to a positive integer", key=key)


def _prefill_chunk(t: int, s: int) -> None:
    """T tiles the prefill window: a multiple of 16 that divides S, below it (0: no chunk graph)."""
    key = "export.prefill_chunk"
    divisors = [d for d in range(16, s, 16) if s % d == 0]
    if t < 0 or t % 16 or t >= s or s % t:
        raise ConfigError(f"prefill_chunk {t} does not tile prefill_len {s} in smaller chunks",
                          fix=f"use 0 (no chunk graph) or a multiple of 16 below {s} that divides it: "
                              f"{', '.join(map(str, divisors)) or 'none exists'}", key=key)


def _multiple_of_16(value: int, key: str, minimum: int = 16) -> None:
    if value <= 0 or value % 16:
        up = max(minimum, -(-value // 16) * 16)
        raise ConfigError(f"{value} is not a positive multiple of 16",
                          fix=f"use {up} (static shapes are tiled in 16s)", key=key)
