"""`qvlc validate`: the parity check of an existing artifact, re-run against its source checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from qvlc.cli.console import RichProgress, console, problem
from qvlc.cli.failures import command
from qvlc.cli.options import EXPECT_DIGEST, Digests, digests
from qvlc.cli.parity_table import parity_table
from qvlc.errors import EXIT_FAILED
from qvlc.system.library_noise import quiet_libraries


def validate(
    artifact: Path = typer.Argument(..., help="An artifact folder written by `qvlc compile`."),
    runtime: list[str] = typer.Option([], "--runtime", help="Also run the cases on this runtime (tvm), beside "
                                      "onnxruntime; repeatable. Default: the runtimes the artifact was compiled with."),
    expect_digest: Digests = EXPECT_DIGEST,
) -> None:
    """Re-run the parity check of an existing artifact against its source checkpoint."""
    quiet_libraries()
    from qvlc.compile.stages import validate_artifact

    with command(f"the validation of {artifact}"):
        parity = validate_artifact(artifact, progress=RichProgress(), runtimes=tuple(runtime) or None,
                                   digests=digests(expect_digest))
    console.print(parity_table(parity))
    if not parity.passed:
        for f in parity.failures:
            problem(f)
        if parity.cause:
            problem(parity.cause, "→ ", "yellow")
        raise typer.Exit(EXIT_FAILED)
    console.print("[bold green]parity holds[/]")
