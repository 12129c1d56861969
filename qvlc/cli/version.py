"""`qvlc version`: qvlc's version and the libraries it was tested with."""

from __future__ import annotations

from qvlc import __version__
from qvlc.cli.console import console


def version() -> None:
    """Print qvlc's version and the libraries it was tested with."""
    from qvlc.artifact.manifest import library_versions

    console.print(f"qvlc {__version__}")
    for name, v in library_versions().items():
        console.print(f"  {name} {v}")
