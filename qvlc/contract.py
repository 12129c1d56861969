"""The artifact contract, as types: file names, graph signatures and manifest.json.

A leaf module: export writes these types, validation checks graphs against them, and the runtime, ``verify`` and
``validate`` read them back. ``Manifest.to_dict`` is the only place manifest.json's layout is written, and
``Manifest.from_dict`` the only place it is read; a malformed manifest is a ``QvlcError`` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlc.errors import IntegrityError, QvlcError
from qvlc.precision import Precision
from qvlc.typed_json import from_json, to_json

MANIFEST = "manifest.json"
PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"
EMBED = "embed_tokens.bin"
PREFILL = "llm_prefill.onnx"
DECODE = "llm_decode.onnx"
WEIGHTS = "llm_weights.data"
VISUAL = "visual.onnx"
VISUAL_WEIGHTS = "visual_weights.data"
PREPROCESS = "preprocess.json"


def rank_dirs(folder: Path, tp: int) -> list[Path]:
    """Where each rank's graphs live: the artifact folder itself at tp = 1, else ``rank0/ … rank{tp-1}/``."""
    return [Path(folder)] if tp == 1 else [Path(folder) / f"rank{r}" for r in range(tp)]


# ---------------------------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output: name, static shape, dtype (NumPy name: float16, float32, int64, bool)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSig:
    """A graph's interface, declared once by the model family and checked against every exported file."""

    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def mismatches(self, inputs: tuple[TensorSig, ...], outputs: tuple[TensorSig, ...]) -> list[tuple[str, str]]:
        """(name, problem) for every difference of a graph's actual interface from this one: names, then shapes,
        then dtypes. Empty when they agree."""
        problems: list[tuple[str, str]] = []
        for kind, want, got in (("input", self.inputs, inputs), ("output", self.outputs, outputs)):
            w, g = {t.name: t for t in want}, {t.name: t for t in got}
            problems += [(n, f"missing {kind} (graph has {sorted(g)})") for n in sorted(set(w) - set(g))]
            problems += [(n, f"unexpected {kind} (contract: {sorted(w)})") for n in sorted(set(g) - set(w))]
            for n in [t.name for t in want if t.name in g]:
                a, b = g[n], w[n]
                if (tuple(a.shape), a.dtype) != (tuple(b.shape), b.dtype):
                    problems.append((n, f"{a.dtype} {list(a.shape)} != contract {b.dtype} {list(b.shape)}"))
        return problems


# ---------------------------------------------------------------------------------------------- part specs


@dataclass(frozen=True)
class LlmSpec:
    """What a runtime needs to know about an LLM artifact: the manifest's ``llm`` section."""

    prefill_len: int
    max_context: int
    tp: int
    dtype: Precision
    hidden: int
    layers: int
    head_dim: int
    kv_heads_per_rank: int
    vocab: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    eos: int | None
    image_token: int
    video_token: int
    vision_start: int
    vision_end: int
    stop_tokens: tuple[str, ...]  # token strings that end a chat turn, besides eos (the family declares them)
    deepstack_layers: int = 0  # prefill input deepstack_embeds [k,1,S,H], added after layers 0..k-1 (Qwen3-VL)
    mrope_interleaved: bool = False  # cos/sin frequencies alternate t, h, w (Qwen3-VL) instead of sections


@dataclass(frozen=True)
class VisualSpec:
    """What a runtime needs to know about a visual artifact: the manifest's ``visual`` section."""

    max_patches: int  # N
    patch_dim: int  # values per flattened patch (1176)
    head_dim: int  # Dv, width of cos/sin
    merge_size: int
    out_hidden: int  # width of the concatenated embedding
    chunk_widths: tuple[int, ...]  # widths of image_embeds_0 … image_embeds_{k-1}
    dtype: Precision
    rope_theta: float = 10000.0
    window: int = 0  # window attention: window side in merged tokens (0 = every block attends per frame)
    fullatt_blocks: tuple[int, ...] = ()  # blocks that attend per frame when window > 0
    deepstack: int = 0  # DeepStack embeddings the graph also outputs, each chunked like image_embeds (Qwen3-VL)
    pos_table_side: int = 0  # learned position table of side x side rows, gathered by pos_idx/pos_weight (0: none)

    @property
    def merge_unit(self) -> int:
        return self.merge_size**2

    @property
    def tokens(self) -> int:
        return self.max_patches // self.merge_unit

    @property
    def output_names(self) -> tuple[str, ...]:
        """image_embeds_0 … then, per DeepStack layer j, deepstack_embeds_{j}_0 …: the order of ``output_widths``."""
        n = len(self.chunk_widths)
        return tuple(f"image_embeds_{i}" for i in range(n)) + tuple(
            f"deepstack_embeds_{j}_{i}" for j in range(self.deepstack) for i in range(n))

    @property
    def output_widths(self) -> tuple[int, ...]:
        """Widths of every output: the embedding's chunks, then each DeepStack embedding's (the rows a runtime
        concatenates: [tokens, out_hidden * (1 + deepstack)])."""
        return tuple(self.chunk_widths) * (1 + self.deepstack)


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileRecord:
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class WeightFileRecord:
    file: str  # the weight file's name in the checkpoint folder
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SourceRecord:
    checkpoint: str
    weights: tuple[WeightFileRecord, ...]
    tiny_seed: int | None = None


