"""The consoles every command prints to, the one-line failure report, problem lines and stage progress.
User-derived text is printed without control characters (``qvlc.errors.printable``) and never read as markup."""

from __future__ import annotations

import contextlib
import shutil
import time
from typing import Iterator

from rich.console import Console
from rich.text import Text

from qvlc.errors import Failure, printable

# Not on a terminal (CI logs), rich would assume 80 columns and truncate the parity table.
_WIDTH = max(shutil.get_terminal_size((120, 24)).columns, 110)

console = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=_WIDTH)


STYLES = {Failure.INTERRUPTED: "bold yellow", Failure.INTERNAL: "bold magenta"}  # every other kind: bold red


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


def report(kind: Failure, text: str) -> None:
    """One failure message on stderr; ``text`` is printed as is (never as markup)."""
    err.print(Text(f"{kind}: ", style=STYLES.get(kind, "bold red")) + Text(printable(text)), soft_wrap=True)


def problem(text: str, mark: str = "✗ ", style: str = "red") -> None:
    """One problem line on stderr (a verify finding, a parity failure): user-derived, so made printable."""
    err.print(Text(mark, style=style) + Text(printable(text)), soft_wrap=True)
