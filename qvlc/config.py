"""Typed, frozen config tree; YAML loading (native and vamc-style); every check that needs no weights.

Checks run in two rounds, both before any weight is read:
- ``load_config``: the YAML alone (keys, types, values, relations between values);
- ``check_against_model``: the config against the checkpoint's config.json (tp vs heads, prompt vs patches).
Every error is a ``ConfigError`` naming the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import yaml

from qvlc.config_vamc import from_vamc
from qvlc.errors import ConfigError
from qvlc.models import TINY
from qvlc.models.common.tp import tp_problems, valid_tp_values
from qvlc.precision import Precision

if TYPE_CHECKING:
    from qvlc.models.common.dims import ModelDims
    from qvlc.models.common.family import Family


class Part(str, Enum):
    LLM = "llm"
    VISUAL = "visual"

    def __str__(self) -> str:
        return self.value


MIN_OPSET = 18  # the dynamo exporter emits opset 18 and newer
HIDDEN_FIELDS = ("ignored", "llm_holds_patches", "declared_patch_dim", "declared_fullatt_blocks")


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str = TINY  # local Hugging Face folder, or "tiny" / "tiny:<model_type>" for an embedded default


@dataclass(frozen=True)
class ExportConfig:
    dtype: Precision = Precision.FP32
    opset: int = 18
    prefill_len: int = 128  # llm: S, static prefill length (multiple of 16)
    max_context: int = 256  # llm: C, KV capacity including the new token (multiple of 16)
    tp: int = 1  # llm: tensor-parallel ranks
    workers: int = 1  # llm, tp > 1: ranks exported by this many parallel processes
    max_patches: int = 256  # visual: N, static patch count (multiple of 16)
    chunk_width: int = 640  # visual: width of each image_embeds_i output
    simplify: bool = False  # run onnxsim on the exported graphs, then validate what it produced


@dataclass(frozen=True)
class ValidateConfig:
    enabled: bool = True
    decode_steps: int = 8  # decode steps carried through the KV cache per case
    generate_tokens: int = 16  # greedy tokens compared with transformers generate


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "build"


@dataclass(frozen=True)
class Config:
    name: str
    part: Part
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Keys from a foreign (vamc-style) config that have no meaning here: reported, never silently dropped.
    ignored: tuple[str, ...] = ()
    # llm part only: patches of the visual graph whose tokens the prompt must hold (0 = not stated)
    llm_holds_patches: int = 0
    # vamc-style files state these; they are checked against the checkpoint's config.json (0 / None: not stated)
    declared_patch_dim: int = 0
    declared_fullatt_blocks: tuple[int, ...] | None = None

    @property
    def artifact_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    @property
    def is_tiny(self) -> bool:
        return self.model.checkpoint == TINY or self.model.checkpoint.startswith(TINY + ":")

    def to_dict(self) -> dict[str, Any]:
        """The native-schema dict of this config: ``config_from_dict(cfg.to_dict())`` gives ``cfg`` back
        (less what only describes the file it came from: ignored and declared keys)."""
        d = _plain(asdict(self))
        for key in HIDDEN_FIELDS:
            del d[key]
        if self.part == "llm":
            del d["export"]["chunk_width"]
            if not self.llm_holds_patches:
                del d["export"]["max_patches"]
        else:
            for key in ("prefill_len", "max_context", "tp", "workers"):
                del d["export"][key]
            for key in ("decode_steps", "generate_tokens"):
                del d["validate"][key]
        return d


def _plain(value: Any) -> Any:
    """Enums → their values, recursively (YAML/JSON-ready)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------- parsing


