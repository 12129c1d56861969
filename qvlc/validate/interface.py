"""names → shapes → dtypes: every exported graph against the signature its family declares."""

from __future__ import annotations

from pathlib import Path

from qvlc.artifact.manifest import graph_io
from qvlc.artifact.signature import GraphSig
from qvlc.validate.metrics import ParityReport


def check_interface(report: ParityReport, graph: str, path: Path, sig: GraphSig) -> bool:
    """Record every mismatch of ``path``'s inputs and outputs with ``sig``; True when they all match."""
    if not Path(path).is_file():
        report.fail(graph, "interface", Path(path).name, "graph file missing")
        return False
    record = graph_io(path)
    problems = sig.mismatches(record.inputs, record.outputs)
    for name, problem in problems:
        report.fail(graph, "interface", name, problem)
    return not problems
