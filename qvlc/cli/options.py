"""Options several commands share, and their parsing into the values the library takes: how far an artifact
is trusted (``--verify-hashes``, ``--expect-digest``) becomes one ``Trust``."""

from __future__ import annotations

import re
from typing import Optional

import typer

from qvlc.artifact.trust import Trust
from qvlc.errors import QvlcError, printable

EXPECT_DIGEST = typer.Option(None, "--expect-digest", help="Refuse unless the artifact's manifest has this sha256 "
                             "(the digest `qvlc compile` printed); repeat to pin both artifacts.")
VERIFY_HASHES = typer.Option(None, "--verify-hashes/--no-verify-hashes",
                             help="sha256 every artifact file before use (default: when an artifact is at most 4 GB).")
Digests = Optional[list[str]]


def digests(expect: list[str] | None) -> frozenset[str]:
    """``--expect-digest`` values: 64 hex digits each (any case)."""
    for e in expect or ():
        if not re.fullmatch(r"[0-9a-fA-F]{64}", e):
            raise QvlcError(f"--expect-digest {printable(e, 80)!r} is not a sha256 (64 hex digits)",
                            fix="pass the digest `qvlc compile` printed (the content of manifest.sha256)",
                            key="--expect-digest")
    return frozenset(e.lower() for e in expect or ())


def trust(verify_hashes: bool | None, expect_digest: list[str] | None) -> Trust:
    """``--verify-hashes/--no-verify-hashes`` and ``--expect-digest``, as one ``Trust``."""
    return Trust(hashes=verify_hashes, digests=digests(expect_digest))
