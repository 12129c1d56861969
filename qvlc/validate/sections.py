"""Sections of the parity report that stand on their own: the fp16 ranges the oracle met, the KV cache error."""

from __future__ import annotations

from qvlc.precision import Precision


def ranges_markdown(report) -> list[str]:
    """The fp16 ranges section of a parity report (none when the oracle recorded no ranges)."""
    if not report.range_peaks:
        return []
    verdict = ("an overflow fails an fp16 compile" if report.dtype == Precision.FP16 else
               "advice for an fp16 build of this model")
    lines = ["", "## fp16 ranges", "", f"Largest magnitudes the fp32 oracle met on the validation cases ({verdict}; "
             "fp16's largest finite value is 65504, 'near' is above a quarter of it, 'underflow' is more than half "
             "of a tensor's nonzero values below fp16's smallest normal number, 6.1e-5).", "", "| kind | peak | module | case |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {p['max_abs']:.4g} | {p['module']} | {p['case']} |" for k, p in report.range_peaks.items()]
    if not report.hazards:
        return lines + ["", "No hazards."]
    lines += ["", "| hazard | kind | max abs | underflow | module | case | in the fp16 graph |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {h['level']} | {h['kind']} | {h['max_abs']:.4g} | {h['underflow_fraction']:.2%} | {h['module']} "
              f"| {h['case'] if h['level'] != 'underflow' else h['underflow_case']} | "
              f"{'fp32 island' if h.get('fp32') else 'fp16'} |" for h in report.hazards]
    return lines


def kv_cache_failures(kv: dict | None) -> list[str]:
    return [f"kv cache error/{p['case']}: logits cosine {p['worst_cosine']:.5f} against the unquantized cache, below "
            f"{kv['min_cosine']}" for p in (kv or {}).get("prompts", []) if not p["passed"]]


def kv_cache_markdown(kv: dict | None) -> list[str]:
    if not kv:
        return []
    lines = ["", "## KV cache error", "", f"{kv['format']} cache, {kv['granularity']}, against {kv['reference']}: "
             "the graphs' logits at every step, and their greedy tokens against that model's argmax. A prompt passes "
             f"at cosine >= {kv['min_cosine']}.", "",
             "| case | steps | worst cosine | worst rel L2 | greedy tokens equal | result |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p['case']} | {p['steps']} | {p['worst_cosine']:.6f} | {p['worst_rel_l2']:.3e} | "
              f"{p['tokens_matched']}/{p['of']} | {'pass' if p['passed'] else 'FAIL'} |" for p in kv["prompts"]]
    return lines
