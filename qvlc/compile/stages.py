"""`qvlc compile`, as stages: check → load → export → (simplify) → validate → write manifest → publish.

Each stage is a short function returning a typed result; ``compile_artifact`` reads like the list above.
Nothing here prints: progress goes through the ``Progress`` the caller passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from qvlc import __version__
from qvlc.artifact.hashing import sha256_file
from qvlc.artifact.manifest import (
    Fp32Record,
    Manifest,
    SourceRecord,
    WeightFileRecord,
    library_versions,
    write_manifest,
)
from qvlc.artifact.publish import (
    CompileLock,
    discard,
    keep_failed,
    make_staging,
    publish,
    refuse_existing,
)
from qvlc.artifact.trust import Trust, checked_artifact, manifest_digest
from qvlc.checkpoint.hf_model import (
    LoadedCheckpoint,
    load_checkpoint,
    load_vision_tower,
)
from qvlc.checkpoint.load import weight_files
from qvlc.checkpoint.tiny import TINY_SEED
from qvlc.compile.plan import Plan, checked_plan
from qvlc.config.loading import config_from_dict
from qvlc.config.schema import Config, OracleKind, Part
from qvlc.errors import ParityError, QvlcError
from qvlc.export.onnx_export import ExportResult
from qvlc.models import artifact_family
from qvlc.models.common.islands import Islands
from qvlc.system.memory import release_memory
from qvlc.validate.metrics import ParityReport


class Progress(Protocol):
    def stage(self, name: str) -> contextlib.AbstractContextManager[dict]: ...


class NullProgress:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        yield {}


@dataclass
class CompileResult:
    folder: Path
    report: ParityReport | None
    timings: dict[str, float]
    export: ExportResult
    digest: str = ""  # sha256 of the published manifest.json: what `--expect-digest` pins


# ---------------------------------------------------------------------------------------------- stages


def load(plan: Plan) -> LoadedCheckpoint | None:
    """The transformers model in fp32 when something holds it: the visual export (it reads the tower's weights
    from it), and the in-memory oracle (``validate.oracle: memory``: the whole model for the LLM).

    Otherwise nothing is loaded: the LLM export reads each rank's slices straight from the checkpoint files, and
    the streamed oracle reads one layer at a time, so a model too large for this machine in fp32 (7B: ~33 GB)
    still compiles and validates.
    """
    in_memory = plan.cfg.validate.enabled and plan.cfg.validate.oracle == OracleKind.MEMORY
    if plan.cfg.part == Part.LLM and not in_memory:
        return None
    if plan.cfg.part == Part.VISUAL and not in_memory:  # only the export reads it: the tower in the export dtype
        return load_vision_tower(plan.checkpoint, plan.family, plan.dims, plan.cfg.export.dtype.torch)
    return load_oracle(plan)


def load_oracle(plan: Plan) -> LoadedCheckpoint:
    """What the part's parity check compares with: the whole model for the LLM, the vision tower alone for the
    visual part (2B: 2.7 GB instead of 8.8 GB in fp32)."""
    loader = load_vision_tower if plan.cfg.part == Part.VISUAL else load_checkpoint
    return loader(plan.checkpoint, plan.family, plan.dims)


def export(plan: Plan, ck: LoadedCheckpoint | None, stage: Path) -> ExportResult:
    if plan.cfg.part == Part.LLM:
        from qvlc.export.llm import export_llm

        return export_llm(plan, ck, stage)
    from qvlc.export.visual import export_visual

    return export_visual(plan, ck, stage)


def validate(plan: Plan, ck: LoadedCheckpoint, folder: Path) -> ParityReport:
    cfg = plan.cfg
    report = ParityReport(str(cfg.part), cfg.export.dtype, cache=cfg.export.kv_cache)
    if cfg.part == Part.LLM:
        from qvlc.validate.llm import validate_llm

        validate_llm(plan, ck, folder, report)
    else:
        from qvlc.validate.visual import validate_visual

        validate_visual(plan, ck, folder, report)
    return report


def source_record(plan: Plan, stop: threading.Event | None = None) -> SourceRecord:
    """The checkpoint's weight files with their sha256 (``stop`` set: give up early; the record is then unused)."""
    weights = tuple(WeightFileRecord(p.name, p.stat().st_size, sha256_file(p, stop=stop))
                    for p in weight_files(plan.checkpoint))
    return SourceRecord(plan.cfg.model.checkpoint, weights, TINY_SEED if plan.cfg.is_tiny else None)


