"""Whether an artifact folder can be trusted before anything reads it: the manifest's own digest, every listed
path confined to the folder (relative, no ``..``, no symlinks out), every file's size and sha256, the graphs'
external-data locations, their interfaces against the family's signatures, and the parity it was compiled with.
What `qvlc verify`, `run`, `validate` and `serve` call; ``expected_digest`` pins an artifact for CI.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qvlc.artifacts import FAILED_SUFFIX, MANIFEST_DIGEST, listed_files
from qvlc.checkpoint.load import sha256_file
from qvlc.contract import MANIFEST, GraphSig, Manifest, read_manifest
from qvlc.errors import IntegrityError, QvlcError, printable


def manifest_digest(folder: Path) -> str:
    """The artifact's digest: the sha256 of its manifest.json, which lists every file's sha256 (what CI pins)."""
    return sha256_file(Path(folder) / MANIFEST)


def check_digest_options(expect: list[str] | None) -> frozenset[str]:
    """``--expect-digest`` values: 64 hex digits each (any case)."""
    for e in expect or ():
        if not re.fullmatch(r"[0-9a-fA-F]{64}", e):
            raise QvlcError(f"--expect-digest {printable(e, 80)!r} is not a sha256 (64 hex digits)",
                            fix="pass the digest `qvlc compile` printed (the content of manifest.sha256)",
                            key="--expect-digest")
    return frozenset(e.lower() for e in expect or ())


def manifest_problems(folder: Path, expect_digest: frozenset[str] | None = None) -> list[str]:
    """Why manifest.json cannot be trusted (empty when its digest matches manifest.sha256 and, when given,
    ``expect_digest``: the digest CI pinned, which an edited-and-resealed manifest cannot match)."""
    digest = Path(folder) / MANIFEST_DIGEST
    if not digest.is_file() or digest.is_symlink():
        return [f"{MANIFEST_DIGEST}: missing, so {MANIFEST} cannot be checked"]
    with open(digest, "rb") as f:
        want = f.read(256).decode(errors="replace").split()[:1]
    actual = manifest_digest(folder)
    if want != [actual]:
        return [f"{MANIFEST}: changed after the compile (its sha256 differs from {MANIFEST_DIGEST})"]
    if expect_digest and actual not in expect_digest:
        return [f"{MANIFEST}: sha256 {actual} is not {' or '.join(sorted(expect_digest))} (--expect-digest): this "
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


def declared_graphs(folder: Path, family, llm=None, visual=None) -> list[tuple[str, Path, GraphSig]]:
    """(label, file, signature the family declares) of every graph an artifact with this spec holds: the one
    list both validation and ``checked_artifact`` check the files against."""
    from qvlc.contract import VISUAL, rank_dirs

    if llm is not None:
        ranked = llm.tp > 1
        return [(name.removesuffix(".onnx").removeprefix("llm_") + (f"[rank{r}]" if ranked else ""), d / name, sig)
                for r, d in enumerate(rank_dirs(folder, llm.tp)) for name, sig in family.llm_signatures(llm).items()]
    return [("visual", Path(folder) / VISUAL, family.visual_signature(visual))] if visual is not None else []


def signature_problems(folder: Path, m: Manifest) -> list[str]:
    """Each graph's actual interface against the one its family declares for the manifest's spec: a manifest
    whose shapes disagree with the graphs is refused before a runtime feeds them."""
    from qvlc.contract import graph_io
    from qvlc.models import family

    problems = []
    for _, path, sig in declared_graphs(folder, family(m.family), m.llm, m.visual):
        io = graph_io(path)
        problems += [f"{path.relative_to(folder)}: {name}: {what}" for name, what in sig.mismatches(io.inputs,
                                                                                                   io.outputs)]
    return problems


HASH_BY_DEFAULT_BYTES = 4 << 30  # sha256 runs at ~1.7 GB/s here: up to 4 GB costs ~2.5 s before a run


def require_artifact(folder: Path, key: str) -> Path:
    """A folder with a manifest.json; QvlcError (bad input) when the path is not an artifact at all."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QvlcError(f"artifact folder {str(folder)!r} does not exist",
                        fix="give the folder of a finished `qvlc compile`", key=key)
    if not (folder / MANIFEST).is_file():
        raise QvlcError(f"{folder} has no {MANIFEST}, so it is not a finished artifact",
                        fix="give the folder of a finished `qvlc compile`", key=key)
    return folder


def checked_artifact(folder: Path, part: str | None, key: str, hashes: bool | None = None,
                     expect_digest: frozenset[str] | None = None) -> Manifest:
    """What `run` and `validate` use: the manifest (digest checked) of a ``part`` artifact (None: either part)
    whose files all have their recorded sizes — and sha256 when ``hashes`` (default: when the artifact is at most
    4 GB) — whose graphs match the manifest's interfaces, and whose parity did not fail. IntegrityError listing
    every problem otherwise."""
    from qvlc.contract import read_part_manifest

    folder = require_artifact(folder, key)
    problems = manifest_problems(folder, expect_digest)
    if problems:
        raise IntegrityError("; ".join(problems), fix="recompile the artifact (or restore it from a copy)", key=key)
    m = read_part_manifest(folder, part, key) if part else read_manifest(folder)
    if expect_digest:
        hashes = True  # a pinned artifact: every file against the pinned manifest
    if hashes is None:
        hashes = sum(f.bytes for f in m.files) <= HASH_BY_DEFAULT_BYTES
    problems = file_problems(folder, m, hashes)
    if not problems:
        problems = signature_problems(folder, m)
    if m.parity.get("passed") is False or folder.name.endswith(FAILED_SUFFIX):
        problems.insert(0, f"its parity check failed when it was compiled (see {folder / 'parity.md'})")
    if problems:
        raise IntegrityError(f"{folder} cannot be used: " + "; ".join(problems),
                             fix="recompile the artifact (`qvlc verify` lists what changed)", key=key)
    return m


@dataclass
class VerifyResult:
    checked: int
    problems: list[str]


def verify(folder: Path, expect_digest: frozenset[str] | None = None) -> VerifyResult:
    """The manifest's own digest (and the pinned one), then every file's size and sha256 against it, files it
    does not know, and whether the artifact's parity failed at compile time."""
    folder = require_artifact(folder, str(folder))
    problems = manifest_problems(folder, expect_digest)
    if problems:
        return VerifyResult(0, problems)
    manifest = read_manifest(folder)
    problems = file_problems(folder, manifest)
    if manifest.parity.get("passed") is False:
        problems.append(f"parity: FAILED when it was compiled, the files are as written (see {folder / 'parity.md'})")
    return VerifyResult(len(manifest.files), problems)
