"""`qvlc compile`, as stages: check → load → export → (simplify) → validate → write manifest → publish.

Each stage is a short function returning a typed result; ``compile_artifact`` reads like the list above.
Nothing here prints: progress goes through the ``Progress`` the caller passes.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from qvlc import __version__
from qvlc.artifacts import discard, library_versions, make_staging, publish, refuse_existing, write_manifest
from qvlc.config import Config, check_against_model
from qvlc.errors import ParityError
from qvlc.export.onnx_export import ExportedGraph, check_graph, export_module, graph_io, simplify, write_shared
from qvlc.host.embeddings import write_embed_table
from qvlc.models.qwen2_vl import llm as llm_mod
from qvlc.models.qwen2_vl.checkpoint import LoadedCheckpoint, check_checkpoint, load_checkpoint, sha256_file, \
    weight_files
from qvlc.models.qwen2_vl.dims import Qwen2VLDims
from qvlc.models.qwen2_vl.tiny import TINY_SEED, tiny_checkpoint
from qvlc.runtime import DECODE, EMBED, PREFILL, WEIGHTS, LlmSpec, rank_dirs
from qvlc.validate.metrics import TOLERANCES, ParityReport


class Progress(Protocol):
    def stage(self, name: str) -> contextlib.AbstractContextManager[dict]: ...


class NullProgress:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        yield {}


@dataclass
class Plan:
    """A config that passed every check that needs no weights, with its checkpoint resolved."""

    cfg: Config
    checkpoint: Path
    dims: Qwen2VLDims


@dataclass
class ExportResult:
    graphs: list[dict] = field(default_factory=list)  # one row per graph file: path, rank, io, nodes
    bytes_written: int = 0
    weights_unshared_bytes: int = 0
    tp: dict = field(default_factory=dict)


@dataclass
class CompileResult:
    folder: Path
    report: ParityReport | None
    timings: dict[str, float]
    export: ExportResult


# ---------------------------------------------------------------------------------------------- stages


def check(cfg: Config) -> Plan:
    """Every check that needs no weight: the config, then the checkpoint folder and its config.json."""
    folder = tiny_checkpoint() if cfg.is_tiny else Path(cfg.model.checkpoint).expanduser()
    dims = check_checkpoint(folder)
    check_against_model(cfg, dims)
    return Plan(cfg, folder, dims)


def load(plan: Plan) -> LoadedCheckpoint:
    return load_checkpoint(plan.checkpoint)


def llm_spec(plan: Plan) -> LlmSpec:
    cfg, t = plan.cfg, plan.dims.text
    layout = llm_mod.rank_layout(t, cfg.export.tp, 0)
    return LlmSpec(cfg.export.prefill_len, cfg.export.max_context, cfg.export.tp, cfg.export.dtype, t.hidden,
                   t.layers, t.head_dim, layout.kv_heads, t.vocab, t.rope_theta, t.mrope_section,
                   plan.dims.tokens.eos, plan.dims.tokens.image)


def export_llm(plan: Plan, ck: LoadedCheckpoint, stage: Path, simplify_graphs: bool) -> ExportResult:
    """embed_tokens.bin, then per rank the prefill and decode graphs sharing one weights file."""
    cfg, dims = plan.cfg, plan.dims
    e = cfg.export
    result = ExportResult()
    table = ck.text_model.embed_tokens.weight.detach().numpy()
    result.bytes_written += write_embed_table(table, stage / EMBED, e.dtype)
    dtype = llm_mod.DTYPES[e.dtype]
    split_points = []
    for rank, folder in enumerate(rank_dirs(stage, e.tp)):
        layout = llm_mod.rank_layout(dims.text, e.tp, rank)
        stack = llm_mod.TextStack(ck.text_model, ck.lm_head, dims.text, layout, dtype)
        prefill_args, decode_args = llm_mod.example_inputs(dims.text, layout, dtype, e.prefill_len, e.max_context)
        graphs = []
        for name, cls, args in ((PREFILL, llm_mod.PrefillGraph, prefill_args),
                                (DECODE, llm_mod.DecodeGraph, decode_args)):
            g = ExportedGraph(name, export_module(cls(stack), args, cls.input_names, cls.output_names, e.opset))
            if simplify_graphs:
                g = simplify(g, stage / "_work" / f"rank{rank}")
            graphs.append(g)
        stats = write_shared(graphs, folder, WEIGHTS)
        result.bytes_written += stats["weights_bytes"]
        result.weights_unshared_bytes += stats["unshared_bytes"]
        for g in graphs:
            check_graph(folder / g.name)
            result.bytes_written += (folder / g.name).stat().st_size
            result.graphs.append({"file": (folder / g.name).relative_to(stage).as_posix(), "rank": rank,
                                  **graph_io(folder / g.name)})
        if e.tp > 1:
            split_points.append({"rank": rank, "files": [f"rank{rank}/{n}" for n in (PREFILL, DECODE, WEIGHTS)],
                                 "kv_heads": [layout.kv_head_start, layout.kv_head_start + layout.kv_heads],
                                 "vocab": [layout.vocab_start, layout.vocab_start + layout.vocab],
                                 "split_points": layout.split_points(dims.text.layers)})
        del graphs, stack
        gc.collect()
    discard(stage / "_work")
    result.tp = {"ranks": e.tp, "reduction": "qvlc.AllReduce (sum) after o_proj and after down_proj",
                 "kv_replicated": dims.text.kv_heads < e.tp, "per_rank": split_points}
    return result


def validate(plan: Plan, ck: LoadedCheckpoint, stage: Path) -> ParityReport:
    from qvlc.validate.llm import validate_llm

    cfg = plan.cfg
    report = ParityReport(cfg.part, cfg.export.dtype, TOLERANCES[cfg.export.dtype])
    validate_llm(ck, stage, llm_spec(plan), cfg.validate.decode_steps, cfg.validate.generate_tokens, report)
    return report


def manifest(plan: Plan, exported: ExportResult, report: ParityReport | None) -> dict:
    cfg = plan.cfg
    source = {"checkpoint": cfg.model.checkpoint,
              "weights": [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in weight_files(plan.checkpoint)]}
    if cfg.is_tiny:
        source["tiny_seed"] = TINY_SEED
    spec = llm_spec(plan)
    return {
        "qvlc_version": __version__,
        "part": cfg.part,
        "config": cfg.to_dict(),
        "source": source,
        "libraries": library_versions(),
        "llm": {**spec.__dict__, "mrope_section": list(spec.mrope_section)},
        "graphs": exported.graphs,
        "tp": exported.tp,
        "parity": report.summary() if report else {"passed": None, "skipped": "validate.enabled is false"},
    }


# ---------------------------------------------------------------------------------------------- driver


def compile_artifact(cfg: Config, force: bool = False, progress: Progress | None = None) -> CompileResult:
    """Run every stage into a staging folder; publish it only when complete and proven.

    A parity failure keeps the staging folder's contents as ``<name>.failed/`` for inspection (never under the
    artifact's own name) and raises ``ParityError`` listing every failure.
    """
    progress = progress or NullProgress()
    timings: dict[str, float] = {}
    final = cfg.artifact_dir

    def timed(name: str):
        @contextlib.contextmanager
        def run() -> Iterator[dict]:
            t0 = time.perf_counter()
            with progress.stage(name) as info:
                yield info
            timings[name] = time.perf_counter() - t0
        return run()

    with timed("check"):
        refuse_existing(final, force)
        plan = check(cfg)
    stage = make_staging(final)
    try:
        with timed("load"):
            ck = load(plan)
        with timed("export" + (" + simplify" if cfg.export.simplify else "")):
            exported = export_llm(plan, ck, stage, cfg.export.simplify)
        report = None
        if cfg.validate.enabled:
            with timed("validate"):
                report = validate(plan, ck, stage)
                report.write(stage)
        with timed("manifest"):
            write_manifest(stage, manifest(plan, exported, report))
        if report is not None and not report.passed:
            failed = final.parent / f"{final.name}.failed"
            discard(failed)
            stage.rename(failed)
            raise ParityError(f"{len(report.failures)} parity check(s) failed:\n  - " +
                              "\n  - ".join(report.failures),
                              fix=f"see {failed / 'parity.md'}; nothing was written to {final}")
        with timed("publish"):
            publish(stage, final, force)
    finally:
        if stage.exists():
            discard(stage)
    return CompileResult(final, report, timings, exported)
