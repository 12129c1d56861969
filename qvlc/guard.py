"""How a qvlc command ends when something goes wrong: one message, a documented exit code, nothing half-written,
never a traceback (see ``qvlc.errors`` for the codes).

``guarded(action, report)`` wraps a command: SIGTERM raises ``Interrupted`` inside it (so the compile's
``finally`` removes its staging folder, as on SIGINT), and every failure is turned into one line through
``report(kind, text)``. Unexpected exceptions are bugs: their traceback goes to a log file whose path is shown.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import signal
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterator

from qvlc.errors import EXIT_ENVIRONMENT, EXIT_INTERNAL, Interrupted, QvlcError
from qvlc.watchdog import GRACE, watched

# errno values that mean "the machine refused", not "the input is wrong"
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOMEM,
                      errno.EMFILE, errno.ENFILE, errno.EIO}


class Exit(Exception):
    """Carries the exit code out of ``guarded``; the CLI turns it into its framework's exit."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(code)


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


def _environment_message(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOMEM: "out of memory"}.get(e.errno, e.strerror or str(e))
    return f"{what}{where}\n  fix: free space or pick a writable place (output.dir / -o), then run the command again"


@contextlib.contextmanager
def guarded(action: str, report: Callable[[str, str], None]) -> Iterator[None]:
    """Run a command body; ``report(kind, text)`` prints one message (kind: error, parity failed, integrity,
    environment, interrupted, internal error) and ``Exit`` carries the code out."""
    def on_sigterm(signum, _frame):
        raise Interrupted(signum)

    def on_timeout(signum: int) -> None:
        report("interrupted", f"{signal.Signals(signum).name}: {action} stopped; a library call did not return "
                              f"within {GRACE:.0f} s, so the process ended there (a compile's staging folder is "
                              "removed by the next compile of that name)")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with watched(on_timeout):
            yield
    except Exit:
        raise
    except QvlcError as e:
        kind = {1: "parity failed" if type(e).__name__ == "ParityError" else "integrity", 3: "environment"}
        report(kind.get(e.exit_code, "error"), str(e))
        raise Exit(e.exit_code) from None
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        report("interrupted", f"{signal.Signals(signum).name}: {action} stopped; nothing it was writing was kept")
        raise Exit(128 + signum) from None
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            _internal(action, report)
        report("environment", _environment_message(e))
        raise Exit(EXIT_ENVIRONMENT) from None
    except MemoryError:
        report("environment", f"out of memory during {action}\n  fix: lower the static shapes, set "
                              "validate.enabled: false, or use a machine with more memory")
        raise Exit(EXIT_ENVIRONMENT) from None
    except Exception:  # noqa: BLE001 — the one place every other failure is turned into a log and an exit code
        _internal(action, report)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _internal(action: str, report: Callable[[str, str], None]) -> None:
    path = write_log(traceback.format_exc())
    report("internal error", f"{action} failed unexpectedly (a bug in qvlc); the traceback is in {path}\n"
                             "  fix: please report it with that log")
    raise Exit(EXIT_INTERNAL) from None