def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``typ``; YAML gives us ints, floats, bools and strings."""
    if isinstance(typ, type) and issubclass(typ, Enum):
        choices = [m.value for m in typ]
        if value not in choices:
            raise ConfigError(
                f"{value!r} is not one of {', '.join(map(repr, choices))}",
                fix=f"set {key} to one of {', '.join(map(str, choices))}",
                key=key,
            )
        return typ(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", fix=f"write {key}: true|false", key=key)
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", fix=f"write {key} as a whole number", key=key)
        return value
    if typ is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected a string, got {value!r}", fix=f"quote the value of {key}", key=key)
        return str(value)
    raise TypeError(f"unsupported config annotation {typ!r} for {key}")  # a bug in this file, not user input


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {data!r}", fix=f"write {prefix} as a block of key: value lines",
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
            kwargs[key] = _build(typ, value if value is not None else {}, full)
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


# ---------------------------------------------------------------------------------------------- entry points


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping", fix="start with `name:` and `part:` lines")
    ignored: tuple[str, ...] = ()
    declared: dict[str, Any] = {}
    if "frontend" in raw:
        raw = from_vamc(raw)
        ignored = raw.pop("ignored")
        declared = {k: raw.pop(k) for k in ("declared_patch_dim", "declared_fullatt_blocks") if k in raw}
    cfg: Config = _build(Config, raw, "")
    # For the LLM part, an explicit export.max_patches says how many patches the visual graph feeding it holds.
    explicit_patches = cfg.part == "llm" and "max_patches" in (raw.get("export") or {})
    cfg = replace(cfg, ignored=ignored, llm_holds_patches=cfg.export.max_patches if explicit_patches else 0,
                  **declared)
    check_values(cfg)
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} not found", fix="pass the path of a YAML config") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", fix="fix the YAML syntax") from exc
    return config_from_dict(raw)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_values(cfg: Config) -> None:
    """Checks on the YAML alone."""
    if not _NAME_RE.match(cfg.name):
        raise ConfigError(f"{cfg.name!r} is not a usable folder name",
                          fix="use letters, digits, '.', '_' and '-' only", key="name")
    e = cfg.export
    if e.opset < MIN_OPSET:
        raise ConfigError(f"opset {e.opset} is too old", fix=f"use opset {MIN_OPSET} or newer", key="export.opset")
    _positive(cfg.validate.decode_steps, "validate.decode_steps")
    _positive(cfg.validate.generate_tokens, "validate.generate_tokens")
    _positive(e.tp, "export.tp")
    _positive(e.workers, "export.workers")
    _positive(e.chunk_width, "export.chunk_width")
    if cfg.part == "llm":
        for key, value in (("export.prefill_len", e.prefill_len), ("export.max_context", e.max_context)):
            _multiple_of_16(value, key)
        if e.prefill_len >= e.max_context:
            raise ConfigError(
                f"prefill_len {e.prefill_len} leaves no room to decode in max_context {e.max_context}",
                fix=f"raise export.max_context above {e.prefill_len} (e.g. {e.prefill_len * 2}) "
                    f"or lower export.prefill_len",
                key="export.prefill_len",
            )
        min_len = 64  # validation prompts hold image spans and text; shorter graphs cannot be proven
        if e.prefill_len < min_len:
            raise ConfigError(f"prefill_len {e.prefill_len} is too short to validate",
                              fix=f"use export.prefill_len >= {min_len}", key="export.prefill_len")
    else:
        _multiple_of_16(e.max_patches, "export.max_patches")
        if e.tp != 1:
            raise ConfigError(f"tp {e.tp} given for the visual part, which is never split across ranks",
                              fix="remove export.tp from the visual config (or set it to 1)", key="export.tp")


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"must be at least 1, got {value}", fix=f"set {key} to a positive integer", key=key)


def _multiple_of_16(value: int, key: str) -> None:
    if value <= 0 or value % 16:
        up = max(16, -(-value // 16) * 16)
        raise ConfigError(f"{value} is not a positive multiple of 16",
                          fix=f"use {up} (static shapes are tiled in 16s)", key=key)


def check_against_model(cfg: Config, dims: "ModelDims", family: "Family") -> None:
    """Checks that need the checkpoint's config.json, still before any weight."""
    t = dims.text
    if cfg.part == "llm" and cfg.export.tp > 1:
        problems = tp_problems(cfg.export.tp, t.heads, t.kv_heads, t.intermediate, t.vocab)
        if problems:
            valid = valid_tp_values(t.heads, t.kv_heads, t.intermediate, t.vocab)
            raise ConfigError(f"tp {cfg.export.tp} cannot split this model: {'; '.join(problems)}",
                              fix=f"use one of tp = {', '.join(map(str, valid))}", key="export.tp")
    if cfg.part == "llm" and cfg.llm_holds_patches:
        wrap = family.vision_wrap_tokens  # vision start/end around the merged image tokens
        need = cfg.llm_holds_patches // dims.vision.merge_unit + wrap
        if cfg.export.prefill_len < need:
            raise ConfigError(
                f"prefill_len {cfg.export.prefill_len} cannot hold the {need - wrap} visual tokens of "
                f"max_patches {cfg.llm_holds_patches} (plus {wrap} around them)",
                fix=f"raise export.prefill_len to at least {-(-need // 16) * 16}, or lower export.max_patches",
                key="export.prefill_len")
    if cfg.part == "visual":
        v = dims.vision
        if cfg.export.max_patches % v.merge_unit:
            raise ConfigError(f"max_patches {cfg.export.max_patches} is not a multiple of the merge unit {v.merge_unit}",
                              fix=f"use a multiple of {16 * v.merge_unit // 4}", key="export.max_patches")
    if cfg.declared_patch_dim and cfg.declared_patch_dim != dims.vision.patch_dim:
        raise ConfigError(f"frontend.shape.pixel_values declares patches of {cfg.declared_patch_dim} values, the "
                          f"checkpoint's are {dims.vision.patch_dim}",
                          fix=f"write frontend.shape.pixel_values: [{cfg.export.max_patches}, {dims.vision.patch_dim}]",
                          key="frontend.shape.pixel_values")
    declared = cfg.declared_fullatt_blocks
    if declared is not None and tuple(declared) != tuple(dims.vision.fullatt_blocks):
        raise ConfigError(f"backend.compile.fullatt_block_indexes is {list(declared)}, but the checkpoint's "
                          f"config.json makes blocks {list(dims.vision.fullatt_blocks)} attend over whole frames",
                          fix=f"write backend.compile.fullatt_block_indexes: {list(dims.vision.fullatt_blocks)} "
                              "(or remove it: qvlc reads it from config.json)",
                          key="backend.compile.fullatt_block_indexes")
