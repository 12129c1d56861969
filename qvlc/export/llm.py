"""The LLM part's export stage: embed_tokens.bin, and per rank a prefill and a decode graph (and, with
``export.prefill_chunk``, a chunk graph) sharing one weights file."""

from __future__ import annotations

import gc
import multiprocessing
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.artifact.hashing import FileDigest
from qvlc.artifact.layout import EMBED, WEIGHTS, rank_dirs
from qvlc.artifact.manifest import GraphRecord, RankRecord, TpRecord
from qvlc.checkpoint.hf_model import LoadedCheckpoint
from qvlc.checkpoint.lazy import LazyRows, lazy_text_model
from qvlc.errors import EnvironmentFailure
from qvlc.export.onnx_export import (
    ExportResult,
    export_graph,
    finish_graphs,
    write_shared,
)
from qvlc.export.quantize import quantize_graph
from qvlc.host.embeddings import write_embed_table
from qvlc.models import family as family_of
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.islands import Islands
from qvlc.models.common.params import text_params
from qvlc.models.common.quantized import quantized_tree, rank_weights
from qvlc.models.common.text import example_inputs
from qvlc.models.common.tp import rank_layout
from qvlc.parallel.allreduce import DOMAIN, OP_TYPE
from qvlc.precision import KvCache, Precision
from qvlc.weights.imported import ImportedQuant
from qvlc.weights.quant import WeightQuant

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan

ISOLATE_BYTES = 1 << 30  # graph weights above which an export that validation follows runs in a child process


@dataclass
class RankJob:
    """Everything one rank's export needs; picklable, so a worker process can run it."""

    checkpoint: Path
    family: str  # model_type: a worker resolves the family from the registry
    dims: ModelDims
    rank: int
    tp: int
    dtype: Precision
    opset: int
    prefill_len: int
    max_context: int
    prefill_chunk: int
    simplify: bool
    stage: Path
    islands: Islands = Islands()  # export.fp32_layers, resolved
    quant: WeightQuant | ImportedQuant | None = None  # export.weights, or the checkpoint's own (GPTQ/AWQ)
    dequantize_explicit: bool = False  # int4: Cast/Sub/Mul instead of blocked DequantizeLinear
    kv_cache: KvCache = KvCache.FP  # export.kv_cache


@dataclass
class RankResult:
    rank: int
    graphs: list[GraphRecord]
    stats: dict[str, float]
    peak_rss_mb: float
    weights: FileDigest  # the rank's weights file, hashed as it was written


def export_rank(job: RankJob, text_model, lm_head) -> RankResult:
    """Prefill and decode graphs of one rank, sharing one weights file in the rank's folder."""
    fam, dims, stage = family_of(job.family), job.dims, job.stage
    folder = rank_dirs(stage, job.tp)[job.rank]
    layout = rank_layout(dims.text, job.tp, job.rank)
    dtype = job.dtype.torch
    sigs = fam.llm_signatures(fam.llm_spec(dims, job.prefill_len, job.max_context, job.tp, job.dtype,
                                           job.prefill_chunk, job.kv_cache))
    graphs, stack = [], None
    for name in sigs:  # prefill, decode (and chunk): one stack of layers, one weights file
        module, stack = fam.llm_graph(name, text_model, lm_head, dims, layout, dtype, stack, job.islands,
                                      job.kv_cache)
        graphs.append(export_graph(name, module, example_inputs(sigs[name]), sigs[name], job.opset,
                                   job.simplify, stage / "_work" / f"rank{job.rank}"))
    if job.quant is not None:  # the modules computed with the dequantized integers; the graphs now carry them
        weights, shared = rank_weights(text_model, lm_head, job.quant), {}
        for graph in graphs:
            quantize_graph(graph.model, weights, job.dequantize_explicit, shared)
    stats, digest = write_shared(graphs, folder, WEIGHTS)
    del graphs, stack
    gc.collect()
    return RankResult(job.rank, finish_graphs(stage, folder, list(sigs), job.rank), stats,
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, digest)


def _worker_init() -> None:
    """Ctrl-C reaches the whole process group: the parent alone reports it (and terminates the pool). A spawned
    worker starts with fresh loggers: quiet them as the parent's are."""
    import signal

    from qvlc.system.library_noise import quiet_libraries
    from qvlc.system.signals import unblock

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    unblock()  # the parent's watched command blocks SIGTERM/SIGINT; the pool terminates workers with SIGTERM
    quiet_libraries()


def _export_rank_in_worker(job: RankJob) -> RankResult:
    """Worker entry: read only this rank's weight slices from the checkpoint files (no model is loaded)."""
    text_model, lm_head = quantized_tree(*lazy_text_model(job.checkpoint), job.quant)
    return export_rank(job, text_model, lm_head)


