"""Every input surface, fuzzed with a bounded number of hypothesis examples (``QVLC_FUZZ_EXAMPLES``, default 30 per
surface; derandomized, so CI is repeatable). ``benchmarks/fuzz.py --minutes N`` runs the same properties long."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from properties import SURFACES
from serve_properties import SERVE_SURFACES, close_clients
from surfaces import Workspace

EXAMPLES = int(os.environ.get("QVLC_FUZZ_EXAMPLES", "30"))
ALL = {**SURFACES, **SERVE_SURFACES}


@pytest.fixture(scope="module")
def ws(compiled, tmp_path_factory):
    from test_reliability import (  # the artifacts test_reliability compiles: shared within a session
        C,
        N,
        S,
    )

    from qvlc.checkpoint.tiny import tiny_checkpoint

    off = {"enabled": False}
    llm = compiled("rel_llm", validate=off, prefill_len=S, max_context=C).folder
    visual = compiled("rel_visual", part="visual", validate=off, max_patches=N).folder
    yield Workspace.make(tmp_path_factory.mktemp("fuzz"), tiny_checkpoint(), llm, visual)
    close_clients()


@pytest.mark.parametrize("surface", list(ALL))
def test_surface_holds_its_property(surface, ws):
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def prop(data):
        try:
            ALL[surface](ws, data.draw)
        finally:
            ws.restore()

    prop()
