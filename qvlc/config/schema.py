"""The typed, frozen config tree: every section and key qvlc reads, with its default (enums, not strings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from qvlc.artifact.layout import Part
from qvlc.config.cases import Case, chosen
from qvlc.config.choices import OracleKind
from qvlc.config.weights import WeightsConfig
from qvlc.config.yaml_to_dataclass import AUTO, HIDDEN_FIELDS
from qvlc.models import TINY
from qvlc.precision import KvCache, Precision, Runtime

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
    prefill_chunk: int = 0  # llm: T > 0 adds llm_chunk.onnx, T prompt tokens per call (divides prefill_len)
    kv_cache: KvCache = KvCache.FP  # llm: fp (the cache in dtype) or int8 (per layer, K/V, kv head, position)
    tp: int = 1  # llm: tensor-parallel ranks
    workers: int = 1  # llm, tp > 1: ranks exported by this many parallel processes
    max_patches: int = 256  # visual: N, static patch count (multiple of 16)
    chunk_width: int = 640  # visual: width of each image_embeds_i output
    attention_block: int = 1024  # visual: query rows per attention block (0: all N rows at once)
    fp32_layers: tuple[str, ...] = ()  # fp16: modules computed in fp32 (transformers names, fnmatch), or ("auto",)
    simplify: bool = False  # run onnxsim on the exported graphs, then validate what it produced
    weights: WeightsConfig = field(default_factory=WeightsConfig)  # llm: integer weights (export.weights.format)


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

    def chosen(self, part: Part, chunked: bool = False) -> tuple[list[str], list[str]]:
        """(the part's cases that run, the ones skipped), in the part's order (``chunked``: with the chunk cases)."""
        return chosen(self.cases, part.value, chunked)


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
        if self.part == Part.LLM:
            del d["export"]["chunk_width"]
            del d["export"]["attention_block"]
            if not self.llm_holds_patches:
                del d["export"]["max_patches"]
        else:
            for key in ("prefill_len", "max_context", "prefill_chunk", "kv_cache", "tp", "workers"):
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
