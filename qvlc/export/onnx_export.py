"""torch module → ONNX: dynamo export, optional onnxsim, and one deduplicated external weights file.

Graphs that read the same weights (prefill and decode) point into one weights file: every initializer of
1 KiB or more is written once, keyed by dtype, shape and content hash, so a weight that both graphs hold is
stored once whatever the exporter or onnxsim named it. Large tensors are 64 KiB aligned so runtimes can
memory-map them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import onnx
import onnx_ir as ir
import torch

from qvlc.artifact.hashing import FileDigest, HashingWriter
from qvlc.artifact.manifest import GraphRecord, TpRecord, graph_io
from qvlc.artifact.signature import GraphSig
from qvlc.artifact.spec import LlmSpec, VisualSpec
from qvlc.parallel import allreduce

INLINE_BELOW = 1024  # bytes; smaller initializers stay inside the .onnx file
ALIGN_LARGE = 1 << 16
LARGE = 1 << 20


@dataclass
class ExportedGraph:
    """One exported graph, still in memory (or reloaded lazily from a work file)."""

    name: str  # file name in the artifact, e.g. "llm_prefill.onnx"
    model: ir.Model


@dataclass
class ExportResult:
    """What an export stage wrote: graph records and the part's sections for the manifest, and byte counts."""

    graphs: list[GraphRecord] = field(default_factory=list)
    llm: LlmSpec | None = None
    tp: TpRecord | None = None
    visual: VisualSpec | None = None
    bytes_written: int = 0
    write_seconds: float = 0.0  # wall time spent writing (and fsyncing) those bytes
    weights_unshared_bytes: int = 0  # what per-graph weight files would have taken
    worker_peak_rss_mb: float = 0.0  # largest peak RSS of a worker process (0 when exported in-process)
    written: dict[str, FileDigest] = field(default_factory=dict)  # digests taken while writing, by relative path

    def add(self, stats: dict[str, float], graphs: list[GraphRecord]) -> None:
        """Count one ``write_shared`` (its stats) and the graphs it wrote."""
        self.graphs += graphs
        self.bytes_written += int(stats["weights_bytes"] + stats["graph_bytes"])
        self.weights_unshared_bytes += int(stats["unshared_bytes"])
        self.write_seconds += stats["write_seconds"]


def export_module(module: torch.nn.Module, args: tuple, input_names: Sequence[str], output_names: Sequence[str],
                  opset: int) -> ir.Model:
    """Dynamo-export ``module`` with static shapes; qvlc::all_reduce becomes a qvlc.AllReduce node."""
    module.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), custom_translation_table=allreduce.translation_table(),
            optimize=True, verbose=False,
        )
    model = program.model
    model.producer_name = "qvlc"
    return model


def export_graph(name: str, module: torch.nn.Module, args: tuple, sig: GraphSig, opset: int, simplify_graph: bool,
                 work_dir: Path) -> ExportedGraph:
    """Export ``module`` under the names of its declared signature (then onnxsim, if asked)."""
    graph = ExportedGraph(name, export_module(module, args, sig.input_names, sig.output_names, opset))
    return simplify(graph, work_dir) if simplify_graph else graph


def simplify(graph: ExportedGraph, work_dir: Path) -> ExportedGraph:
    """Run onnxsim path to path (works past the 2 GB protobuf limit) and reload the result lazily."""
    import onnxsim

    work_dir.mkdir(parents=True, exist_ok=True)
    src = work_dir / f"raw_{graph.name}"
    dst = work_dir / f"sim_{graph.name}"
    ir.save(graph.model, src, external_data=src.name + ".data")
    allreduce.register_onnx_schema()
    _, ok = onnxsim.simplify(str(src), output_path=str(dst), check_n=0)
    if not ok:  # onnxsim's own check; we validate the result numerically afterwards in any case
        raise RuntimeError(f"onnxsim could not verify its simplification of {graph.name}")
    return ExportedGraph(graph.name, ir.load(dst))


def write_shared(graphs: Sequence[ExportedGraph], folder: Path,
                 weights_name: str) -> tuple[dict[str, float], FileDigest]:
    """Save ``graphs`` into ``folder`` with all their large initializers in one file ``weights_name``.

    Returns stats (bytes of unique weights written, bytes a per-graph layout would have written, and the wall
    time spent writing), and the weights file's digest, taken from the bytes as they were written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / weights_name
    placed: dict[tuple, tuple[int, int]] = {}
    stats: dict[str, float] = {"weights_bytes": 0, "unshared_bytes": 0, "tensors": 0, "shared_tensors": 0,
                               "write_seconds": 0.0, "graph_bytes": 0}
    with HashingWriter(weights_path) as f:
        for graph in graphs:
            for name, value in graph.model.graph.initializers.items():
                t = value.const_value
                if t is None or t.nbytes < INLINE_BELOW:
                    continue
                data = t.tobytes()
                key = (t.dtype, tuple(t.shape), hashlib.sha256(data).digest())
                stats["unshared_bytes"] += len(data)
                stats["tensors"] += 1
                if key in placed:
                    stats["shared_tensors"] += 1
                else:
                    pos = f.tell()
                    align = ALIGN_LARGE if len(data) >= LARGE else 64
                    pad = (-pos) % align
                    t0 = time.perf_counter()
                    f.write(b"\0" * pad)
                    f.write(data)
                    stats["write_seconds"] += time.perf_counter() - t0
                    placed[key] = (pos + pad, len(data))
                    stats["weights_bytes"] += len(data)
                offset, length = placed[key]
                value.const_value = ir.ExternalTensor(
                    weights_name, offset, length, t.dtype, shape=t.shape, name=name, base_dir=folder)
        t0 = time.perf_counter()
        digest = f.close()  # flushed and fsynced
    for graph in graphs:
        ir.save(graph.model, folder / graph.name)
        stats["graph_bytes"] += (folder / graph.name).stat().st_size
    stats["write_seconds"] += time.perf_counter() - t0
    return stats, digest


def check_graph(path: Path) -> None:
    """onnx.checker on the file path (needed past 2 GB), with qvlc.AllReduce registered."""
    allreduce.register_onnx_schema()
    onnx.checker.check_model(str(path))


def finish_graphs(stage: Path, folder: Path, names: Sequence[str], rank: int) -> list[GraphRecord]:
    """onnx.checker on each written graph, then its record (file relative to the artifact folder)."""
    records = []
    for name in names:
        check_graph(folder / name)
        records.append(graph_io(folder / name, (folder / name).relative_to(stage).as_posix(), rank))
    return records
