"""`qvlc compile`, as stages: check → load → export → (simplify) → validate → write manifest → publish.

Each stage is a short function returning a typed result; ``compile_artifact`` reads like the list above.
Nothing here prints: progress goes through the ``Progress`` the caller passes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from qvlc import __version__
from qvlc.artifacts import discard, library_versions, make_staging, publish, refuse_existing, write_manifest
from qvlc.config import Config, check_against_model
from qvlc.errors import ParityError, QvlcError
from qvlc.export.llm import export_llm, llm_spec
from qvlc.export.onnx_export import ExportResult
from qvlc.export.visual import export_visual
from qvlc.models.qwen2_vl.checkpoint import LoadedCheckpoint, check_checkpoint, load_checkpoint, load_vision_tower, \
    sha256_file, weight_files
from qvlc.models.qwen2_vl.dims import Qwen2VLDims
from qvlc.models.qwen2_vl.tiny import TINY_SEED, tiny_checkpoint
from qvlc.validate.llm import validate_llm
from qvlc.validate.metrics import TOLERANCES, ParityReport
from qvlc.validate.visual import validate_visual


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


def load(plan: Plan) -> LoadedCheckpoint | None:
    """The transformers model in fp32: the oracle, and the owner of the weights exported from views.

    An LLM compile without validation does not need it: its export reads each rank's slices straight from the
    checkpoint files, so a model too large for this machine in fp32 (7B: ~33 GB) still compiles.
    """
    if plan.cfg.part == "llm" and not plan.cfg.validate.enabled:
        return None
    return load_oracle(plan)


def load_oracle(plan: Plan) -> LoadedCheckpoint:
    """What the part's parity check compares with: the whole model for the LLM, the vision tower alone for the
    visual part (2B: 2.7 GB instead of 8.8 GB in fp32)."""
    if plan.cfg.part == "visual":
        return load_vision_tower(plan.checkpoint)
    return load_checkpoint(plan.checkpoint)


def export(plan: Plan, ck: LoadedCheckpoint | None, stage: Path) -> ExportResult:
    if plan.cfg.part == "llm":
        return export_llm(plan, ck, stage, plan.cfg.export.simplify)
    return export_visual(plan, ck, stage, plan.cfg.export.simplify)


def validate(plan: Plan, ck: LoadedCheckpoint, stage: Path) -> ParityReport:
    cfg = plan.cfg
    report = ParityReport(cfg.part, cfg.export.dtype, TOLERANCES[cfg.export.dtype])
    if cfg.part == "llm":
        validate_llm(ck, stage, llm_spec(plan), cfg.validate.decode_steps, cfg.validate.generate_tokens, report)
    else:
        validate_visual(plan, ck, stage, report)
    return report


def source_weights(plan: Plan) -> list[dict]:
    return [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in weight_files(plan.checkpoint)]


def manifest(plan: Plan, exported: ExportResult, report: ParityReport | None) -> dict:
    cfg = plan.cfg
    source = {"checkpoint": cfg.model.checkpoint, "weights": source_weights(plan)}
    if cfg.is_tiny:
        source["tiny_seed"] = TINY_SEED
    return {
        "qvlc_version": __version__,
        "part": cfg.part,
        "config": cfg.to_dict(),
        "ignored_config_keys": list(cfg.ignored),
        "source": source,
        "libraries": library_versions(),
        **exported.manifest,  # the part's own section: "llm" (+ "tp") or "visual"
        "graphs": exported.graphs,
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
            exported = export(plan, ck, stage)
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


def validate_artifact(folder: Path, progress: Progress | None = None) -> ParityReport:
    """`qvlc validate`: re-run the parity check of an existing artifact against its source checkpoint.

    Reads the resolved config from the manifest; writes nothing into the artifact.
    """
    from qvlc.artifacts import read_manifest
    from qvlc.config import config_from_dict

    progress = progress or NullProgress()
    m = read_manifest(folder)
    cfg = config_from_dict(m["config"])
    with progress.stage("check"):
        plan = check(cfg)
        if source_weights(plan) != m["source"]["weights"]:
            raise QvlcError(f"the checkpoint {cfg.model.checkpoint!r} is not the one {folder} was compiled from "
                            f"(its weight files' sha256 differ from the manifest's source.weights)",
                            fix="point model.checkpoint at the original checkpoint, or recompile the artifact",
                            key="model.checkpoint")
    with progress.stage("load"):
        ck = load_oracle(plan)
    with progress.stage("validate"):
        return validate(plan, ck, Path(folder))
