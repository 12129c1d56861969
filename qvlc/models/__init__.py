"""The model family registry, keyed by config.json's ``model_type``.

Adding a family is a new folder under ``qvlc/models/`` (see ``common/family.py`` for what it provides) and one
line in ``FAMILIES``. Families are imported on first use; importing this module imports none of them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.errors import CheckpointError, IntegrityError

if TYPE_CHECKING:
    from qvlc.artifact.manifest import Manifest
    from qvlc.models.common.family import Family

FAMILIES: dict[str, str] = {
    "qwen2_vl": "qvlc.models.qwen2_vl",
    "qwen2_5_vl": "qvlc.models.qwen2_5_vl",
    "qwen3_vl": "qvlc.models.qwen3_vl",
}
# Families qvlc knows of and does not compile, with the reason (refused by name, not as an unknown model_type).
REFUSED = {"qwen3_vl_moe": "the Qwen3-VL mixture-of-experts models (30B-A3B, 235B-A22B) are not supported: their "
                           "decoder routes tokens to experts, which the shared dense decoder graphs do not express"}
TINY = "tiny"  # the embedded default: the first family's tiny model; "tiny:<model_type>" names another
DEFAULT_FAMILY = "qwen2_vl"


def family(model_type: str) -> "Family":
    """The family of ``model_type``; CheckpointError listing the supported ones when there is none."""
    if model_type in REFUSED:
        raise CheckpointError(f"model_type {model_type!r}: {REFUSED[model_type]}",
                              fix="use a dense checkpoint of a supported family (Qwen3-VL 2B, 4B, 8B)",
                              key="model.checkpoint")
    if model_type not in FAMILIES:
        known = ", ".join(f"{family(m).display_name} ({m})" for m in FAMILIES)
        raise CheckpointError(f"model_type {model_type!r} is not a family qvlc knows",
                              fix=f"use a checkpoint of one of: {known}", key="model.checkpoint")
    return importlib.import_module(FAMILIES[model_type]).FAMILY


def tiny_family(checkpoint: str) -> "Family | None":
    """The family of a ``tiny`` / ``tiny:<model_type>`` checkpoint name, None for a folder path."""
    if checkpoint == TINY:
        return family(DEFAULT_FAMILY)
    if checkpoint.startswith(TINY + ":"):
        model_type = checkpoint[len(TINY) + 1:]
        if model_type not in FAMILIES:
            raise CheckpointError(f"{checkpoint!r} names no family",
                                  fix=f"use one of: {', '.join([TINY] + [f'{TINY}:{m}' for m in FAMILIES])}",
                                  key="model.checkpoint")
        return family(model_type)
    return None


def artifact_family(folder: Path, manifest: "Manifest", key: str) -> "Family":
    """The family of a trusted artifact (``qvlc.artifact.trust.checked_artifact``), once each of its graphs'
    actual interface matches the one the family declares for the manifest's spec: a manifest whose shapes disagree
    with the graphs is refused (IntegrityError naming every mismatch) before a runtime or the proof feeds them."""
    from qvlc.artifact.manifest import graph_io

    fam = family(manifest.family)
    folder = Path(folder)
    problems = []
    for _, path, sig in fam.declared_graphs(folder, manifest.llm, manifest.visual):
        io = graph_io(path)
        problems += [f"{path.relative_to(folder)}: {name}: {what}"
                     for name, what in sig.mismatches(io.inputs, io.outputs)]
    if problems:
        raise IntegrityError(f"{folder} cannot be used: " + "; ".join(problems),
                             fix="recompile the artifact (`qvlc verify` lists what changed)", key=key)
    return fam
