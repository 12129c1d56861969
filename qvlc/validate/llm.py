"""Parity of the LLM graphs against transformers' own text model (fp32), in one pass per phase.

1. **Graphs.** Every prompt goes through the host path a deployment uses (``embed_tokens.bin`` in the export
   dtype, image and video rows scattered in, the family's NumPy ``get_rope_index`` and M-RoPE, left padding to
   S) into the prefill graph; then the decode graph generates greedily, carrying the KV cache, for
   ``max(decode_steps, generate_tokens - 1)`` steps, all prompts together (``qvlc.validate.llm_graphs``). Only
   one graph's sessions are alive at a time.
2. **Oracle.** Each prompt at its real length plus the tokens the graphs generated runs once, teacher-forced,
   through transformers' own modules (``qvlc.validate.oracle``: streamed one layer at a time by default), with
   positions from transformers' own ``get_rope_index`` — so the host rope code is checked too.
3. **Compare.** Prefill logits and KV, every decode step's logits and new KV, and greedy agreement: at every
   position the oracle's argmax must be the token the graphs generated next. The first position where it is not
   is the step where free-running generation would part from ``transformers.generate``: the same verdict, in one
   oracle pass. With tp > 1 every rank's slice is compared with the matching slice of the oracle, and — for a
   model whose unsplit weights fit ``UNSPLIT_MAX_BYTES`` — the recombined result with the unsplit (tp = 1)
   deployment module on the same tokens.

Graph interfaces (names → shapes → dtypes against the family's signatures) are checked first.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qvlc.artifact.layout import CHUNK, PREFILL
from qvlc.checkpoint.hf_model import LoadedCheckpoint
from qvlc.checkpoint.lazy import lazy_text_model
from qvlc.models.common.params import UNSPLIT_MAX_BYTES, text_params
from qvlc.models.common.tp import RankLayout, rank_layout
from qvlc.precision import KvCache, Runtime
from qvlc.runtime.tvm_session import TvmBuildError
from qvlc.system.memory import release_memory
from qvlc.validate.divergence import LayerCapture, diagnose
from qvlc.validate.interface import check_interface
from qvlc.validate.kv_error import add_kv, cache_error
from qvlc.validate.llm_cases import LlmCase, build_cases, with_image_rows
from qvlc.validate.llm_graphs import GraphRun, llm_runtime, run_graphs, unsplit_runtime
from qvlc.validate.metrics import ParityReport, TokenCheck
from qvlc.validate.oracle import (
    InMemoryOracle,
    OracleInput,
    OracleOutput,
    StreamedOracle,
)
from qvlc.validate.phases import Phases
from qvlc.validate.quant_error import quantization_error, recombine_kv
from qvlc.validate.ranges import RangeRecorder
from qvlc.validate.vision_oracle import StreamedVisionOracle

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan


def check_interfaces(plan: Plan, folder: Path, report: ParityReport) -> bool:
    ok = True
    for graph, path, sig in plan.family.declared_graphs(folder, llm=plan.llm_spec):
        ok &= check_interface(report, graph, path, sig)
    return ok


def vision_rows(plan: Plan, ck: LoadedCheckpoint | None, cases: list[LlmCase]) -> list[LlmCase]:
    """Cases given as pixels get their image rows from transformers' vision tower: the loaded one, or streamed
    one block at a time."""
    todo = [c for c in cases if c.pixel_values is not None]
    if not todo:
        return cases
    if ck is not None:
        with torch.no_grad():
            rows = [plan.family.tower_rows(ck.visual(torch.from_numpy(c.pixel_values),
                                                     grid_thw=torch.from_numpy(c.media.image_grids))) for c in todo]
    else:
        rows = StreamedVisionOracle(plan.family, plan.checkpoint, plan.dims).run(
            [(c.pixel_values, c.media.image_grids) for c in todo])
        gc.collect()
    got = dict(zip((c.name for c in todo), rows))
    return [with_image_rows(c, got[c.name], plan.dims.text.hidden) if c.name in got else c for c in cases]


def llm_cases(plan: Plan, ck: LoadedCheckpoint | None, seed: int = 0,
              names: list[str] | None = None) -> list[LlmCase]:
    """The validation prompts (those in ``names``; default all), image rows included (from transformers' vision
    tower). Every case is built, then the chosen ones kept, so a case is the same whichever others run."""
    embed_std = float(lazy_text_model(plan.checkpoint)[0].embed_tokens.weight.narrow(0, 0, 4096).float().std())
    spec = plan.llm_spec
    cases = build_cases(plan.dims, spec.prefill_len, seed, embed_std, plan.family.frames_as_grids,
                        spec.prefill_chunk)
    return vision_rows(plan, ck, [c for c in cases if names is None or c.name in names])


def oracle_input(case: LlmCase, continuation: list[int], image_token: int, video_token: int) -> OracleInput:
    """A prompt at its real length, then ``continuation`` (the tokens the graphs fed to their decode steps)."""
    m, ids = case.media, case.ids
    rows = {image_token: m.image_embeds, video_token: m.video_embeds}
    deep = {image_token: m.image_deepstack, video_token: m.video_deepstack}
    return OracleInput(np.concatenate([ids, continuation]).astype(np.int64), rows, m.images, m.videos,
                       m.second_per_grid_ts, len(ids), case.name, deep)


def oracle_inputs(runs: list[GraphRun], image_token: int, video_token: int) -> list[OracleInput]:
    return [oracle_input(run.case, run.tokens[:-1], image_token, video_token) for run in runs]


def validate_llm(plan: Plan, ck: LoadedCheckpoint | None, folder: Path, report: ParityReport, seed: int = 0) -> None:
    """Graphs first (their sessions released), then the oracle in one pass, then every comparison."""
    if not check_interfaces(plan, folder, report):
        report.notes.append("value checks skipped: a graph interface does not match the contract")
        return
    v, dims, spec, phases = plan.cfg.validate, plan.dims, plan.llm_spec, Phases()
    steps = max(v.decode_steps, v.generate_tokens - 1)
    chosen, skipped = v.chosen(plan.cfg.part, bool(spec.prefill_chunk))
    report.cases = {"run": chosen, "skipped": skipped}
    with phases.phase("vision rows", "transformers' vision tower on the prompts given as pixels"):
        cases = llm_cases(plan, ck, seed, chosen)
    unsplit = _unsplit(plan, ck, folder, report)
    runs = run_graphs(plan, folder, cases, steps, unsplit, phases=phases)
    del unsplit
    release_memory()
    # the chunk graph: every prompt again, its cache filled T tokens at a time, decode fed the same tokens
    chunk_runs = run_graphs(plan, folder, cases, steps, None, fed=runs, phases=phases, chunked=True) \
        if spec.prefill_chunk else []
    some = cases[:v.runtime_cases or len(cases)]  # the same cases (or the first few) and fed tokens
    others = {}
    for rt in (r for r in v.runtimes if r != Runtime.ONNXRUNTIME):
        try:
            others[rt] = run_graphs(plan, folder, some, steps, None, rt, runs, phases)
        except TvmBuildError as exc:  # the graphs do not import into this compiler: a failed check, not a crash
            with report.using(rt):
                report.fail("llm", str(rt), "build", str(exc))
    oracle = InMemoryOracle(plan.family, ck.model, dims, spec.kv_cache) if ck is not None else \
        StreamedOracle(plan.family, plan.checkpoint, dims, plan.quant, spec.kv_cache)
    inputs = oracle_inputs(runs, dims.tokens.image, dims.tokens.video)
    layouts = [rank_layout(dims.text, spec.tp, r) for r in range(spec.tp)]
    ranges = RangeRecorder()
    with phases.phase("oracle", f"{type(oracle).__name__}, fp32, {sum(len(i.ids) for i in inputs)} tokens"):
        refs = oracle.run(inputs, ranges)
    ranges.to_report(report, plan.islands)
    for rt, rt_runs in {Runtime.ONNXRUNTIME: runs, **others}.items():
        with report.using(rt):
            for run, ref in zip(rt_runs, refs):
                compare_run(report, run, ref, layouts, spec.prefill_len, v.decode_steps, v.generate_tokens,
                            spec.dtype, kv_cache=spec.kv_cache)
    if chunk_runs:
        compare_chunks(plan, report, chunk_runs, runs, refs, layouts)
    report.notes.append(f"oracle: {type(oracle).__name__}; each prompt then {steps} greedy decode steps of the "
                        "graphs, the oracle teacher-forced on the tokens the graphs chose")
    if skipped:
        report.notes.append(f"validate.cases: {', '.join(skipped)} skipped (run: {', '.join(chosen)})")
    _error_sections(plan, report, runs, inputs, layouts, phases)
    if others:
        report.notes.append(f"{', '.join(map(str, others))}: {len(some)} of the {len(cases)} prompts "
                            "(validate.runtime_cases); each decode step is fed the token ONNX Runtime chose, and the "
                            "greedy check compares its own argmax at every step")
    failed = next((c for c in report.checks if not c.passed and c.metrics), None)
    if failed is not None:
        chunk = "chunk" in failed.graph  # chunk, decode after chunk, chunk+decode
        run = next(r for r in (chunk_runs if chunk else runs) if r.case.name == failed.case.split("/")[0])
        with report.using(Runtime(failed.runtime)), phases.phase("diagnosis", "first divergent layer"):
            diagnose_prefill(plan, folder, report, run, oracle, chunk)
    report.phases = phases.rows


def compare_chunks(plan: Plan, report: ParityReport, chunk_runs: list[GraphRun], runs: list[GraphRun],
                   refs: list[OracleOutput], layouts: list[RankLayout]) -> None:
    """The chunk path against the oracle (``compare_run``), and its greedy tokens against the prefill path's."""
    v, spec = plan.cfg.validate, plan.llm_spec
    for run, full, ref in zip(chunk_runs, runs, refs):
        compare_run(report, run, ref, layouts, spec.prefill_len, v.decode_steps, v.generate_tokens, spec.dtype,
                    first="chunk", kv_cache=spec.kv_cache)
        report.tokens.append(TokenCheck("chunk vs prefill", run.case.name, full.tokens[:v.generate_tokens],
                                        run.tokens[:v.generate_tokens], required=spec.dtype == "fp32"))
    report.notes.append(f"chunk graph: every prompt again through llm_chunk.onnx, {spec.prefill_chunk} tokens a "
                        "call (the first chunk left-padded), then decode fed the tokens the prefill path chose; "
                        "'chunk vs prefill' compares the greedy tokens of both paths")


