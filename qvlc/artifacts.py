"""Artifact folders: staging, atomic publish, file hashes, manifest.json, and `qvlc verify`."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qvlc.checkpoint.load import sha256_file
from qvlc.contract import MANIFEST, FileRecord, GraphSig, Manifest, read_manifest
from qvlc.errors import IntegrityError, QvlcError

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


MARKER = ".qvlc-artifact"  # written into every folder qvlc creates; qvlc deletes only folders that carry it
MANIFEST_DIGEST = "manifest.sha256"  # sha256 of manifest.json, in `sha256sum -c` format
NOT_LISTED = (MANIFEST, MANIFEST_DIGEST, MARKER)  # files of an artifact that the manifest's file table leaves out
FAILED_SUFFIX = ".failed"


def is_ours(folder: Path) -> bool:
    """A folder qvlc created (a staging folder, an artifact, a ``.failed`` folder): it carries the marker, or is a
    0.1 artifact (no marker yet) whose manifest.json names a qvlc version."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    try:
        return '"qvlc_version"' in (folder / MANIFEST).read_text(errors="replace")[:200]
    except OSError:
        return False


def refuse_existing(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise QvlcError(f"artifact folder {final} already exists",
                        fix="pass --force to replace it, or change `name` in the config", key="name")
    if final.exists() and not is_ours(final):
        raise QvlcError(f"{final} exists and was not written by qvlc, so --force will not delete it",
                        fix="move it away yourself, or change `name` / output.dir", key="name")


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
    ``finally`` could clean up: their owner's pid is in the name, that process is gone, and qvlc's marker is in it."""
    removed = []
    for p in final.parent.glob(f".{final.name}.staging-*"):
        pid = p.name[len(f".{final.name}.staging-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and is_ours(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def make_staging(final: Path) -> Path:
    """A hidden sibling of the final folder (same filesystem, so publishing is one rename), named after this
    process so a later compile can tell it from a live one, and marked as qvlc's."""
    output_folder(final)
    remove_stale_staging(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-{os.getpid()}-", dir=final.parent))
    (staging / MARKER).write_text("written by qvlc: a staging folder, an artifact, or a failed artifact\n")
    return staging


def output_folder(final: Path) -> Path:
    """The folder the artifact goes into, created if needed; QvlcError when a file stands in the way."""
    for p in (final.parent, *final.parent.parents):
        if p.exists() and not p.is_dir():
            raise QvlcError(f"output.dir {str(final.parent)!r} cannot be a folder: {str(p)!r} is a file",
                            fix="set output.dir (or -o) to a folder", key="output.dir")
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_up(staging: Path) -> None:
    """mkdtemp makes the folder 0700; published artifacts follow the umask like every other file (0755 / 0644)."""
    staging.chmod(0o777 & ~_umask())


def publish(staging: Path, final: Path, force: bool) -> None:
    """Move a complete staging folder into place. The old artifact (with --force) is removed only now."""
    refuse_existing(final, force)
    _open_up(staging)
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash)
    else:
        staging.rename(final)


def keep_failed(staging: Path, final: Path) -> Path:
    """A staging folder whose parity failed, kept as ``<name>.failed/`` for inspection (replacing an older one
    only if qvlc wrote it)."""
    failed = final.parent / f"{final.name}{FAILED_SUFFIX}"
    if failed.exists():
        if not is_ours(failed):
            raise QvlcError(f"{failed} exists and was not written by qvlc", key="name",
                            fix="move it away yourself; qvlc keeps a failed compile there")
        discard(failed)
    _open_up(staging)
    staging.rename(failed)
    return failed


def discard(folder: Path) -> None:
    """Remove a folder qvlc created (never one without its marker)."""
    if Path(folder).is_dir() and is_ours(folder):
        shutil.rmtree(folder, ignore_errors=True)


class CompileLock:
    """``<output.dir>/.<name>.lock``, held with flock from the config check to the publish: a second compile of
    the same name is refused at once instead of after doing the whole job."""

    def __init__(self, final: Path) -> None:
        self.path = final.parent / f".{final.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> "CompileLock":
        output_folder(self.path.parent / "x")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise QvlcError(f"another qvlc compile of {self.path.parent / self.path.name[1:-5]} is running "
                                f"(pid {holder})", fix="wait for it to finish, or change `name`",
                                key="name") from None
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break  # still the file others will open: ours
            os.close(fd)  # the holder removed it between our open and flock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


def _listed(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*") if q.is_file() and q.relative_to(folder).as_posix() not in NOT_LISTED)


def file_table(folder: Path) -> tuple[FileRecord, ...]:
    """Every file under ``folder`` except the manifest, its digest and the marker, sorted, with bytes and sha256."""
    return tuple(FileRecord(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p))
                 for p in _listed(folder))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """The one place manifest.json is written: ``manifest`` with the table of every file beside it, then its own
    sha256 in manifest.sha256 (so an edited manifest is caught too)."""
    text = dataclasses.replace(manifest, files=file_table(folder)).to_json()
    (folder / MANIFEST).write_text(text)
    (folder / MANIFEST_DIGEST).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}\n")


def manifest_problems(folder: Path) -> list[str]:
    """Why manifest.json cannot be trusted (empty when its digest matches)."""
    digest, manifest = Path(folder) / MANIFEST_DIGEST, Path(folder) / MANIFEST
    if not digest.is_file():
        return [f"{MANIFEST_DIGEST}: missing, so {MANIFEST} cannot be checked"]
    want = digest.read_text(errors="replace").split()[:1]
    if want != [sha256_file(manifest)]:
        return [f"{MANIFEST}: changed after the compile (its sha256 differs from {MANIFEST_DIGEST})"]
    return []


def file_problems(folder: Path, manifest: Manifest, hashes: bool = True) -> list[str]:
    """Every listed file's presence and size (and sha256 when ``hashes``), and files the manifest does not know."""
    problems = []
    listed = {row.path: row for row in manifest.files}
    for rel, row in listed.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != row.bytes:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {row.bytes}")
        elif hashes and sha256_file(p) != row.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = [p.relative_to(folder).as_posix() for p in _listed(folder) if p.relative_to(folder).as_posix() not in listed]
    return problems + [f"{rel}: not in the manifest" for rel in extra]


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


def checked_artifact(folder: Path, part: str | None, key: str, hashes: bool | None = None) -> Manifest:
    """What `run` and `validate` use: the manifest (digest checked) of a ``part`` artifact (None: either part)
    whose files all have their recorded sizes — and sha256 when ``hashes`` (default: when the artifact is at most
    4 GB) — whose graphs match the manifest's interfaces, and whose parity did not fail. IntegrityError listing
    every problem otherwise."""
    from qvlc.contract import read_part_manifest

    folder = require_artifact(folder, key)
    problems = manifest_problems(folder)
    if problems:
        raise IntegrityError("; ".join(problems), fix="recompile the artifact (or restore it from a copy)", key=key)
    m = read_part_manifest(folder, part, key) if part else read_manifest(folder)
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


def verify(folder: Path) -> VerifyResult:
    """The manifest's own digest, then every file's size and sha256 against it, files it does not know, and
    whether the artifact's parity failed at compile time."""
    folder = require_artifact(folder, str(folder))
    problems = manifest_problems(folder)
    if problems:
        return VerifyResult(0, problems)
    manifest = read_manifest(folder)
    problems = file_problems(folder, manifest)
    if manifest.parity.get("passed") is False:
        problems.append(f"parity: FAILED when it was compiled, the files are as written (see {folder / 'parity.md'})")
    return VerifyResult(len(manifest.files), problems)
