"""DOC"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from qvlc.artifact.layout import Part
from qvlc.config.choices import OracleKind
from qvlc.errors import ConfigError
from qvlc.models.common.params import UNSPLIT_MAX_BYTES, text_params, vision_params
from qvlc.system.memory import GB, available_bytes

if TYPE_CHECKING:
    from qvlc.config.schema import Config
    from qvlc.models.common.dims import ModelDims



OVERHEAD = 1.35
EXPORT_COPIES = 2.2  # visual export: the tower read in the export dtype + the exporter's serialized copy, per
#                      weight byte (2B fp16: 2.81 GB peak RSS for 1.35 GB of weights, 2.14 GiB anonymous)


TVM_PHASE = "TVM sessions (every rank's weights in memory, the graph's protobuf while it builds)"
WORKERS_PHASE = "export (each worker: one rank's weights and the exporter)"
CALIBRATION_PHASE = "GPTQ calibration (hidden states, one fp32 layer, H and its factors)"


class Bound(Enum):
    """What sets the estimated peak, and so which setting lowers it."""

    TVM = "validate.runtimes"  # TVM's sessions hold every rank's weights
    EXPORT_WORKERS = "export.workers"  # parallel export workers, each holding a rank
    OTHER = ""


@dataclass(frozen=True)
class Estimate:
    bytes: float
    parts: dict[str, float]

    @property
    def bound(self) -> Bound:
        if TVM_PHASE in self.parts:
            return Bound.TVM
        return Bound.EXPORT_WORKERS if WORKERS_PHASE in self.parts else Bound.OTHER

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GB:.1f} GB" for k, v in self.parts.items())


def estimate(cfg: "Config", dims: "ModelDims") -> Estimate:
    """Peak bytes of the compile: export alone, or export then validation when it is enabled."""
    parts = _llm_parts(cfg, dims) if cfg.part == Part.LLM else _visual_parts(cfg, dims)
    total = sum(v for k, v in parts.items() if k != "attention") * OVERHEAD + parts.get("attention", 0.0)
    w = cfg.export.weights
    if cfg.part == Part.LLM and w.enabled and w.method == "gptq":  # calibration: a phase before export
        cal = _calibration(cfg, dims)
        if cal * OVERHEAD > total:
            parts, total = {CALIBRATION_PHASE: cal}, cal * OVERHEAD
    return Estimate(total, parts)


def _llm_parts(cfg: "Config", dims: "ModelDims") -> dict[str, float]:
    """The LLM compile's phases; the largest validation phase and the attention, or the export alone."""
    e, dt = cfg.export, cfg.export.dtype.bytes
    parts: dict[str, float] = {}
    graph, t = text_params(dims), dims.text
    if cfg.validate.enabled:
        s = e.prefill_len
        if cfg.validate.oracle == OracleKind.MEMORY:
            parts["fp32 oracle"] = (graph + t.vocab * t.hidden + vision_params(dims)) * 4
            parts["ONNX Runtime sessions"] = graph * dt
            parts.update(_tvm(cfg, graph * dt))
        else:  # the phases run one after the other; the largest one counts
            kv = 4 * t.layers * 2 * t.kv_heads * (s + 16) * t.head_dim * 4
            unsplit = graph * dt if e.tp > 1 and graph * dt <= UNSPLIT_MAX_BYTES else 0
            sessions = graph * dt / e.tp + t.vocab / e.tp * t.hidden * 4 + unsplit
            phases = {"ONNX Runtime sessions (one rank's weights mapped from the file, lm_head's fp32 cast)":
                      sessions, **_tvm(cfg, graph * dt),
                      # a layer read from bf16 is briefly there twice; the graphs' prefill KV waits for the compare
                      "streamed oracle (one layer, the embedding table, KV)": graph / t.layers * 4 * 1.5
                      + t.vocab * t.hidden * 4 + kv + kv / 2,
                      "fp32 vision tower (image rows of one prompt)": vision_params(dims) * 4}
            name = max(phases, key=phases.get)
            parts[name] = phases[name]
        # fp32 scores [heads, T, T] several times over: the graph's softmax chain, the oracle's eager attention
        # and the range check's copies (7B at S = 2048: the oracle phase peaked at 8.04 GiB anonymous)
        parts["attention"] = t.heads * (s + 16) ** 2 * 4 * 5
        # the export runs first: each worker (or the isolated child) holds a rank's fp16 slices and the
        # exporter's working set (2B tp = 1: 5.28 GiB anonymous for 3.1 GB of weights; 7B: 4.27 GB per rank)
        rank = graph / e.tp * dt
        export = min(e.workers, e.tp) * _rank_export(cfg, rank)
        if export > sum(parts.values()) * OVERHEAD:
            parts.clear()
            parts[WORKERS_PHASE] = export / OVERHEAD
    else:
        parts["one rank's weights"] = _rank_export(cfg, graph / e.tp * dt) / OVERHEAD
    return parts