@dataclass(frozen=True)
class GraphRecord:
    file: str  # relative to the artifact folder
    rank: int
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    nodes: int
    opset: int = 0  # the graph's own ai.onnx opset, as written (what export.opset asked for)


@dataclass(frozen=True)
class RankRecord:
    rank: int
    files: tuple[str, ...]
    weights_bytes: int
    kv_heads: tuple[int, int]
    vocab: tuple[int, int]
    split_points: tuple[dict, ...]


@dataclass(frozen=True)
class TpRecord:
    ranks: int
    reduction: dict  # node, domain, reduction, after (module names), per_graph
    kv_replicated: bool
    logits: str
    per_rank: tuple[RankRecord, ...]


@dataclass(frozen=True)
class Fp32Record:
    """export.fp32_layers, resolved: the modules the fp16 graphs compute in fp32 (transformers' names; their weights
    are stored in fp32) and the first layer or block whose residual stream the graph carries in fp32."""

    units: tuple[str, ...]
    residual_from: int | None
    source: str  # "config" (names or patterns given) or "auto" (the modules the range check flagged)


@dataclass(frozen=True)
class Manifest:
    qvlc_version: str
    part: str
    family: str  # config.json model_type
    config: dict  # the resolved config, native schema
    ignored_config_keys: tuple[str, ...]
    source: SourceRecord
    libraries: dict
    graphs: tuple[GraphRecord, ...]
    parity: dict
    llm: LlmSpec | None = None
    tp: TpRecord | None = None
    visual: VisualSpec | None = None
    files: tuple[FileRecord, ...] = ()
    fp32: Fp32Record | None = None

    def to_dict(self) -> dict:
        d = to_json(self)
        for key in ("llm", "tp", "visual", "fp32"):
            if d[key] is None:
                del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> "Manifest":
        return from_json(cls, data, where)

    def graph(self, file: str) -> GraphRecord:
        for g in self.graphs:
            if g.file == file:
                return g
        raise IntegrityError(f"{MANIFEST} lists no graph {file!r}", fix="recompile the artifact", key=file)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of an artifact folder, typed; QvlcError when it is missing or malformed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise QvlcError(f"{folder} has no {MANIFEST}, so it is not a finished artifact",
                        fix="give the folder of a finished `qvlc compile`", key=str(folder))
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{path} is {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}",
                             fix="recompile the artifact", key=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else f"not valid JSON ({exc})"
        raise IntegrityError(f"{path} is {what}", fix="recompile the artifact", key=str(path)) from None
    m = Manifest.from_dict(data, str(path))
    from qvlc.manifest_bounds import bound_problems

    if problems := bound_problems(m):
        raise IntegrityError(f"{path}: " + "; ".join(problems), fix="recompile the artifact", key=str(path))
    return m


MAX_MANIFEST_BYTES = 64 << 20
def graph_io(path: Path, file: str = "", rank: int = 0) -> GraphRecord:
    """Names, static shapes and dtypes of a graph's inputs and outputs, and its node count (reads no weights).
    A symbolic dimension is recorded as -1 (qvlc graphs have none; the contract check then reports it)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise IntegrityError(f"{path} is not a readable ONNX graph ({type(exc).__name__})",
                             fix="recompile the artifact", key=str(path)) from exc

    def describe(values) -> tuple[TensorSig, ...]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            out.append(TensorSig(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim),
                                 onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name))
        return tuple(out)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphRecord(file or Path(path).name, rank, describe(model.graph.input), describe(model.graph.output),
                       len(model.graph.node), opset)


def read_part_manifest(folder: Path, part: str, key: str | None = None) -> Manifest:
    """The typed manifest of an artifact folder that must hold ``part`` ("llm" or "visual"); QvlcError naming
    ``key`` (the option or argument that gave the folder) otherwise."""
    folder, key = Path(folder), key or str(folder)
    if not folder.is_dir():
        raise QvlcError(f"artifact folder {str(folder)!r} does not exist",
                        fix=f"give the folder of a finished `qvlc compile` (part: {part})", key=key)
    m = read_manifest(folder)
    if m.part != part or getattr(m, part) is None:
        raise QvlcError(f"{folder} is a {m.part!r} artifact, not a {part!r} one",
                        fix=f"give the folder compiled with `part: {part}`", key=key)
    return m
