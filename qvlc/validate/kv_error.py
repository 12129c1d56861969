"""The int8 KV cache's proof (``export.kv_cache: int8``), beside the usual parity.

1. Parity: the oracle applies the same rule inside transformers' cache update (``qvlc.validate.oracle``), so the
   graphs' K/V and logits are compared with it at the precision's tolerance. The rule rounds, so two correct
   computations whose inputs differ by reordering noise (~1e-7 in fp32) can land one step apart where an input
   sits on a rounding midpoint; ``add_kv`` accepts such an output when every element is either within tolerance
   or exactly one step (its row's scale) off, and those are at most ``MAX_FLIP_SHARE`` of the elements — anything
   else (a wrong scale, truncation, a missed position) is not one clean step and fails as before.
2. The cache's own error: the graphs against the same model with an unquantized cache (a second oracle pass):
   logits cosine and rel L2 per step, and greedy agreement, per prompt, with a verdict at ``KV_MIN_COSINE``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qvlc.models.common.kvquant import KV_MIN_AMAX, KV_QMAX
from qvlc.precision import KvCache
from qvlc.validate.metrics import ParityReport, compare, token_agreement
from qvlc.validate.oracle import OracleInput, StreamedOracle
from qvlc.validate.ranges import RangeRecorder

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan

MAX_FLIP_SHARE = 1e-3  # of an output's elements: rounding flips beyond this are a rule implemented differently
# The floor of each prompt's worst logits cosine against the unquantized cache, for builds that are correct (the
# exactness proof against the rule-applying oracle catches a wrong rule). Random weights carry the rounding noise
# through every layer undamped, so these are worst cases: measured 0.99998 on the tiny model (fp32), 0.99761 on
# random Qwen2-VL-7B fp16 at tp = 4 (text_short; int8 weights at 2B: 0.9968). 0.99 passes those.
KV_MIN_COSINE = 0.99


def rounding_flips(ref: np.ndarray, got: np.ndarray, report: ParityReport) -> int | None:
    """How many elements of ``got`` are exactly one rounding step from ``ref`` (K/V [..., D]; a row's step is its
    scale, amax / 127), or None when some element is neither within tolerance nor one step off."""
    tol = report.tolerance
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    near = tol.atol + tol.rtol * float(np.max(np.abs(ref64), initial=0.0))
    step = np.maximum(np.max(np.abs(ref64), axis=-1, keepdims=True), KV_MIN_AMAX) / KV_QMAX
    diff = np.abs(got64 - ref64)
    flip = np.abs(diff - step) <= near
    if not np.all((diff <= near) | flip):
        return None
    return int(np.count_nonzero(flip & (diff > near)))


def add_kv(report: ParityReport, graph: str, case: str, output: str, ref: np.ndarray, got: np.ndarray,
           kv_cache: KvCache) -> None:
    """``report.add`` for K/V; an int8 cache's output that fails only by rounding flips passes (counted in its
    metrics as ``rounding_flips``)."""
    c = report.add(graph, case, output, ref, got)
    if c.passed or not c.metrics or KvCache(kv_cache) is not KvCache.INT8:
        return
    flips = rounding_flips(np.asarray(ref), np.asarray(got), report)
    if flips is not None and flips <= MAX_FLIP_SHARE * np.asarray(ref).size:
        c.passed, c.metrics["rounding_flips"] = True, flips


def cache_error(plan: Plan, report: ParityReport, runs: list, inputs: list[OracleInput]) -> None:
    """Every step's logits of ``runs`` (ONNX Runtime's) against the same weights with an unquantized cache, and the
    graphs' greedy tokens against that model's argmax: ``report.kv_cache``."""
    refs = StreamedOracle(plan.family, plan.checkpoint, plan.dims, plan.quant, KvCache.FP).run(
        inputs, RangeRecorder(enabled=False))
    prompts = []
    for run, ref in zip(runs, refs):
        steps = [compare(ref.logits[k], np.concatenate(logits)) for k, logits in enumerate(run.logits)]
        expected = [int(np.argmax(x)) for x in ref.logits[:len(run.tokens)]]
        worst = min(m["cosine"] for m in steps)
        prompts.append({"case": run.case.name, "steps": len(steps), "worst_cosine": worst,
                        "worst_rel_l2": max(m["rel_l2"] for m in steps),
                        "tokens_matched": token_agreement(expected, run.tokens), "of": len(expected),
                        "passed": bool(all(m["finite"] for m in steps) and worst >= KV_MIN_COSINE)})
    report.kv_cache = {"format": "int8", "granularity": "per layer, K/V, kv head and position (scale amax/127)",
                       "reference": "the same weights with an unquantized cache (transformers' layers, fp32)",
                       "min_cosine": KV_MIN_COSINE, "prompts": prompts}
