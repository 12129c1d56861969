"""The second proof of a quantized build: how far the graphs are from the *unquantized* model.

The first proof is the usual parity (``qvlc.validate.llm``) against the transformers model carrying the same
dequantized weights: it says the graphs compute the quantized model exactly. This one runs transformers' layers
again, streamed, with the checkpoint's own weights, on the same prompts and tokens, and compares the graphs' logits
and KV with it per output: the quantization's own error, with a verdict against ``export.weights.min_cosine`` (the
format's default when 0: ``WeightFormat.min_cosine`` says why each default is what it is).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from qvlc.validate.metrics import ParityReport, compare
from qvlc.validate.oracle import OracleInput, StreamedOracle
from qvlc.validate.ranges import RangeRecorder
from qvlc.validate.vision_oracle import StreamedVisionOracle

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan


def quantization_error(plan: Plan, report: ParityReport, runs: list, inputs: list[OracleInput],
                       layouts: list) -> None:
    """Compare every prefill and decode step of ``runs`` (ONNX Runtime's, tp ranks recombined) with the
    unquantized model; record the rows and the verdict in ``report.quantization``."""
    floor = _floor(plan)
    # the same cache rule as the graphs (export.kv_cache): this section measures the weights' error alone
    refs = StreamedOracle(plan.family, plan.checkpoint, plan.dims, kv_cache=plan.llm_spec.kv_cache).run(
        inputs, RangeRecorder(enabled=False))
    rows = []
    for run, ref in zip(runs, refs):
        n = len(run.case.ids)
        for k, (logits, kv) in enumerate(zip(run.logits, run.kv)):
            graph, case = ("prefill", run.case.name) if k == 0 else ("decode", f"{run.case.name}/step{k - 1}")
            ref_kv = ref.kv[..., :n, :] if k == 0 else ref.kv[..., n + k - 1:n + k, :]
            rows += [_row(graph, case, "logits", ref.logits[k], np.concatenate(logits), floor),
                     _row(graph, case, "present_key_values", ref_kv, recombine_kv(kv, layouts), floor)]
    _record(plan, report, rows, "the unquantized checkpoint (transformers' layers, fp32)")
    if plan.calibrated is not None:  # method gptq: what the calibration saw, and GPTQ against round to nearest
        record = json.loads((plan.calibrated.parent / "calibration.json").read_text())
        report.quantization["calibration"] = {k: record[k] for k in ("source", "set_tokens", "nsamples", "seqlen",
                                                                      "gptq_over_rtn")}


def visual_quantization_error(plan: Plan, report: ParityReport, cases: list, outputs: dict[str, np.ndarray]) -> None:
    """The visual graph's embeddings (ONNX Runtime's, per case) against the unquantized tower (streamed, fp32)."""
    floor = _floor(plan)
    refs = StreamedVisionOracle(plan.family, plan.checkpoint, plan.dims).run(
        [(c.pixel_values, c.grids) for c in cases], [c.name for c in cases])
    rows = [_row("visual", case.name, "image_embeds", ref, outputs[case.name], floor)
            for case, ref in zip(cases, refs) if case.name in outputs]
    _record(plan, report, rows, "the unquantized vision tower (transformers' modules, fp32)")


def _row(graph: str, case: str, output: str, ref: np.ndarray, got: np.ndarray, floor: float) -> dict:
    """One output against the unquantized reference, with its verdict at ``floor``."""
    m = compare(ref, got)
    return {"graph": graph, "case": case, "output": output, "cosine": m["cosine"], "rel_l2": m["rel_l2"],
            "max_abs": m["max_abs"], "passed": bool(m["finite"] and m["cosine"] >= floor)}


def _floor(plan: Plan) -> float:
    w = plan.cfg.export.weights
    return w.min_cosine or w.format.min_cosine


def _record(plan: Plan, report: ParityReport, rows: list[dict], reference: str) -> None:
    w = plan.cfg.export.weights
    report.quantization = {"format": str(w.format), "group_size": w.group_size if w.format == "int4" else None,
                           "symmetric": w.symmetric, "method": str(w.method), "min_cosine": _floor(plan),
                           "reference": reference, "checks": rows}


def recombine_kv(kv: list[np.ndarray], layouts: list) -> np.ndarray:
    """Every rank's KV heads ([L, 2, heads of the rank, T, D] each) as one [L, 2, kvH, T, D]: each kv head once,
    from the first rank that holds it (ranks replicate kv heads when tp exceeds their count)."""
    heads: dict[int, np.ndarray] = {}
    for lay, k in zip(layouts, kv):
        for j in range(lay.kv_heads):
            heads.setdefault(lay.kv_head_start + j, k[:, :, j])
    return np.stack([heads[j] for j in sorted(heads)], axis=2)
