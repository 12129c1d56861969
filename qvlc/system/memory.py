"""This process's memory: what the machine (or its memory cgroup) allows, and handing freed memory back.
``QVLC_MEMORY_LIMIT_GB`` replaces the detected limit (a bigger swap-backed machine, or tests)."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.errors import ConfigError
from qvlc.system.malloc import trim_heap

if TYPE_CHECKING:
    pass



GB = 1e9


def available_bytes() -> tuple[float, str]:
    """(bytes, where the figure comes from): QVLC_MEMORY_LIMIT_GB, else the memory cgroup's limit, else RAM."""
    override = os.environ.get("QVLC_MEMORY_LIMIT_GB")
    if override:
        try:
            return float(override) * GB, "QVLC_MEMORY_LIMIT_GB"
        except ValueError:
            raise ConfigError(f"QVLC_MEMORY_LIMIT_GB={override!r} is not a number",
                              fix="set it to a size in GB, e.g. 16, or unset it", key="QVLC_MEMORY_LIMIT_GB") from None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return (min(total, limit), "the memory cgroup's limit") if limit and limit < total else (total, "this machine's RAM")


def _cgroup_limit() -> float | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        files = ([Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"] if controllers == "" else
                 [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
                 if "memory" in controllers.split(",") else [])
        for f in files:
            try:
                value = f.read_text().strip()
            except OSError:
                continue
            if value.isdigit():
                return float(value)
    return None


def release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise: measured, the export of a
    2B LLM left ~3 GB resident that the validation's sessions then had to sit beside; inside a memory cgroup every
    such page is one the page cache cannot use for the weights)."""
    gc.collect()
    trim_heap()
