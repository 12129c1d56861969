"""`qvlc verify`: every file of an artifact against its manifest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from qvlc.cli.console import console, problem
from qvlc.cli.failures import command
from qvlc.cli.options import EXPECT_DIGEST, Digests, digests
from qvlc.errors import EXIT_FAILED


def verify(artifact: Path = typer.Argument(..., help="An artifact folder written by `qvlc compile`."),
           expect_digest: Digests = EXPECT_DIGEST) -> None:
    """Check that every file still matches the size and sha256 recorded in manifest.json."""
    from qvlc.artifact.trust import verify as verify_folder

    with command(f"the verification of {artifact}"):
        result = verify_folder(artifact, digests(expect_digest))
    if result.problems:
        for p in result.problems:
            problem(p)
        raise typer.Exit(EXIT_FAILED)
    console.print(Text("✓ ", style="green") + Text(f"{result.checked} files match manifest.json"))
