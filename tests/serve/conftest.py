"""A real `qvlc serve` process on the tiny artifacts, shared by the serve tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import C, N, S, ServerProcess


@pytest.fixture(scope="session")
def serve_artifacts(compiled) -> tuple[Path, Path]:
    llm = compiled(name="serve_llm", prefill_len=S, max_context=C, validate={"enabled": False})
    vis = compiled(name="serve_visual", part="visual", max_patches=N, validate={"enabled": False})
    return llm.folder, vis.folder


@pytest.fixture(scope="module")
def server(serve_artifacts, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    srv = ServerProcess([str(serve_artifacts[0]), str(serve_artifacts[1]), "--max-queue", "8",
                         "--media-dir", str(media)])
    srv.media = media
    yield srv
    srv.stop()