def _unsplit(plan: Plan, ck: LoadedCheckpoint | None, folder: Path, report: ParityReport):
    """The unsplit (tp = 1) deployment module the rank graphs are compared with, when it is small enough."""
    spec = plan.llm_spec
    if spec.tp == 1:
        return None
    size = text_params(plan.dims) * spec.dtype.bytes
    if size <= UNSPLIT_MAX_BYTES:
        return unsplit_runtime(plan, ck, folder)
    report.notes.append(f"the tp = 1 comparison was not run: the unsplit module would hold "
                        f"{size / 1e9:.1f} GB of {spec.dtype.value} weights in torch (it runs for models "
                        f"up to {UNSPLIT_MAX_BYTES / 1e9:.1f} GB); every rank's slices and the "
                        "recombined result are compared with the fp32 oracle")
    return None


def _error_sections(plan: Plan, report: ParityReport, runs, inputs, layouts, phases: Phases) -> None:
    """What quantization costs, each against a second oracle pass: integer weights against the unquantized
    checkpoint, an int8 KV cache against an unquantized cache."""
    with phases.phase("quantization error", "the graphs against the unquantized checkpoint (a second oracle)",
                      record=plan.quant is not None and plan.imported is None):
        _quantization(plan, report, runs, inputs, layouts)
    if plan.llm_spec.kv_cache == KvCache.INT8:
        with phases.phase("kv cache error", "the graphs against the same model with an unquantized cache"):
            cache_error(plan, report, runs, inputs)
        report.notes.append("kv_cache int8: the oracle applies the cache rule inside transformers' cache update "
                            "(exactness); 'KV cache error' compares the graphs with an unquantized cache")