@contextlib.contextmanager
def hashed_in_background(plan: Plan) -> Iterator[Future]:
    """The checkpoint's ``source_record``, hashed by a thread while the compile loads, exports and validates (the
    export reads the same files; hashlib and file reads release the GIL). Leaving the block early stops it."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(1, thread_name_prefix="qvlc-source-hash")
    try:
        yield pool.submit(source_record, plan, stop)
    finally:
        stop.set()
        pool.shutdown(wait=True)


def manifest(plan: Plan, exported: ExportResult, report: ParityReport | None, source: SourceRecord) -> Manifest:
    cfg = plan.cfg
    return Manifest(
        qvlc_version=__version__, part=str(cfg.part), family=plan.family.model_type, config=cfg.to_dict(),
        ignored_config_keys=tuple(cfg.ignored), source=source, libraries=library_versions(),
        graphs=tuple(exported.graphs),
        parity=report.summary() if report else {"passed": None, "skipped": "validate.enabled is false"},
        llm=exported.llm, tp=exported.tp, visual=exported.visual, fp32=fp32_record(plan))


def fp32_record(plan: Plan) -> Fp32Record | None:
    isl = plan.islands
    return Fp32Record(isl.units, isl.residual_from, "auto" if plan.auto else "config") if isl else None


# ---------------------------------------------------------------------------------------------- driver


def compile_artifact(cfg: Config, force: bool = False, progress: Progress | None = None) -> CompileResult:
    """Run every stage into a staging folder; publish it only when complete and proven.

    A parity failure keeps the staging folder's contents as ``<name>.failed/`` for inspection (never under the
    artifact's own name) and raises ``ParityError`` listing every failure.
    """
    progress = progress or NullProgress()
    timings: dict[str, float] = {}

    def timed(name: str):
        @contextlib.contextmanager
        def run() -> Iterator[dict]:
            t0 = time.perf_counter()
            with progress.stage(name) as info:
                yield info
            timings[name] = time.perf_counter() - t0
        return run()

    with CompileLock(cfg.artifact_dir):
        return _compile_locked(cfg, force, timed, timings)


def _compile_locked(cfg: Config, force: bool, timed, timings: dict[str, float]) -> CompileResult:
    final = cfg.artifact_dir
    with timed("check"):
        refuse_existing(final, force)
        plan = checked_plan(cfg)
        if plan.calibrating:  # the calibration set is read and tokenized now: a bad file fails before any weight
            from qvlc.export.calibration_data import calibration_set

            plan = dataclasses.replace(plan, calibration=calibration_set(cfg, plan.checkpoint, plan.dims.text.vocab))
    with hashed_in_background(plan) as source:
        return _compile_staged(plan, make_staging(final), force, timed, timings, source)


def _compile_staged(plan: Plan, stage: Path, force: bool, timed, timings: dict[str, float],
                    source: Future) -> CompileResult:
    cfg, final = plan.cfg, plan.cfg.artifact_dir
    try:
        with timed("load"):
            ck = load(plan)
        if plan.calibrating:
            with timed("calibrate"):  # GPTQ, streamed layer by layer: the integers every later stage reads
                from qvlc.export.calibrate import calibrate

                plan = dataclasses.replace(plan, calibrated=calibrate(plan, stage))
        if plan.auto and cfg.export.dtype == "fp16":
            with timed("fp32 probe"):  # export.fp32_layers: auto — the range check on the cases, before the export
                from qvlc.validate.probe import probe_islands

                plan = dataclasses.replace(plan, auto_islands=probe_islands(
                    plan, ck if cfg.validate.oracle == OracleKind.MEMORY else None))
        with timed("export" + (" + simplify" if cfg.export.simplify else "")):
            exported = export(plan, ck, stage)
        if cfg.validate.oracle == OracleKind.STREAMED:
            ck = None  # the model the export read from is not the oracle: let it go before validation
        release_memory()
        report = None
        if cfg.validate.enabled:
            with timed("validate"):
                report = validate(plan, ck, stage)
                report.write(stage)
        with timed("manifest"):
            write_manifest(stage, manifest(plan, exported, report, source.result()), exported.written)
        if report is not None and not report.passed:
            failed = keep_failed(stage, final)
            raise ParityError(f"{len(report.failures)} parity check(s) failed:\n  - " +
                              "\n  - ".join(report.failures) + (f"\n  {report.cause}" if report.cause else ""),
                              fix=f"see {failed / 'parity.md'}; nothing was written to {final}")
        with timed("publish"):
            publish(stage, final, force)
    finally:
        if stage.exists():
            discard(stage)
    return CompileResult(final, report, timings, exported, manifest_digest(final))


def calibrated_store(folder: Path) -> Path:
    from qvlc.weights.gptq import STORE

    store = Path(folder) / STORE
    if not store.is_file():
        raise QvlcError(f"{folder} was compiled with export.weights.method gptq, but its calibrated integers "
                        f"({STORE}) are missing", fix="restore the artifact's calibration/ folder, or recompile")
    return store


def validate_artifact(folder: Path, progress: Progress | None = None, runtimes: tuple[str, ...] | None = None,
                      digests: frozenset[str] = frozenset()) -> ParityReport:
    """`qvlc validate`: re-run the parity check of an existing artifact against its source checkpoint.

    Reads the resolved config from the manifest; writes nothing into the artifact. ``runtimes`` (names) run the
    cases on those runtimes beside ONNX Runtime instead of the ones the compile used.
    """
    progress = progress or NullProgress()
    # every file hashed (cheap next to the proof), then the graphs against what their family declares
    m = checked_artifact(folder, None, str(folder), Trust(hashes=True, digests=digests))
    artifact_family(folder, m, str(folder))
    raw = m.config
    if runtimes is not None:
        raw = {**raw, "validate": {**raw.get("validate", {}),
                                   "runtimes": list(dict.fromkeys(["onnxruntime", *runtimes]))}}
    cfg = config_from_dict(raw)
    with progress.stage("check"):
        plan = checked_plan(cfg)
        if plan.calibrating:  # the integers the compile calibrated, as the artifact stores them
            plan = dataclasses.replace(plan, calibrated=calibrated_store(folder))
        if plan.auto:  # what the compile's probe chose, as the manifest records it
            plan = dataclasses.replace(plan, auto_islands=Islands(m.fp32.units, m.fp32.residual_from) if m.fp32
                                       else Islands())
        if source_record(plan).weights != m.source.weights:
            raise QvlcError(f"the checkpoint {cfg.model.checkpoint!r} is not the one {folder} was compiled from "
                            f"(its weight files' sha256 differ from the manifest's source.weights)",
                            fix="point model.checkpoint at the original checkpoint, or recompile the artifact",
                            key="model.checkpoint")
    with progress.stage("load"):
        ck = load(plan) if cfg.validate.oracle == OracleKind.MEMORY else None
    with progress.stage("validate"):
        return validate(plan, ck, Path(folder))
