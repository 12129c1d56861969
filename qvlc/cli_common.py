"""What every `qvlc` command shares: the consoles, the one-line failure report, the command guard, stage progress.
User-derived text is printed without control characters (``qvlc.errors.printable``) and never read as markup."""

from __future__ import annotations

import contextlib
import shutil
import time
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from qvlc.errors import printable
from qvlc.guard import Exit, guarded

# Not on a terminal (CI logs), rich would assume 80 columns and truncate the parity table.
_WIDTH = max(shutil.get_terminal_size((120, 24)).columns, 110)
console = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=_WIDTH)

STYLES = {"error": "bold red", "parity failed": "bold red", "integrity": "bold red", "environment": "bold red",
          "interrupted": "bold yellow", "internal error": "bold magenta"}


class RichProgress:
    """One line per stage: a spinner while it runs, then its wall time."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        t0 = time.perf_counter()
        info: dict = {}
        with console.status(Text(f"{name} …", style="bold"), spinner="dots"):
            yield info
        detail = f"  {info['detail']}" if info.get("detail") else ""
        console.print(Text("✓ ", style="green") + Text(f"{name:<20} {time.perf_counter() - t0:7.1f} s{detail}"))


def report(kind: str, text: str) -> None:
    """One failure message on stderr; ``text`` is printed as is (never as markup)."""
    err.print(Text(f"{kind}: ", style=STYLES.get(kind, "bold red")) + Text(printable(text)), soft_wrap=True)


@contextlib.contextmanager
def command(action: str) -> Iterator[None]:
    """A command body: every failure becomes one message and its documented exit code."""
    try:
        with guarded(action, report):
            yield
    except Exit as e:
        raise typer.Exit(e.code) from None


def problem(text: str, mark: str = "✗ ", style: str = "red") -> None:
    """One problem line on stderr (a verify finding, a parity failure): user-derived, so made printable."""
    err.print(Text(mark, style=style) + Text(printable(text)), soft_wrap=True)


EXPECT_DIGEST = typer.Option(None, "--expect-digest", help="Refuse unless the artifact's manifest has this sha256 "
                             "(the digest `qvlc compile` printed); repeat to pin both artifacts.")
Digests = Optional[list[str]]
