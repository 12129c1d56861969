"""sha256 of files: an artifact's file table, its manifest's digest, a checkpoint's weight files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from qvlc.artifact.layout import NOT_LISTED


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def listed_files(folder: Path) -> list[Path]:
    """Every file and symlink under ``folder`` but the manifest, its digest and the marker (a symlink is listed so
    the integrity check can refuse it; it is never followed)."""
    return sorted(q for q in folder.rglob("*") if (q.is_symlink() or q.is_file())
                  and q.relative_to(folder).as_posix() not in NOT_LISTED)