def run_in_workers(fn, jobs: list, workers: int) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` spawned processes, one job per process. A worker that dies (the
    kernel's OOM killer, a signal) is an error naming the likely cause, never a hang: multiprocessing.Pool waits
    forever for the result of a killed worker (measured: a 7B int8 export at workers 2 under a 16 GiB cap)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               max_tasks_per_child=1)
    try:
        return list(pool.map(fn, jobs))
    except BrokenProcessPool as exc:
        raise EnvironmentFailure(
            "an export worker process died before finishing its rank; the kernel kills a process that exceeds the "
            "memory limit, the usual cause", key="export.workers",
            fix="set export.workers: 1 (each worker holds one rank's weights and the exporter), or compile where "
                "more memory is available") from exc
    except BaseException:  # Ctrl-C, SIGTERM: stop the workers now rather than wait for their ranks
        for proc in list((pool._processes or {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tp_record(plan: Plan, ranks: list[RankResult]) -> TpRecord:
    """The manifest's ``tp`` section: every split point and reduction, generated from the family's TP plan."""
    dims, tp, tp_plan = plan.dims, plan.cfg.export.tp, plan.family.tp_plan
    per_rank = []
    for r in ranks:
        lay = rank_layout(dims.text, tp, r.rank)
        per_rank.append(RankRecord(r.rank, (*(g.file for g in r.graphs), f"rank{r.rank}/{WEIGHTS}"),
                                   int(r.stats["weights_bytes"]), (lay.kv_head_start, lay.kv_head_start + lay.kv_heads),
                                   (lay.vocab_start, lay.vocab_start + lay.vocab),
                                   tuple(lay.split_points(tp_plan, dims.text.layers))))
    reduction = {"node": OP_TYPE, "domain": DOMAIN, "reduction": "sum", "after": tp_plan.reductions,
                 "per_graph": len(tp_plan.reductions) * dims.text.layers}
    return TpRecord(tp, reduction, dims.text.kv_heads < tp, "each rank outputs its vocab slice; concatenate in rank "
                    "order", tuple(per_rank))


def export_llm(plan: Plan, ck: LoadedCheckpoint | None, stage: Path) -> ExportResult:
    """embed_tokens.bin, then per rank the prefill and decode graphs sharing one weights file.

    With ``export.workers`` > 1 the ranks are exported by that many spawned processes, each reading only its
    slices from the checkpoint. Otherwise in this process: from views of the loaded model, or — when no model
    was loaded (``ck`` is None) — from slices read from the checkpoint files.
    """
    e = plan.cfg.export
    result = ExportResult(llm=plan.llm_spec)
    if ck is not None:
        if plan.quant is not None:  # refused by the config checks: quantized weights are read from the files
            raise RuntimeError("export.weights with a loaded model")
        text_model, lm_head = ck.text_model, ck.lm_head
        table = text_model.embed_tokens.weight.detach().numpy()
    else:
        text_model, lm_head = lazy_text_model(plan.checkpoint)
        table = LazyRows(text_model.embed_tokens.weight)  # the table is never quantized
    t0 = time.perf_counter()
    result.written[EMBED] = write_embed_table(table, stage / EMBED, e.dtype)
    result.bytes_written += result.written[EMBED].size
    result.write_seconds += time.perf_counter() - t0
    jobs = [RankJob(plan.checkpoint, plan.family.model_type, plan.dims, r, e.tp, e.dtype, e.opset, e.prefill_len,
                    e.max_context, e.prefill_chunk, e.simplify, stage, plan.islands, plan.quant,
                    e.weights.dequantize == "explicit", e.kv_cache)
            for r in range(e.tp)]
    workers = min(e.workers, e.tp)
    # A validation follows in this process: export big models in a child, whose memory all goes back to the OS
    # when it ends (measured, an in-process 2B export left ~5.5 GiB resident beside the validation's sessions).
    isolate = ck is None and plan.cfg.validate.enabled and text_params(plan.dims) * e.dtype.bytes > ISOLATE_BYTES
    if workers > 1 or isolate:
        ranks = run_in_workers(_export_rank_in_worker, jobs, workers)
    else:
        ranks = [export_rank(job, *quantized_tree(*lazy_text_model(plan.checkpoint), plan.quant))
                 if plan.quant is not None else export_rank(job, text_model, lm_head) for job in jobs]
    for r, folder in zip(ranks, rank_dirs(stage, e.tp)):
        result.add(r.stats, r.graphs)
        result.written[(folder / WEIGHTS).relative_to(stage).as_posix()] = r.weights
        result.worker_peak_rss_mb = max(result.worker_peak_rss_mb, r.peak_rss_mb if workers > 1 or isolate else 0.0)
    shutil.rmtree(stage / "_work", ignore_errors=True)  # the onnxsim work files, inside our staging folder
    if e.tp > 1:
        result.tp = tp_record(plan, ranks)
    return result
