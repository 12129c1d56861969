"""sha256 of files: an artifact's file table, its manifest's digest, a checkpoint's weight files — and the digest of
a file taken from the bytes as they are written (``HashingWriter``), so the manifest stage need not read them back."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from qvlc.artifact.layout import NOT_LISTED


def sha256_file(path: Path, chunk: int = 1 << 24, stop: threading.Event | None = None) -> str:
    """sha256 of a file's bytes; ``stop`` set: give up between blocks (returns "")."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                return ""
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileDigest:
    """The sha256 of the bytes written to a file, and the file's size and modification time once it was closed:
    the manifest stage takes the digest only while the file still has that size and time (else it reads it)."""

    size: int
    mtime_ns: int
    sha256: str

    def describes(self, path: Path) -> bool:
        st = Path(path).stat()
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


class HashingWriter:
    """A new file written in order, hashed as it is written: every byte given to ``write`` goes to the file and
    to sha256, in the same order; ``close`` flushes and fsyncs, then records the ``digest``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self.digest: FileDigest | None = None

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> FileDigest:
        if self.digest is None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            st = self.path.stat()
            self.digest = FileDigest(st.st_size, st.st_mtime_ns, self._hash.hexdigest())
        return self.digest

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # a failed write: close without recording a digest of a half-written file
            self._file.close()


def listed_files(folder: Path) -> list[Path]:
    """Every file and symlink under ``folder`` but the manifest, its digest and the marker (a symlink is listed so
    the integrity check can refuse it; it is never followed)."""
    return sorted(q for q in folder.rglob("*") if (q.is_symlink() or q.is_file())
                  and q.relative_to(folder).as_posix() not in NOT_LISTED)
