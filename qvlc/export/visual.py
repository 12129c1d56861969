"""The visual part's export stage (being built: issue 3)."""

from __future__ import annotations

from qvlc.errors import QvlcError


def export_visual(plan, ck, stage, simplify_graphs):
    raise QvlcError("part: visual is not available in this build yet", fix="compile part: llm", key="part")
