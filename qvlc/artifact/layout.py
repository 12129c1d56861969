"""The files of an artifact folder: their names, where each rank's graphs live, and which part it holds."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

MANIFEST = "manifest.json"


PARITY_JSON = "parity.json"


PARITY_MD = "parity.md"


EMBED = "embed_tokens.bin"


PREFILL = "llm_prefill.onnx"


DECODE = "llm_decode.onnx"


CHUNK = "llm_chunk.onnx"  # export.prefill_chunk: T prompt tokens against the packed past cache


WEIGHTS = "llm_weights.data"


VISUAL = "visual.onnx"


VISUAL_WEIGHTS = "visual_weights.data"


PREPROCESS = "preprocess.json"
MARKER = ".qvlc-artifact"  # written into every folder qvlc creates; qvlc deletes only folders that carry it
MANIFEST_DIGEST = "manifest.sha256"  # sha256 of manifest.json, in `sha256sum -c` format
NOT_LISTED = (MANIFEST, MANIFEST_DIGEST, MARKER)  # files of an artifact that the manifest's file table leaves out
FAILED_SUFFIX = ".failed"  # a compile whose parity failed is kept as <name>.failed/


class Part(str, Enum):
    """Which part of a checkpoint an artifact holds (config ``part``, manifest ``part``)."""

    LLM = "llm"
    VISUAL = "visual"

    def __str__(self) -> str:
        return self.value


def rank_dirs(folder: Path, tp: int) -> list[Path]:
    """Where each rank's graphs live: the artifact folder itself at tp = 1, else ``rank0/ … rank{tp-1}/``."""
    return [Path(folder)] if tp == 1 else [Path(folder) / f"rank{r}" for r in range(tp)]
