"""Parity metrics, per-dtype tolerances, and the report that collects every check before failing once."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qvlc.artifact.layout import PARITY_JSON, PARITY_MD
from qvlc.precision import KvCache, Precision, Runtime, Tolerance
from qvlc.validate.sections import kv_cache_failures, kv_cache_markdown, ranges_markdown


def token_agreement(expected, got) -> int:
    """Length of the common prefix of two token sequences: how many greedy tokens agree before the first split."""
    n = 0
    for a, b in zip(expected, got):
        if a != b:
            break
        n += 1
    return n


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """max abs, mean abs, relative L2 and cosine similarity of ``out`` against ``ref`` (computed in fp64)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(out, dtype=np.float64).ravel()
    diff = o - r
    rn, on = np.linalg.norm(r), np.linalg.norm(o)
    finite = bool(np.all(np.isfinite(o)))
    return {
        "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / max(rn, 1e-30)),
        "cosine": float(np.dot(r, o) / max(rn * on, 1e-30)) if diff.size and finite else (1.0 if finite else -1.0),
        "ref_max_abs": float(np.max(np.abs(r))) if r.size else 0.0,
        "finite": finite,
    }


def passes(m: dict[str, float], tol: Tolerance) -> bool:
    return (m["finite"] and m["max_abs"] <= tol.atol + tol.rtol * m["ref_max_abs"]
            and m["rel_l2"] <= tol.max_rel_l2 and m["cosine"] >= tol.min_cosine)


@dataclass
class Check:
    graph: str
    case: str
    output: str
    passed: bool
    metrics: dict[str, float] = field(default_factory=dict)
    problem: str = ""  # set for name/shape failures, where there are no values to compare
    runtime: str = str(Runtime.ONNXRUNTIME)  # the runtime that ran the graph


@dataclass
class TokenCheck:
    graph: str
    case: str
    expected: list[int]
    got: list[int]
    required: bool  # fp32 must match token for token; fp16 only reports its agreement
    runtime: str = str(Runtime.ONNXRUNTIME)

    @property
    def matched(self) -> int:
        return token_agreement(self.expected, self.got)

    @property
    def passed(self) -> bool:
        return not self.required or (self.expected == self.got)


def quantization_groups(q: dict | None) -> list[tuple[str, str, list[dict]]]:
    """``quantization_error`` rows grouped by (graph, output), in order: what parity.md and the CLI table show."""
    rows = (q or {}).get("checks", [])
    return [(g, o, [r for r in rows if (r["graph"], r["output"]) == (g, o)])
            for g, o in dict.fromkeys((r["graph"], r["output"]) for r in rows)]


