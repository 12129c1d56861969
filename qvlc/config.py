"""Typed, frozen config tree; YAML loading (native and vamc-style); every check that needs no weights.

Checks run in two rounds, both before any weight is read:
- ``load_config``: the YAML alone (keys, types, values, relations between values);
- ``check_against_model``: the config against the checkpoint's config.json (tp vs heads, prompt vs patches).
Every error is a ``ConfigError`` naming the key, the value and the fix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from qvlc.config_cases import Case, check_cases, chosen
from qvlc.config_parse import AUTO, HIDDEN_FIELDS, build
from qvlc.config_vamc import from_vamc
from qvlc.config_weights import WeightsConfig, check_weights
from qvlc.errors import ConfigError, printable, quoted
from qvlc.models import TINY
from qvlc.precision import Precision, Runtime


class Part(str, Enum):
    LLM = "llm"
    VISUAL = "visual"

    def __str__(self) -> str:
        return self.value


MIN_OPSET = 18  # the dynamo exporter emits opset 18 and newer
MAX_OPSET = 23  # newest opset exported and run through ONNX Runtime 1.32 here (tiny LLM: 20, 21, 23)
MIN_PREFILL = 64  # validation prompts hold image and video spans and text; shorter graphs cannot be proven


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str = TINY  # local Hugging Face folder, or "tiny" / "tiny:<model_type>" for an embedded default


@dataclass(frozen=True)
class ExportConfig:
    dtype: Precision = Precision.FP32
    opset: int = 0  # 0: the lowest that expresses the graphs (18; 19 for int8 weights, 21 for blocked int4)
    prefill_len: int = 128  # llm: S, static prefill length (multiple of 16)
    max_context: int = 256  # llm: C, KV capacity including the new token (multiple of 16)
    tp: int = 1  # llm: tensor-parallel ranks
    workers: int = 1  # llm, tp > 1: ranks exported by this many parallel processes
    max_patches: int = 256  # visual: N, static patch count (multiple of 16)
    chunk_width: int = 640  # visual: width of each image_embeds_i output
    attention_block: int = 1024  # visual: query rows per attention block (0: all N rows at once)
    fp32_layers: tuple[str, ...] = ()  # fp16: modules computed in fp32 (transformers names, fnmatch), or ("auto",)
    simplify: bool = False  # run onnxsim on the exported graphs, then validate what it produced
    weights: WeightsConfig = field(default_factory=WeightsConfig)  # llm: integer weights (export.weights.format)


class OracleKind(str, Enum):
    STREAMED = "streamed"  # transformers' own layers, one layer's weights in memory at a time
    MEMORY = "memory"  # the whole transformers model loaded (small models)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ValidateConfig:
    enabled: bool = True
    oracle: OracleKind = OracleKind.STREAMED  # how the fp32 oracle holds its weights
    decode_steps: int = 8  # decode steps carried through the KV cache per case
    generate_tokens: int = 16  # greedy tokens compared with transformers generate
    # the runtimes the graphs run on; onnxruntime drives generation, tvm runs the same cases (pip install qvlc[tvm])
    runtimes: tuple[Runtime, ...] = (Runtime.ONNXRUNTIME,)
    # how many cases (LLM prompts, visual graph calls) the runtimes after onnxruntime run; 0 = every case
    runtime_cases: int = 0
    # which cases run (the part's names, or all): a pull-request build can prove one prompt, a release build all;
    # the parity report lists the cases skipped
    cases: tuple[Case, ...] = (Case.ALL,)

    def chosen(self, part: Part) -> tuple[list[str], list[str]]:
        """(the part's cases that run, the ones skipped), in the part's order."""
        return chosen(self.cases, part.value)


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
            del d["export"]["attention_block"]
            if not self.llm_holds_patches:
                del d["export"]["max_patches"]
        else:
            for key in ("prefill_len", "max_context", "tp", "workers"):
                del d["export"][key]
            for key in ("decode_steps", "generate_tokens"):
                del d["validate"][key]
        return d


def _plain(value: Any) -> Any:
    """Enums → their values, tuples → lists (("auto",) → auto), recursively (YAML/JSON-ready)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return AUTO if value == (AUTO,) else [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
    cfg: Config = build(Config, raw, "")
    # For the LLM part, an explicit export.max_patches says how many patches the visual graph feeding it holds.
    explicit_patches = cfg.part == "llm" and "max_patches" in (raw.get("export") or {})
    cfg = replace(cfg, ignored=ignored, llm_holds_patches=cfg.export.max_patches if explicit_patches else 0,
                  **declared)
    check_values(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML would silently keep the last one), and aliases
    (``*name``): a few hundred bytes of nested aliases expand to gigabytes (a "billion laughs" config)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{printable(event.anchor, 40)}) are "
                              "not allowed in qvlc configs", fix="write the value out where the alias stands",
                              key="CONFIG")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {quoted(key)} appears twice in one block (line "
                                  f"{key_node.start_mark.line + 1}); YAML would silently keep only the last",
                                  fix=f"merge the two {quoted(key)} blocks into one",
                                  key=str(key))
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder, not a config file", fix="pass the path of a YAML config file",
                          key="CONFIG")
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{printable(path, 200)} is {path.stat().st_size} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES}", fix="pass a qvlc config (a few dozen lines of YAML)", key="CONFIG")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} not found", fix="pass the path of a YAML config",
                          key="CONFIG") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          fix="save the config as UTF-8 YAML", key="CONFIG") from exc
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", fix="fix the YAML syntax", key="CONFIG") from exc
    return config_from_dict(raw)


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
    if cfg.part == "llm":
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
        room = e.max_context - 1 - e.prefill_len  # decode calls the KV cache holds after the prefill window
        v = cfg.validate
        for key, calls in (("validate.decode_steps", v.decode_steps), ("validate.generate_tokens",
                                                                       v.generate_tokens - 1)):
            if v.enabled and calls > room:
                raise ConfigError(f"{key.split('.')[1]} needs {calls} decode calls, the KV cache leaves room for {room} "
                                  f"(max_context {e.max_context} - prefill_len {e.prefill_len} - 1)",
                                  fix=f"use {key.split('.')[1]} <= {room + (key.endswith('tokens'))}, or raise "
                                      "export.max_context", key=key)
    else:
        _multiple_of_16(e.max_patches, "export.max_patches")
        if e.attention_block:
            _multiple_of_16(e.attention_block, "export.attention_block")
        if e.tp != 1:
            raise ConfigError(f"tp {e.tp} given for the visual part, which is never split across ranks",
                              fix="remove export.tp from the visual config (or set it to 1)", key="export.tp")
    _runtimes(cfg.validate.runtimes)
    check_weights(cfg)
    if cfg.validate.runtime_cases < 0:
        raise ConfigError(f"must be 0 (every case) or more, got {cfg.validate.runtime_cases}",
                          fix="set validate.runtime_cases to 0 or a positive count", key="validate.runtime_cases")
    check_cases(cfg.validate.cases, cfg.part.value)
    if e.fp32_layers and e.dtype != Precision.FP16:
        raise ConfigError(f"fp32_layers keeps modules in fp32 inside an fp16 graph; this compile is {e.dtype}",
                          fix="remove export.fp32_layers, or set export.dtype: fp16", key="export.fp32_layers")


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


def _multiple_of_16(value: int, key: str, minimum: int = 16) -> None:
    if value <= 0 or value % 16:
        up = max(minimum, -(-value // 16) * 16)
        raise ConfigError(f"{value} is not a positive multiple of 16",
                          fix=f"use {up} (static shapes are tiled in 16s)", key=key)
