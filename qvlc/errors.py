"""The one exception type users see: it names the problem and the fix."""

from __future__ import annotations


class QvlcError(Exception):
    """A user-facing error. ``key`` names the config key or input at fault, ``fix`` says what to do."""

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
    """A checkpoint folder that is missing, incomplete, or not Qwen2-VL."""


class ParityError(QvlcError):
    """One or more graphs disagree with the oracle beyond tolerance."""