@dataclass
class ParityReport:
    part: str
    dtype: Precision
    checks: list[Check] = field(default_factory=list)
    tokens: list[TokenCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # fp16 ranges seen by the oracle (qvlc.validate.ranges): the hazards, and the peak per kind of tensor
    hazards: list[dict] = field(default_factory=list)
    range_peaks: dict[str, dict] = field(default_factory=dict)
    # when a value check failed: the first layer whose output leaves tolerance (qvlc.validate.divergence)
    divergence: dict | None = None
    # export.weights: the graphs against the unquantized model (qvlc.validate.quant_error)
    quantization: dict | None = None
    # export.kv_cache: int8 — the graphs against the same model with an unquantized cache (qvlc.validate.kv_error)
    kv_cache: dict | None = None
    # qvlc.validate.phases: seconds, GB read, memory per phase — printed and returned, never written into the
    # artifact (its files stay byte-identical from one compile of the same inputs to the next)
    phases: list[dict] = field(default_factory=list)
    cases: dict[str, list[str]] = field(default_factory=dict)  # validate.cases: {"run": [...], "skipped": [...]}
    runtime: Runtime = Runtime.ONNXRUNTIME  # the runtime whose results add() and fail() are recording now
    cache: KvCache = KvCache.FP  # export.kv_cache of the graphs checked (fp16 + int8 has its own tolerance)

    @property
    def tolerance(self) -> Tolerance:
        """The tolerance of the runtime being recorded."""
        return self.tolerance_of(self.runtime)

    def tolerance_of(self, runtime: Runtime | str) -> Tolerance:
        return Precision(self.dtype).tolerance_on(Runtime(runtime), self.cache)

    @contextmanager
    def using(self, runtime: Runtime):
        """Record the checks made inside the block as ``runtime``'s, at its tolerance."""
        before, self.runtime = self.runtime, Runtime(runtime)
        try:
            yield self
        finally:
            self.runtime = before

    @property
    def runtimes(self) -> list[str]:
        """The runtimes that have checks, ONNX Runtime first."""
        return list(dict.fromkeys([str(Runtime.ONNXRUNTIME), *(c.runtime for c in self.checks)]))

    def add(self, graph: str, case: str, output: str, ref: np.ndarray, out: np.ndarray) -> Check:
        """names → shapes → values: a shape mismatch is recorded as such, without value metrics."""
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            c = Check(graph, case, output, False, problem=f"shape {list(out.shape)} != expected {list(ref.shape)}",
                      runtime=str(self.runtime))
        else:
            m = compare(ref, out)
            c = Check(graph, case, output, passes(m, self.tolerance), m, runtime=str(self.runtime))
        self.checks.append(c)
        return c

    def fail(self, graph: str, case: str, output: str, problem: str) -> None:
        self.checks.append(Check(graph, case, output, False, problem=problem, runtime=str(self.runtime)))

    @property
    def failures(self) -> list[str]:
        out = [f"{_on(c.runtime)}{c.graph}/{c.case}/{c.output}: {c.problem or _metric_line(c.metrics)}"
               for c in self.checks if not c.passed]
        out += [f"{_on(t.runtime)}{t.graph}/{t.case}: greedy tokens diverge at step {t.matched} of {len(t.expected)} "
                f"(expected {t.expected}, got {t.got})" for t in self.tokens if not t.passed]
        if self.quantization:
            q = self.quantization
            out += [f"quantization error/{r['graph']}/{r['case']}/{r['output']}: cosine {r['cosine']:.5f} against the "
                    f"unquantized model, below {q['min_cosine']} (export.weights.min_cosine)"
                    for r in q["checks"] if not r["passed"]]
        out += kv_cache_failures(self.kv_cache)
        if self.dtype == Precision.FP16:  # an fp16 graph computes inf/nan there, whatever ONNX Runtime shows
            out += [f"fp16 range/{h['case']}/{h['module']}: {h['kind']} reaches {h['max_abs']:.3g}, beyond fp16's "
                    f"65504 (keep it in fp32: export.fp32_layers)" for h in self.hazards
                    if h["level"] == "overflow" and not h.get("fp32")]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def cause(self) -> str | None:
        """The first divergent layer, as a line for the user (None when it was not looked for)."""
        d = self.divergence
        if not d:
            return None
        runtime = d.get("runtime", str(Runtime.ONNXRUNTIME))
        where = d["case"] + ("" if runtime == str(Runtime.ONNXRUNTIME) else f" ({runtime})")
        if d.get("module") is None:
            return f"every one of the {d['layers_checked']} layers agrees on {where}: the divergence is after them"
        return (f"first divergent layer: {d['module']} on {where} (rel L2 {d['rel_l2']:.3e}); every layer "
                "before it agrees with the oracle")

    def summary(self) -> dict:
        """Totals, and the worst metrics per graph: ONNX Runtime's as ``worst_per_graph``, every runtime's under
        ``runtimes``."""
        per = {rt: self._runtime_summary(rt) for rt in self.runtimes}
        return {
            "passed": self.passed,
            "checks": len(self.checks),
            "failed": len(self.failures),
            "worst_per_graph": per[str(Runtime.ONNXRUNTIME)]["worst_per_graph"],
            "runtimes": per,
            "tokens": [{"graph": t.graph, "case": t.case, "runtime": t.runtime, "matched": t.matched,
                        "of": len(t.expected)} for t in self.tokens],
        }

    def _runtime_summary(self, runtime: str) -> dict:
        worst: dict[str, dict[str, float]] = {}
        checks = [c for c in self.checks if c.runtime == runtime]
        for c in checks:
            if not c.metrics:
                continue
            w = worst.setdefault(c.graph, {"max_abs": 0.0, "rel_l2": 0.0, "min_cosine": 1.0})
            w["max_abs"] = max(w["max_abs"], c.metrics["max_abs"])
            w["rel_l2"] = max(w["rel_l2"], c.metrics["rel_l2"])
            w["min_cosine"] = min(w["min_cosine"], c.metrics["cosine"])
        return {"checks": len(checks), "failed": sum(not c.passed for c in checks), "worst_per_graph": worst,
                "tolerance": asdict(self.tolerance_of(runtime))}

    def to_dict(self) -> dict:
        return {
            "part": self.part,
            "dtype": str(self.dtype),
            "oracle": "transformers model, fp32, eager attention",
            "tolerance": asdict(self.tolerance_of(Runtime.ONNXRUNTIME)),  # every runtime's in summary
            "summary": self.summary(),
            "failures": self.failures,
            "checks": [asdict(c) for c in self.checks],
            "tokens": [{**asdict(t), "matched": t.matched, "passed": t.passed} for t in self.tokens],
            "fp16_ranges": {"hazards": self.hazards, "peaks": self.range_peaks},
            "first_divergent_layer": self.divergence,
            "quantization_error": self.quantization,
            "kv_cache_error": self.kv_cache,
            "cases": self.cases,
            "notes": self.notes,
        }

    def write(self, folder: Path) -> None:
        # strict JSON: a non-finite metric (an output with inf/nan) is written as the string "inf", "-inf" or "nan"
        (folder / PARITY_JSON).write_text(json.dumps(_finite_json(self.to_dict()), indent=2, allow_nan=False) + "\n")
        (folder / PARITY_MD).write_text(self.to_markdown())

    def to_markdown(self) -> str:
        multi = len(self.runtimes) > 1  # a runtime column, and a tolerance line per runtime

        def col(runtime: str) -> str:
            return f" {runtime} |" if multi else ""

        lines = [
            f"# Parity report: {self.part} ({self.dtype})",
            "",
            f"Oracle: the unmodified transformers model in fp32. Result: **{'PASS' if self.passed else 'FAIL'}** "
            f"({len(self.checks)} checks, {len(self.failures)} failed).",
            "",
        ]
        for rt in self.runtimes:
            t = self.tolerance_of(rt)
            lines.append(f"Tolerance ({self.dtype}{', ' + rt if multi else ''}): max_abs <= {t.atol:g} + "
                         f"{t.rtol:g}·max|ref|, rel_l2 <= {t.max_rel_l2:g}, cosine >= {t.min_cosine:g}.")
        lines += ["", "| graph | case | output |" + col("runtime") + " max abs | mean abs | rel L2 | cosine | result |",
                  "|---|---|---|" + ("---|" if multi else "") + "---|---|---|---|---|"]
        for c in self.checks:
            if c.metrics:
                m = c.metrics
                lines.append(f"| {c.graph} | {c.case} | {c.output} |{col(c.runtime)} {m['max_abs']:.3e} | "
                             f"{m['mean_abs']:.3e} | {m['rel_l2']:.3e} | {m['cosine']:.7f} | "
                             f"{'pass' if c.passed else 'FAIL'} |")
            else:
                lines.append(f"| {c.graph} | {c.case} | {c.output} |{col(c.runtime)} | | | | FAIL: {c.problem} |")
        if self.tokens:
            lines += ["", "## Greedy generation", "", "| graph | case |" + col("runtime") + " matched | result |",
                      "|---|---|" + ("---|" if multi else "") + "---|---|"]
            for tk in self.tokens:
                res = "pass" if tk.expected == tk.got else ("FAIL" if tk.required else "reported")
                lines.append(f"| {tk.graph} | {tk.case} |{col(tk.runtime)} {tk.matched}/{len(tk.expected)} | {res} |")
        lines += ranges_markdown(self) + self._quantization_markdown() + kv_cache_markdown(self.kv_cache)
        if self.failures:
            lines += ["", "## Failures", ""] + [f"- {f}" for f in self.failures]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _quantization_markdown(self) -> list[str]:
        q = self.quantization
        if not q:
            return []
        if q["reference"] is None:
            return ["", "## Quantization error", "", f"{q['format']} weights imported from a {q['method'][9:]} "
                    "checkpoint: no unquantized original exists, so the quantization's own error cannot be measured; "
                    "the parity above proves the graphs compute the checkpoint's integers exactly."]
        groups = f", groups of {q['group_size']}" if q["group_size"] else ""
        kind = "symmetric" if q["symmetric"] else "asymmetric"
        lines = ["", "## Quantization error", "", f"{q['format']} weights{groups} ({q['method']}, {kind}) against "
                 f"{q['reference']}; an output passes at cosine >= {q['min_cosine']}.", "",
                 "| graph | output | outputs | worst cosine | worst rel L2 | result |", "|---|---|---|---|---|---|"]
        if (c := q.get("calibration")) and c["gptq_over_rtn"]:
            r = c["gptq_over_rtn"]
            lines[4:4] = ["", f"Calibrated by GPTQ on {c['nsamples']} windows of {c['seqlen']} tokens from "
                          f"{c['source']} ({c['set_tokens']} tokens). On those tokens each Linear's output error "
                          f"is {r['median']:.2f}x round to nearest's (median; worst {r['worst']:.2f}x)."]
        for graph, output, rows in quantization_groups(q):
            verdict = "pass" if all(r["passed"] for r in rows) else "FAIL"
            lines.append(f"| {graph} | {output} | {len(rows)} | {min(r['cosine'] for r in rows):.5f} | "
                         f"{max(r['rel_l2'] for r in rows):.3e} | {verdict} |")
        return lines

def _finite_json(value):
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def _on(runtime: str) -> str:
    """The prefix of a failure line: none for ONNX Runtime, ``[tvm] `` for another runtime."""
    return "" if runtime == str(Runtime.ONNXRUNTIME) else f"[{runtime}] "


def _metric_line(m: dict[str, float]) -> str:
    return (f"max_abs {m['max_abs']:.3e} (ref max {m['ref_max_abs']:.3g}), rel_l2 {m['rel_l2']:.3e}, "
            f"cosine {m['cosine']:.7f}" + ("" if m["finite"] else ", NON-FINITE values"))