def _visual_parts(cfg: "Config", dims: "ModelDims") -> dict[str, float]:
    """The visual compile's export, or its validation (session, oracle, attention) when that is larger."""
    e, dt = cfg.export, cfg.export.dtype.bytes
    parts: dict[str, float] = {}
    n, v, p = e.max_patches, dims.vision, vision_params(dims)
    export = p * dt * EXPORT_COPIES
    if not cfg.validate.enabled:
        parts["export (tower in the export dtype, the exporter's copy)"] = export
    else:
        rows = e.attention_block if 0 < e.attention_block < n else n
        attention = v.heads * rows * n * 4 * 4 + 2 * n * n  # fp32 scores of one block of query rows, the masks
        held = p * 4 if cfg.validate.oracle == OracleKind.MEMORY else p / v.depth * 4  # the oracle's tower, or a block
        # the session maps the weights file; its calls cast weights to fp32 as they go (2B at N = 5120, blocks
        # of 1024 rows: 4.80 GiB anonymous, measured)
        tvm = _tvm(cfg, p * dt)
        validation = (max([2 * p * dt, *tvm.values()]) + held) * OVERHEAD + 1.5 * attention
        if export * OVERHEAD >= validation:
            parts["export (tower in the export dtype, the exporter's copy)"] = export
        else:
            if tvm and max(tvm.values()) > 2 * p * dt:
                parts.update(tvm)
                parts["the oracle's block"] = held
            else:
                parts["ONNX Runtime session (weights mapped, fp32 casts) and the oracle"] = 2 * p * dt + held
            parts["attention"] = 1.5 * attention
    return parts


def _rank_export(cfg: "Config", rank: float) -> float:
    """One rank's export (``rank``: its weights in the export dtype). Quantized weights hold more: the modules'
    dequantized weights and the integer slices they took, shared by both graphs (7B tp = 4 int8: a worker peaked at
    7.40 GiB for 3.54 GB of fp16 rank weights, x2.25; x2.5 leaves room for the parent and the checkpoint's pages.
    Before the graphs shared their integer arrays it was 9.30 GB, OOM-killed at workers 2 under 16 GiB)."""
    if cfg.export.weights.enabled:
        return rank * 2.5
    return max(rank * 1.3, rank + 2.5 * GB)


def _calibration(cfg: "Config", dims: "ModelDims") -> float:
    """The calibrate stage (qvlc.export.calibrate): the windows' hidden states twice (a layer's inputs and its
    outputs), one decoder layer in fp32, the largest Linear's H with its Cholesky factors and GPTQ's copies of the
    weight, eager attention over a batch of windows; the embedding table while the windows are embedded; lm_head
    in fp32 several times over when it is included."""
    t, c = dims.text, cfg.export.weights.calibration
    hidden = 2 * c.nsamples * c.seqlen * t.hidden * 4
    big_in = max(t.hidden, t.intermediate)
    layer = (text_params(dims) - t.vocab * t.hidden) / t.layers * 4
    batch = max(1, 2048 // c.seqlen)
    gptq = 4 * big_in**2 * 4 + 5 * t.hidden * t.intermediate * 4 + batch * t.heads * c.seqlen**2 * 4 * 3
    head = 5 * t.vocab * t.hidden * 4 if "lm_head" in cfg.export.weights.include else 0
    return max(hidden + layer + gptq, hidden / 2 + t.vocab * t.hidden * 4, head)


def _tvm(cfg: "Config", weights: float) -> dict[str, float]:
    """The TVM phase, when ``validate.runtimes`` lists tvm: its sessions hold every rank's weights in anonymous
    memory (nothing is mapped), the ONNX protobuf is alive beside them while a graph builds, and TVM plans every
    activation buffer of a call at once (2B LLM at S = 2048: 9.25 GB peak RSS for 3.1 GB of fp16 weights,
    measured with benchmarks/bench_tvm.py)."""
    if "tvm" not in cfg.validate.runtimes:
        return {}
    rank = weights / cfg.export.tp  # the protobuf of one rank's graph at a time
    return {TVM_PHASE: weights + 1.6 * rank}


def check_memory(cfg: "Config", dims: "ModelDims") -> None:
    """Refuse, with the estimate and what would fit, a compile this machine cannot hold."""
    est = estimate(cfg, dims)
    have, source = available_bytes()
    if est.bytes <= have:
        return
    if est.bound is Bound.TVM:
        key, fix = "validate.runtimes", "remove tvm from validate.runtimes (ONNX Runtime maps the weights instead), or"
    elif est.bound is Bound.EXPORT_WORKERS and cfg.export.workers > 1:
        key, fix = "export.workers", "set export.workers: 1 (each worker holds a rank), or"
    elif cfg.part == Part.LLM:
        key = "validate.enabled" if cfg.validate.enabled else "export.tp"
        fix = ("set validate.enabled: false (the export alone reads one rank's slices at a time), lower "
               "export.prefill_len, or" if cfg.validate.enabled else "raise export.tp, or")
    else:
        key, fix = "export.max_patches", "lower export.max_patches (attention grows with its square), or"
    raise ConfigError(f"this compile needs about {est.bytes / GB:.1f} GB ({est.describe()}; x{OVERHEAD} on the "
                      f"weights for the rest), more than the {have / GB:.1f} GB of {source}",
                      fix=f"{fix} run on a machine with at least {est.bytes / GB:.0f} GB", key=key)
