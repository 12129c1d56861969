"""An artifact opened for a runtime, in one place: its manifest checked as far as the caller trusts it
(``qvlc.artifact.trust``), then its graphs' interfaces against what its family declares for the manifest's spec;
and a visual artifact's preprocess.json, parsed once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.artifact.json_codec import read_json_file
from qvlc.artifact.layout import PREPROCESS
from qvlc.artifact.manifest import Manifest
from qvlc.artifact.trust import Trust, checked_artifact
from qvlc.errors import IntegrityError, QvlcError, printable
from qvlc.host.preprocess import PreprocessConfig
from qvlc.models import artifact_family

if TYPE_CHECKING:
    from qvlc.models.common.family import Family


def open_artifact(folder: Path, part: str, key: str, trust: Trust = Trust()) -> tuple[Manifest, "Family"]:
    """(manifest, family) of a ``part`` artifact that can be used; IntegrityError (exit 1) or QvlcError (exit 2)
    naming ``key`` otherwise."""
    m = checked_artifact(folder, part, key, trust)
    return m, artifact_family(folder, m, key)


def read_preprocess(folder: Path, key: str = "VISUAL_DIR") -> PreprocessConfig:
    """A visual artifact's preprocess.json (read once per run); IntegrityError naming the file when it is absent
    or not a preprocessing config (its bytes are covered by the manifest's digest, so this means a resealed or
    hand-made artifact)."""
    path = Path(folder) / PREPROCESS
    if not path.is_file():
        raise QvlcError(f"{folder} has no {PREPROCESS}", fix="recompile the visual part with this qvlc", key=key)
    data = read_json_file(path, PREPROCESS)
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return PreprocessConfig.from_dict(data)
    except (ValueError, TypeError, QvlcError) as exc:
        raise IntegrityError(f"{path} is not a preprocessing config ({printable(exc, 200)})",
                             fix="recompile the visual part", key=key) from None
