"""The config's enumerated choices that several of its sections read (``validate.oracle``)."""

from __future__ import annotations

from enum import Enum


class OracleKind(str, Enum):
    STREAMED = "streamed"  # transformers' own layers, one layer's weights in memory at a time
    MEMORY = "memory"  # the whole transformers model loaded (small models)

    def __str__(self) -> str:
        return self.value
