"""manifest.json as types: ``Manifest.to_dict`` is the only place its layout is written and ``read_manifest`` the
only place it is read (typed by ``qvlc.artifact.json_codec``, its numbers bounded before any of them sizes work).
A malformed manifest is an ``IntegrityError`` naming the field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlc.artifact.hashing import FileDigest, listed_files, sha256_file
from qvlc.artifact.json_codec import from_json, read_json_file, to_json
from qvlc.artifact.layout import MANIFEST, MANIFEST_DIGEST
from qvlc.artifact.signature import TensorSig
from qvlc.artifact.spec import LlmSpec, VisualSpec
from qvlc.errors import IntegrityError, QvlcError


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


MAX_MANIFEST_BYTES = 64 << 20
# Numbers a manifest may hold, checked before any of them sizes work (rank paths, buffers, loops): a resealed
# manifest with ``tp: 3000000`` once made `run` build millions of rank paths.
BOUNDS = {"tp": 64, "prefill_len": 1 << 20, "max_context": 1 << 20, "hidden": 1 << 17, "layers": 1024,
          "head_dim": 4096, "kv_heads_per_rank": 1024, "vocab": 1 << 22, "max_patches": 1 << 20, "patch_dim": 1 << 16,
          "merge_size": 16, "out_hidden": 1 << 17, "window": 1 << 10}


def bound_problems(m: Manifest) -> list[str]:
    """Each spec number outside 1..its bound (window may be 0), and more than 100000 files or 1024 chunks."""
    problems = []
    for section in (m.llm, m.visual):
        for name, limit in BOUNDS.items():
            value = getattr(section, name, None)
            if value is not None and not (0 if name == "window" else 1) <= value <= limit:
                problems.append(f"{name} is {value}, outside 1..{limit}")
    if m.visual is not None and not 1 <= len(m.visual.chunk_widths) <= 1024:
        problems.append(f"{len(m.visual.chunk_widths)} chunk widths")
    if len(m.files) > 100_000:
        problems.append(f"{len(m.files)} files listed")
    return problems


def require_artifact(folder: Path, key: str, part: str = "") -> Path:
    """A folder with a manifest.json; QvlcError (bad input, naming ``key``) when the path is not an artifact at all.
    The one check of "artifact folder missing / no manifest" that every reader of an artifact makes."""
    folder = Path(folder)
    hint = f"give the folder of a finished `qvlc compile`{f' (part: {part})' if part else ''}"
    if not folder.is_dir():
        raise QvlcError(f"artifact folder {str(folder)!r} does not exist", fix=hint, key=key)
    if not (folder / MANIFEST).is_file():
        raise QvlcError(f"{folder} has no {MANIFEST}, so it is not a finished artifact", fix=hint, key=key)
    return folder


def read_manifest(folder: Path, key: str | None = None) -> Manifest:
    """The manifest of an artifact folder, typed and bounded; QvlcError when it is missing or malformed."""
    path = require_artifact(folder, key or str(folder)) / MANIFEST
    m = Manifest.from_dict(read_json_file(path, "a manifest", MAX_MANIFEST_BYTES), str(path))
    if problems := bound_problems(m):
        raise IntegrityError(f"{path}: " + "; ".join(problems), fix="recompile the artifact", key=str(path))
    return m


def read_part_manifest(folder: Path, part: str, key: str | None = None) -> Manifest:
    """The typed manifest of an artifact folder that must hold ``part`` ("llm" or "visual"); QvlcError naming
    ``key`` (the option or argument that gave the folder) otherwise."""
    key = key or str(folder)
    require_artifact(folder, key, part)
    m = read_manifest(folder, key)
    if m.part != part or getattr(m, part) is None:
        raise QvlcError(f"{folder} is a {m.part!r} artifact, not a {part!r} one",
                        fix=f"give the folder compiled with `part: {part}`", key=key)
    return m


def file_table(folder: Path, written: Mapping[str, FileDigest] | None = None) -> tuple[FileRecord, ...]:
    """Every file under ``folder`` except the manifest, its digest and the marker, sorted, with bytes and sha256.
    ``written``: digests taken as files were written (path relative to ``folder``), used while the file still has
    the size and modification time it had when it was closed; every other file is read and hashed, two at a time
    (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    written = written or {}

    def record(p: Path) -> FileRecord:
        rel = p.relative_to(folder).as_posix()
        known = written.get(rel)
        digest = known.sha256 if known is not None and known.describes(p) else sha256_file(p)
        return FileRecord(rel, p.stat().st_size, digest)

    with ThreadPoolExecutor(2) as pool:
        return tuple(pool.map(record, listed_files(folder)))


def write_manifest(folder: Path, manifest: Manifest, written: Mapping[str, FileDigest] | None = None) -> None:
    """The one place manifest.json is written: ``manifest`` with the table of every file beside it (``written``:
    digests taken as the export wrote them, ``file_table``), then its own sha256 in manifest.sha256 (so an edited
    manifest is caught too)."""
    text = dataclasses.replace(manifest, files=file_table(folder, written)).to_json()
    (folder / MANIFEST).write_text(text)
    (folder / MANIFEST_DIGEST).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}\n")


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


LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxsim", "numpy")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