def _quantization(plan: Plan, report: ParityReport, runs, inputs, layouts) -> None:
    """Imported integers: a note and an empty quantization record; our own: the error against the original."""
    if plan.imported is not None:
        i = plan.imported
        report.notes.append(f"weights: the checkpoint's own {i.method} int{i.bits} integers (groups of "
                            f"{i.group_size}), compiled as they are; the oracle carries them dequantized (exactness)")
        report.quantization = {"format": f"int{i.bits}", "group_size": i.group_size, "method": f"imported {i.method}",
                               "symmetric": False, "min_cosine": None, "reference": None, "checks": []}
    elif plan.quant is not None:
        report.notes.append("weights: the oracle carries the dequantized integers of the graphs (exactness); "
                            "'Quantization error' compares the graphs with the unquantized checkpoint")
        quantization_error(plan, report, runs, inputs, layouts)


def diagnose_prefill(plan: Plan, folder: Path, report: ParityReport, run: GraphRun, oracle,
                     chunk: bool = False) -> None:
    """The first divergent decoder layer of the prefill graph (``chunk``: of the chunk graph, on the prompt's last
    chunk against the cache the chunks before it wrote) on a case that failed (tp = 1 graphs)."""
    if plan.llm_spec.tp > 1:
        report.notes.append("first divergent layer: not diagnosed for tp > 1 (a rank graph's residual stream is cut "
                            "at its reductions); compile at tp = 1 to find it")
        return
    w, tokens = run.window, plan.dims.tokens
    capture = LayerCapture()
    oracle.run([oracle_input(run.case, [], tokens.image, tokens.video)], capture)
    if not chunk:
        feed = llm_runtime(plan, folder).prefill_feed(w.embeds, w.positions, w.mask, w.deepstack)
        diagnose(report, folder / PREFILL, "llm", feed, np.flatnonzero(w.mask), capture, run.case.name)
        return
    rt = llm_runtime(plan, folder, chunked=True)
    *before, last = rt.chunk_feeds(w.embeds, w.positions, w.mask, w.deepstack)
    rt.run_chunks(before)  # the cache the last chunk reads
    rows = np.flatnonzero(last["attention_mask"][0])
    capture.outputs = {m: x[len(x) - len(rows):] for m, x in capture.outputs.items()}  # the last chunk's real rows
    diagnose(report, folder / CHUNK, "llm", rt.with_past(last, rt.state)[0], rows, capture,
             f"{run.case.name} (last chunk)")


