"""The exceptions users see: each names the problem and the fix, and carries the exit code the CLI returns.

| code | meaning |
|---|---|
| 0 | success |
| 1 | parity failed, or an artifact failed its integrity check (a file or the manifest differs from what was written) |
| 2 | bad input: config, checkpoint, artifact path, image, video, prompt, or a compile of the same name running |
| 3 | the environment failed: disk full, read-only filesystem, permission denied, out of memory |
| 4 | an internal error (a bug in qvlc): one line on stderr, the traceback in a log file |
| 130 / 143 | interrupted by SIGINT / SIGTERM; whatever was being written is removed |
"""

from __future__ import annotations

import re
from enum import Enum

EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4


class Failure(str, Enum):
    """How a command's failure is labelled on stderr: each error class carries its own, as it carries its exit code."""

    ERROR = "error"
    PARITY = "parity failed"
    INTEGRITY = "integrity"
    ENVIRONMENT = "environment"
    INTERRUPTED = "interrupted"
    INTERNAL = "internal error"

    def __str__(self) -> str:
        return self.value


class QvlcError(Exception):
    """A user-facing error. ``key`` names the config key, file or input at fault, ``fix`` says what to do."""

    exit_code = EXIT_INPUT
    kind = Failure.ERROR

    def __init__(self, problem: str, *, fix: str = "", key: str = "") -> None:
        self.problem = problem
        self.fix = fix
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        fix = f"\n  fix: {self.fix}" if self.fix else ""
        return f"{where}{self.problem}{fix}"


class ConfigError(QvlcError):
    """A config value that cannot work, found before any weight is loaded."""


class CheckpointError(QvlcError):
    """A checkpoint folder that is missing, incomplete, damaged or of no family qvlc knows."""


class ParityError(QvlcError):
    """One or more graphs disagree with the oracle beyond tolerance."""

    exit_code = EXIT_FAILED
    kind = Failure.PARITY


class IntegrityError(QvlcError):
    """An artifact whose files or manifest are not what the compile wrote (damaged, edited, truncated), or whose
    parity failed when it was compiled."""

    exit_code = EXIT_FAILED
    kind = Failure.INTEGRITY


class EnvironmentFailure(QvlcError):
    """The machine refused: disk full, read-only filesystem, permission denied."""

    exit_code = EXIT_ENVIRONMENT
    kind = Failure.ENVIRONMENT


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; raised from the signal handler so every ``finally`` cleans up on the way out.
    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, limit: int = 0) -> str:
    """User-derived text made safe for a terminal: control characters (an ESC sequence could erase or fake a line)
    shown as ``\\xNN``, and cut to ``limit`` characters (0: whole)."""
    out = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                       str(text))
    return out if not limit or len(out) <= limit else out[:limit] + "…"


def quoted(value: object, limit: int = 80) -> str:
    """A user's value in a message: its repr, printable, at most ``limit`` characters (a YAML value can be huge)."""
    return printable(repr(value), limit)
