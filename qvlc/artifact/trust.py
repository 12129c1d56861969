"""Whether an artifact folder can be trusted before anything reads it: the manifest's own digest (and the one CI
pinned), every listed path confined to the folder (relative, no ``..``, no symlinks out), every file's size and
sha256, the graphs' external-data locations, and the parity it was compiled with. What `qvlc verify`, `run`,
`validate`, `serve` and `eval` call; how far to check is one ``Trust`` value. The graphs' interfaces against their
family's signatures are checked one layer up (``qvlc.models.artifact_family``), where the families are known."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qvlc.artifact.hashing import listed_files, sha256_file
from qvlc.artifact.layout import FAILED_SUFFIX, MANIFEST, MANIFEST_DIGEST, PARITY_MD
from qvlc.artifact.manifest import (
    Manifest,
    read_manifest,
    read_part_manifest,
    require_artifact,
)
from qvlc.errors import IntegrityError, printable


def manifest_digest(folder: Path) -> str:
    """The artifact's digest: the sha256 of its manifest.json, which lists every file's sha256 (what CI pins)."""
    return sha256_file(Path(folder) / MANIFEST)


def manifest_problems(folder: Path, digests: frozenset[str] = frozenset()) -> list[str]:
    """Why manifest.json cannot be trusted (empty when its digest matches manifest.sha256 and, when given,
    ``digests``: the digests CI pinned, which an edited-and-resealed manifest cannot match)."""
    digest = Path(folder) / MANIFEST_DIGEST
    if not digest.is_file() or digest.is_symlink():
        return [f"{MANIFEST_DIGEST}: missing, so {MANIFEST} cannot be checked"]
    with open(digest, "rb") as f:
        want = f.read(256).decode(errors="replace").split()[:1]
    actual = manifest_digest(folder)
    if want != [actual]:
        return [f"{MANIFEST}: changed after the compile (its sha256 differs from {MANIFEST_DIGEST})"]
    if digests and actual not in digests:
        return [f"{MANIFEST}: sha256 {actual} is not {' or '.join(sorted(digests))} (--expect-digest): this "
                "is not the artifact that was pinned"]
    return []


SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # one path component of a file qvlc writes


def path_problem(folder: Path, rel: str) -> str | None:
    """Why ``rel`` (a path recorded in a manifest or a graph) may not be opened inside ``folder``: absolute, with
    ``..`` or an odd character, a symlink, or resolving outside the folder. None when it is a plain member."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(not SAFE_NAME.fullmatch(x) or x in (".", "..") for x in parts):
        return "not a plain relative path inside the artifact"
    p = Path(folder) / rel
    if any((Path(folder).joinpath(*parts[:i + 1])).is_symlink() for i in range(len(parts))):
        return "a symlink (an artifact holds only regular files)"
    if not os.path.realpath(p).startswith(os.path.realpath(folder) + os.sep):
        return "outside the artifact folder"
    return None


