"""The LLM part's export stage: embed_tokens.bin, and per rank a prefill and a decode graph sharing one weights
file."""

from __future__ import annotations

import gc
import multiprocessing
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.artifacts import discard
from qvlc.export.onnx_export import ExportedGraph, ExportResult, check_graph, export_module, graph_io, simplify, \
    write_shared
from qvlc.host.embeddings import write_embed_table
from qvlc.models.qwen2_vl import llm as llm_mod
from qvlc.models.qwen2_vl.checkpoint import LoadedCheckpoint
from qvlc.models.qwen2_vl.dims import Qwen2VLDims
from qvlc.models.qwen2_vl.lazy import LazyRows, lazy_text_model
from qvlc.runtime import DECODE, EMBED, PREFILL, WEIGHTS, LlmSpec, rank_dirs

if TYPE_CHECKING:
    from qvlc.pipeline import Plan


def llm_spec(plan: "Plan") -> LlmSpec:
    cfg, t = plan.cfg, plan.dims.text
    layout = llm_mod.rank_layout(t, cfg.export.tp, 0)
    return LlmSpec(cfg.export.prefill_len, cfg.export.max_context, cfg.export.tp, cfg.export.dtype, t.hidden,
                   t.layers, t.head_dim, layout.kv_heads, t.vocab, t.rope_theta, t.mrope_section,
                   plan.dims.tokens.eos, plan.dims.tokens.image)


@dataclass
class RankJob:
    """Everything one rank's export needs; picklable, so a worker process can run it."""

    checkpoint: Path
    dims: Qwen2VLDims
    rank: int
    tp: int
    dtype: str
    opset: int
    prefill_len: int
    max_context: int
    simplify: bool
    stage: Path


@dataclass
class RankResult:
    rank: int
    graphs: list[dict]
    stats: dict[str, float]
    peak_rss_mb: float


def export_rank(job: RankJob, text_model, lm_head) -> RankResult:
    """Prefill and decode graphs of one rank, sharing one weights file in the rank's folder."""
    dims, stage = job.dims, job.stage
    folder = rank_dirs(stage, job.tp)[job.rank]
    layout = llm_mod.rank_layout(dims.text, job.tp, job.rank)
    dtype = llm_mod.DTYPES[job.dtype]
    stack = llm_mod.TextStack(text_model, lm_head, dims.text, layout, dtype)
    prefill_args, decode_args = llm_mod.example_inputs(dims.text, layout, dtype, job.prefill_len, job.max_context)
    graphs = []
    for name, cls, args in ((PREFILL, llm_mod.PrefillGraph, prefill_args),
                            (DECODE, llm_mod.DecodeGraph, decode_args)):
        g = ExportedGraph(name, export_module(cls(stack), args, cls.input_names, cls.output_names, job.opset))
        if job.simplify:
            g = simplify(g, stage / "_work" / f"rank{job.rank}")
        graphs.append(g)
    stats = write_shared(graphs, folder, WEIGHTS)
    rows = []
    for g in graphs:
        check_graph(folder / g.name)
        stats["graph_bytes"] = stats.get("graph_bytes", 0) + (folder / g.name).stat().st_size
        rows.append({"file": (folder / g.name).relative_to(stage).as_posix(), "rank": job.rank,
                     **graph_io(folder / g.name)})
    del graphs, stack
    gc.collect()
    return RankResult(job.rank, rows, stats, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _export_rank_in_worker(job: RankJob) -> RankResult:
    """Worker entry: read only this rank's weight slices from the checkpoint files (no model is loaded)."""
    text_model, lm_head = lazy_text_model(job.checkpoint)
    return export_rank(job, text_model, lm_head)


def export_llm(plan: "Plan", ck: LoadedCheckpoint | None, stage: Path, simplify_graphs: bool) -> ExportResult:
    """embed_tokens.bin, then per rank the prefill and decode graphs sharing one weights file.

    With ``export.workers`` > 1 the ranks are exported by that many spawned processes, each reading only its
    slices from the checkpoint. Otherwise in this process: from views of the loaded model, or — when no model
    was loaded (``ck`` is None) — from slices read from the checkpoint files.
    """
    cfg, dims = plan.cfg, plan.dims
    e = cfg.export
    result = ExportResult()
    if ck is not None:
        text_model, lm_head = ck.text_model, ck.lm_head
        table = text_model.embed_tokens.weight.detach().numpy()
    else:
        text_model, lm_head = lazy_text_model(plan.checkpoint)
        table = LazyRows(text_model.embed_tokens.weight)
    t0 = time.perf_counter()
    result.bytes_written += write_embed_table(table, stage / EMBED, e.dtype)
    result.write_seconds += time.perf_counter() - t0
    jobs = [RankJob(plan.checkpoint, dims, r, e.tp, e.dtype, e.opset, e.prefill_len, e.max_context,
                    simplify_graphs, stage) for r in range(e.tp)]
    workers = min(e.workers, e.tp)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, maxtasksperchild=1) as pool:
            ranks = pool.map(_export_rank_in_worker, jobs, chunksize=1)
    else:
        ranks = [export_rank(job, text_model, lm_head) for job in jobs]
    per_rank = []
    for r in ranks:
        layout = llm_mod.rank_layout(dims.text, e.tp, r.rank)
        result.graphs += r.graphs
        result.bytes_written += int(r.stats["weights_bytes"] + r.stats["graph_bytes"])
        result.weights_unshared_bytes += int(r.stats["unshared_bytes"])
        result.write_seconds += r.stats["write_seconds"]
        result.worker_peak_rss_mb = max(result.worker_peak_rss_mb, r.peak_rss_mb if workers > 1 else 0.0)
        if e.tp > 1:
            per_rank.append({"rank": r.rank, "files": [f"rank{r.rank}/{n}" for n in (PREFILL, DECODE, WEIGHTS)],
                             "weights_bytes": int(r.stats["weights_bytes"]),
                             "kv_heads": [layout.kv_head_start, layout.kv_head_start + layout.kv_heads],
                             "vocab": [layout.vocab_start, layout.vocab_start + layout.vocab],
                             "split_points": layout.split_points(dims.text.layers)})
    discard(stage / "_work")
    spec = llm_spec(plan)
    result.manifest = {"llm": {**spec.__dict__, "mrope_section": list(spec.mrope_section)}}
    if e.tp > 1:
        result.manifest["tp"] = {
            "ranks": e.tp,
            "reduction": {"node": "AllReduce", "domain": "qvlc", "reduction": "sum",
                          "after": ["self_attn.o_proj", "mlp.down_proj"], "per_graph": 2 * dims.text.layers},
            "kv_replicated": dims.text.kv_heads < e.tp,
            "logits": "each rank outputs its vocab slice; concatenate in rank order",
            "per_rank": per_rank,
        }
    return result
