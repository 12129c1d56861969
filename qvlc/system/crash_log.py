"""Where the traceback of an internal error (a bug in qvlc) goes: a log file in the cache folder, or the temp folder."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path


def log_dir() -> Path:
    base = os.environ.get("QVLC_CACHE") or str(Path.home() / ".cache" / "qvlc")
    return Path(base) / "logs"


def write_log(text: str) -> Path:
    """The traceback of an internal error in a log file; the temp folder if the cache folder is not writable."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"qvlc-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("(no writable log folder)")