def _tensors(graph):
    """Every tensor a graph holds: initializers, and tensor attributes of its nodes and their subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def file_problems(folder: Path, manifest: Manifest, hashes: bool = True) -> list[str]:
    """Every listed path confined to the folder, each file's presence and size (and sha256 when ``hashes``), and
    files the manifest does not know. Nothing outside the folder is opened or hashed."""
    problems, listed = [], {}
    for row in manifest.files:
        shown = printable(row.path)
        if (why := path_problem(folder, row.path)) is not None:
            problems.append(f"{shown}: {why}")
        elif row.path in listed:
            problems.append(f"{shown}: listed twice")
        else:
            listed[row.path] = row
    for rel, row in listed.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != row.bytes:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {row.bytes}")
        elif hashes and sha256_file(p) != row.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for q in listed_files(folder):
        rel = q.relative_to(folder).as_posix()
        if rel not in listed:
            problems.append(f"{printable(rel)}: " + ("a symlink" if q.is_symlink() else "not in the manifest"))
    return problems + external_data_problems(folder, listed)


def external_data_problems(folder: Path, listed: dict) -> list[str]:
    """Every ONNX graph's external-data locations: plain names beside the graph, inside the artifact, listed in
    the manifest, and the recorded ranges within the file. ONNX Runtime would open whatever a location names."""
    import onnx

    problems = []
    for rel in (r for r in listed if r.endswith(".onnx") and (folder / r).is_file()):
        try:
            model = onnx.load(str(folder / rel), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 — onnx raises DecodeError and others for a damaged file
            problems.append(f"{rel}: not a readable ONNX graph ({type(exc).__name__})")
            continue
        base = Path(rel).parent.as_posix()
        for t in _tensors(model.graph):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            target = loc if base == "." else f"{base}/{loc}"
            why = "a path, not a file beside the graph" if "/" in loc else path_problem(folder, target)
            if why is None and target not in listed:
                why = "not a file the manifest lists"
            if why is None and int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0) > \
                    listed[target].bytes:
                why = "a range past the end of the file"
            if why is not None:
                problems.append(f"{rel}: tensor {printable(t.name, 80)} names external data {printable(loc, 120)!r}: "
                                f"{why}")
                break
    return problems


HASH_BY_DEFAULT_BYTES = 4 << 30  # sha256 runs at ~1.7 GB/s here: up to 4 GB costs ~2.5 s before a run


@dataclass(frozen=True)
class Trust:
    """How far an artifact is checked before use, one value from the command line to the check. Its manifest's
    own digest and every file's size are always checked; every file's sha256 when ``hashes`` (None: when the
    artifact is at most 4 GB). ``digests``: sha256s of manifests CI pinned (``--expect-digest``); a pinned artifact's
    manifest must be one of them, and every file is then hashed against it."""

    hashes: bool | None = None
    digests: frozenset[str] = frozenset()

    def hash_files(self, manifest: Manifest) -> bool:
        if self.digests:
            return True
        if self.hashes is None:
            return sum(f.bytes for f in manifest.files) <= HASH_BY_DEFAULT_BYTES
        return self.hashes


FULL = Trust(hashes=True)  # every file hashed: `qvlc validate` (cheap next to the proof)


def checked_artifact(folder: Path, part: str | None, key: str, trust: Trust = Trust()) -> Manifest:
    """The manifest (digest checked) of a ``part`` artifact (None: either part) whose files all have their
    recorded sizes — and sha256, as ``trust`` says — and whose parity did not fail. IntegrityError listing every
    problem otherwise. The graphs' interfaces are checked against their family by ``qvlc.models.artifact_family``."""
    folder = require_artifact(folder, key, part or "")
    problems = manifest_problems(folder, trust.digests)
    if problems:
        raise IntegrityError("; ".join(problems), fix="recompile the artifact (or restore it from a copy)", key=key)
    m = read_part_manifest(folder, part, key) if part else read_manifest(folder, key)
    problems = file_problems(folder, m, trust.hash_files(m))
    if m.parity.get("passed") is False or folder.name.endswith(FAILED_SUFFIX):
        problems.insert(0, f"its parity check failed when it was compiled (see {folder / PARITY_MD})")
    if problems:
        raise IntegrityError(f"{folder} cannot be used: " + "; ".join(problems),
                             fix="recompile the artifact (`qvlc verify` lists what changed)", key=key)
    return m


@dataclass
class VerifyResult:
    checked: int
    problems: list[str]


def verify(folder: Path, digests: frozenset[str] = frozenset()) -> VerifyResult:
    """`qvlc verify`: the manifest's own digest (and the pinned ones), then every file's size and sha256 against
    it, files it does not know, and whether the artifact's parity failed at compile time."""
    folder = require_artifact(folder, str(folder))
    problems = manifest_problems(folder, digests)
    if problems:
        return VerifyResult(0, problems)
    manifest = read_manifest(folder)
    problems = file_problems(folder, manifest)
    if manifest.parity.get("passed") is False:
        problems.append(f"parity: FAILED when it was compiled, the files are as written (see {folder / PARITY_MD})")
    return VerifyResult(len(manifest.files), problems)