def compare_run(report: ParityReport, run: GraphRun, ref: OracleOutput, layouts: list[RankLayout], S: int,
                decode_steps: int, generate_tokens: int, dtype, first: str = "prefill",
                kv_cache: KvCache = KvCache.FP) -> None:
    """One prompt's graphs against the oracle: ``first`` (prefill, or chunk: the call that filled the cache),
    then every decode step, and the greedy tokens."""
    name, n = run.case.name, len(run.case.ids)
    if run.window.delta + S != ref.delta + n:
        report.fail("host", name, "rope_delta", f"host rope_delta {run.window.delta} (padded to {S}) is not "
                                                f"transformers' {ref.delta} (unpadded, {n} tokens)")
    _compare_step(report, first, name, run.logits[0], run.kv[0], ref.logits[0], ref.kv[..., :n, :], layouts,
                  kv_cache)
    if run.unsplit_logits:
        report.add("prefill vs tp=1", name, "logits", run.unsplit_logits[0], np.concatenate(run.logits[0]))
    for k in range(1, len(run.logits)):
        case = f"{name}/step{k - 1}"
        _compare_step(report, "decode" if first == "prefill" else f"decode after {first}", case, run.logits[k],
                      run.kv[k], ref.logits[k], ref.kv[..., n + k - 1:n + k, :], layouts, kv_cache)
        if run.unsplit_logits:
            report.add("decode vs tp=1", case, "logits", run.unsplit_logits[k], np.concatenate(run.logits[k]))
    expected = [int(np.argmax(x)) for x in ref.logits[:generate_tokens]]
    report.tokens.append(TokenCheck(f"{first}+decode", name, expected, run.tokens[:generate_tokens],
                                    required=dtype == "fp32", runtime=str(report.runtime)))


def _compare_step(report: ParityReport, graph: str, case: str, logits: list[np.ndarray], kv: list[np.ndarray],
                  ref_logits: np.ndarray, ref_kv: np.ndarray, layouts: list[RankLayout],
                  kv_cache: KvCache = KvCache.FP) -> None:
    """Logits and KV, per rank (tp > 1) and recombined. ``ref_kv`` and each rank's ``kv``: [L,2,kvH,T,D] (an int8
    cache: the values attention reads, ``qvlc.validate.kv_error.add_kv``)."""
    report.add(graph, case, "logits", ref_logits, np.concatenate(logits))
    if len(logits) > 1:
        for r, (lay, lg, k) in enumerate(zip(layouts, logits, kv)):
            report.add(graph, case, f"rank{r}.logits", ref_logits[lay.vocab_start:lay.vocab_start + lay.vocab], lg)
            add_kv(report, graph, case, f"rank{r}.present_key_values",
                   ref_kv[:, :, lay.kv_head_start:lay.kv_head_start + lay.kv_heads], k, kv_cache)
    add_kv(report, graph, case, "present_key_values", ref_kv, recombine_kv(kv, layouts), kv_cache)
