"""Where a validation's time goes: seconds, bytes read from storage and memory per phase, in the parity report.

Bytes read are the process's own (``/proc/self/io`` ``read_bytes``: file reads and the page faults of mapped
weights files alike, counted when they reach the disk, so a page-cache hit costs nothing). The resident figures
are the process's at the end of the phase (anonymous memory, and file-backed pages such as mapped weights).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def read_bytes() -> int:
    """Bytes this process has caused to be read from storage (0 where /proc/self/io is not available)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def resident_gb() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process in GB (0, 0 where /proc is not available)."""
    found = {"RssAnon:": 0.0, "RssFile:": 0.0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in found:
                found[key] = int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return found["RssAnon:"], found["RssFile:"]


@dataclass
class Phases:
    """A validation's phases in the order they ran."""

    rows: list[dict] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str, detail: str = "", record: bool = True) -> Iterator[None]:
        """Time the block as phase ``name`` (``record=False``: run it unrecorded)."""
        t0, r0 = time.perf_counter(), read_bytes()
        yield
        if not record:
            return
        anon, file = resident_gb()
        self.rows.append({"phase": name, "seconds": round(time.perf_counter() - t0, 2),
                          "read_gb": round((read_bytes() - r0) / 1e9, 3), "anon_gb": round(anon, 3),
                          "file_gb": round(file, 3), "detail": detail})
