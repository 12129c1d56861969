"""Sections of the parity report's markdown that stand on their own: the fp16 ranges the oracle met."""

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
