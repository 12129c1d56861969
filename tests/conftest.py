"""Shared fixtures: artifacts compiled once per session from the tiny default (real save/load path)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(name, part="llm", checkpoint="tiny", **export) → CompileResult, compiled once per distinct request."""
    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict

    cache: dict = {}
    out = tmp_path_factory.mktemp("artifacts")

    def build(name: str, part: str = "llm", validate: dict | None = None, checkpoint: str = "tiny", **export):
        key = (name, part, checkpoint, json.dumps({"export": export, "validate": validate}, sort_keys=True))
        if key not in cache:
            raw = {"name": name, "part": part, "model": {"checkpoint": checkpoint}, "export": export,
                   "output": {"dir": str(out)}}
            if validate:
                raw["validate"] = validate
            cache[key] = compile_artifact(config_from_dict(raw))
        return cache[key]

    return build


@pytest.fixture
def copy_artifact(tmp_path):
    def copy(folder: Path) -> Path:
        dst = tmp_path / folder.name
        shutil.copytree(folder, dst)
        return dst

    return copy


@pytest.fixture
def reseal():
    """reseal(folder): record an artifact's edited files in its manifest (and the manifest's digest), as if the
    compile had written them: the integrity check then passes and the value checks must catch the change."""
    from qvlc.artifact.manifest import Manifest, write_manifest

    def seal(folder: Path, edit=None) -> None:
        data = json.loads((folder / "manifest.json").read_text())
        if edit is not None:
            edit(data)
        write_manifest(folder, Manifest.from_dict(data))

    return seal
