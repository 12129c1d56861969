"""Artifact folders: staging, atomic publish, file hashes, manifest.json, and `qvlc verify`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qvlc.contract import MANIFEST, FileRecord, Manifest, read_manifest
from qvlc.errors import QvlcError
from qvlc.models.common.checkpoint import sha256_file

LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxsim", "numpy")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def refuse_existing(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise QvlcError(f"artifact folder {final} already exists",
                        fix="pass --force to replace it, or change `name` in the config", key="name")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Staging folders of ``final`` left by a compile that was killed outright (SIGKILL, OOM killer), which no
    ``finally`` could clean up: their owner's pid is in the name and that process is gone."""
    removed = []
    for p in final.parent.glob(f".{final.name}.staging-*"):
        pid = p.name[len(f".{final.name}.staging-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def make_staging(final: Path) -> Path:
    """A hidden sibling of the final folder (same filesystem, so publishing is one rename), named after this
    process so a later compile can tell it from a live one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-{os.getpid()}-", dir=final.parent))


def publish(staging: Path, final: Path, force: bool) -> None:
    """Move a complete staging folder into place. The old artifact (with --force) is removed only now."""
    refuse_existing(final, force)
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash)
    else:
        staging.rename(final)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def file_table(folder: Path) -> tuple[FileRecord, ...]:
    """Every file under ``folder`` except the manifest, sorted, with bytes and sha256."""
    return tuple(FileRecord(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p))
                 for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != MANIFEST))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """The one place manifest.json is written: ``manifest`` with the table of every file beside it."""
    (folder / MANIFEST).write_text(dataclasses.replace(manifest, files=file_table(folder)).to_json())


@dataclass
class VerifyResult:
    checked: int
    problems: list[str]


def verify(folder: Path) -> VerifyResult:
    """Recompute every file's size and sha256 and compare with the manifest; list files it does not know."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    listed = {row.path: row for row in manifest.files}
    for rel, row in listed.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != row.bytes:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {row.bytes}")
        elif sha256_file(p) != row.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = [q.relative_to(folder).as_posix() for q in folder.rglob("*")
             if q.is_file() and q.name != MANIFEST and q.relative_to(folder).as_posix() not in listed]
    problems += [f"{rel}: not in the manifest" for rel in sorted(extra)]
    return VerifyResult(len(listed), problems)
