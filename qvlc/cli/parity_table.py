"""The parity report as a table on the terminal: worst value per graph and output, greedy agreement, the
quantization section, where validation's time went."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table


def parity_table(report) -> Table:
    """Worst value per graph and output over all cases, and greedy-token agreement."""
    t = Table(title=f"parity vs transformers fp32 ({report.part}, {report.dtype})")
    for col in ("graph", "output", "cases", "max abs", "rel L2", "min cosine", "result"):
        t.add_column(col, justify="right" if col in ("cases", "max abs", "rel L2", "min cosine") else "left")
    rows: dict[tuple[str, str], list] = {}
    for c in report.checks:
        rows.setdefault((c.graph, c.output), []).append(c)
    for (graph, output), checks in rows.items():
        ms = [c.metrics for c in checks if c.metrics]
        ok = all(c.passed for c in checks)
        if ms:
            t.add_row(escape(graph), escape(output), str(len(checks)), f"{max(m['max_abs'] for m in ms):.2e}",
                      f"{max(m['rel_l2'] for m in ms):.2e}", f"{min(m['cosine'] for m in ms):.7f}",
                      "[green]pass[/]" if ok else "[red]FAIL[/]")
        else:
            t.add_row(escape(graph), escape(output), str(len(checks)), "", "", "", "[red]FAIL[/]")
    for tk in report.tokens:
        res = "[green]pass[/]" if tk.expected == tk.got else ("[red]FAIL[/]" if tk.required else "[yellow]reported[/]")
        t.add_row(escape(tk.graph), escape(f"greedy {tk.case}"), "1", "", "", f"{tk.matched}/{len(tk.expected)} tokens",
                  res)
    from qvlc.validate.metrics import (
        quantization_groups,  # loaded already: the report is one
    )

    for graph, output, rs in quantization_groups(report.quantization):  # the second proof, at its own floor
        floor = report.quantization["min_cosine"]
        t.add_row(escape(graph), escape(f"{output} vs unquantized (≥ {floor})"), str(len(rs)),
                  f"{max(r['max_abs'] for r in rs):.2e}", f"{max(r['rel_l2'] for r in rs):.2e}",
                  f"{min(r['cosine'] for r in rs):.7f}",
                  "[green]pass[/]" if all(r["passed"] for r in rs) else "[red]FAIL[/]")
    if report.phases:  # where the validation's time went (not in the artifact: timings differ run to run)
        t.caption = "validation: " + " · ".join(f"{escape(p['phase'])} {p['seconds']:.0f} s ({p['read_gb']:.1f} GB "
                                                 "read)" for p in report.phases)
    return t
