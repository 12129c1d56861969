"""From a staging folder to a published artifact: the staging folder, the compile's lock, the atomic publish,
a failed compile kept aside, and only folders qvlc marked ever deleted."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

from qvlc.artifact.layout import FAILED_SUFFIX, MANIFEST, MARKER
from qvlc.errors import QvlcError


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
    if final.is_symlink():
        raise QvlcError(f"{final} is a symlink; qvlc publishes and replaces only folders it wrote, never a link",
                        fix="remove the link yourself, or change `name` / output.dir", key="name")
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
    if failed.exists() or failed.is_symlink():
        if failed.is_symlink() or not is_ours(failed):
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
            fd = self._open()
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

    def _open(self) -> int:
        """The lock file, never through a symlink nor onto another file's data: a link planted at the lock's path
        would make the compile truncate and write whatever it points to."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o666)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
            fd = -1
        st = os.fstat(fd) if fd >= 0 else None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            if fd >= 0:
                os.close(fd)
            raise QvlcError(f"{self.path} is not a plain lock file (a symlink, a hard link, a folder or a device "
                            "stands there); qvlc will not write through it", key="output.dir",
                            fix=f"remove {self.path} yourself, or set output.dir to a folder only you write")
        return fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None
