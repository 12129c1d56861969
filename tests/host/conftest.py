"""Fixtures shared by the host-side tests: the tiny random Qwen2-VL as the transformers oracle."""

from __future__ import annotations

import pytest

from qvlc.checkpoint.hf_model import LoadedCheckpoint, load_checkpoint
from qvlc.checkpoint.tiny import tiny_checkpoint


@pytest.fixture(scope="session")
def ck() -> LoadedCheckpoint:
    """The tiny default checkpoint loaded in fp32 (eval mode)."""
    return load_checkpoint(tiny_checkpoint())
