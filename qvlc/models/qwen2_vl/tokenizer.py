"""Tokenizer helpers. The tiny tokenizer (issue 3) is built here; until then, no tokenizer is written."""

from __future__ import annotations

from pathlib import Path


def save_tiny_tokenizer_if_matching(config: dict, folder: Path) -> None:
    """Write the tiny tokenizer next to a tiny checkpoint (no-op for full-size configs)."""
    return None
