"""How a qvlc command ends when something goes wrong: one message, a documented exit code, nothing half-written,
never a traceback (see ``qvlc.errors`` for the codes).

``guarded(action, report)`` wraps a command: SIGTERM raises ``Interrupted`` inside it (so the compile's
``finally`` removes its staging folder, as on SIGINT), and every failure is turned into one line through
``report(kind, text)``. Unexpected exceptions are bugs: their traceback goes to a log file whose path is shown
(``qvlc.system.crash_log``). ``command(action)`` is ``guarded`` with the console's report, for a typer command.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import traceback
from typing import Callable, Iterator

import typer

from qvlc.cli.console import report as console_report
from qvlc.errors import EXIT_ENVIRONMENT, EXIT_INTERNAL, Failure, Interrupted, QvlcError
from qvlc.system.crash_log import write_log
from qvlc.system.signals import GRACE, watched

# errno values that mean "the machine refused", not "the input is wrong"
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOMEM,
                      errno.EMFILE, errno.ENFILE, errno.EIO}
Report = Callable[[Failure, str], None]


class Exit(Exception):
    """Carries the exit code out of ``guarded``; ``command`` turns it into typer's exit."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(code)


@contextlib.contextmanager
def command(action: str) -> Iterator[None]:
    """A command body: every failure becomes one message on the console and its documented exit code."""
    try:
        with guarded(action, console_report):
            yield
    except Exit as e:
        raise typer.Exit(e.code) from None


def _environment_message(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOMEM: "out of memory"}.get(e.errno, e.strerror or str(e))
    return f"{what}{where}\n  fix: free space or pick a writable place (output.dir / -o), then run the command again"


@contextlib.contextmanager
def guarded(action: str, report: Report) -> Iterator[None]:
    """Run a command body; ``report(kind, text)`` prints one message (the error class's ``kind``, or interrupted /
    environment / internal error) and ``Exit`` carries the code out."""
    def on_sigterm(signum, _frame):
        raise Interrupted(signum)

    def on_timeout(signum: int) -> None:
        report(Failure.INTERRUPTED, f"{signal.Signals(signum).name}: {action} stopped; a library call did not "
                                    f"return within {GRACE:.0f} s, so the process ended there (a compile's staging "
                                    "folder is removed by the next compile of that name)")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with watched(on_timeout):
            yield
    except Exit:
        raise
    except QvlcError as e:
        report(e.kind, str(e))
        raise Exit(e.exit_code) from None
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        report(Failure.INTERRUPTED, f"{signal.Signals(signum).name}: {action} stopped; nothing it was writing was "
                                    "kept")
        raise Exit(128 + signum) from None
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            _internal(action, report)
        report(Failure.ENVIRONMENT, _environment_message(e))
        raise Exit(EXIT_ENVIRONMENT) from None
    except MemoryError:
        report(Failure.ENVIRONMENT, f"out of memory during {action}\n  fix: lower the static shapes, set "
                                    "validate.enabled: false, or use a machine with more memory")
        raise Exit(EXIT_ENVIRONMENT) from None
    except Exception:  # noqa: BLE001 — the one place every other failure is turned into a log and an exit code
        _internal(action, report)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _internal(action: str, report: Report) -> None:
    path = write_log(traceback.format_exc())
    report(Failure.INTERNAL, f"{action} failed unexpectedly (a bug in qvlc); the traceback is in {path}\n"
                             "  fix: please report it with that log")
    raise Exit(EXIT_INTERNAL) from None
