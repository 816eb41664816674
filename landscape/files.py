"""The one way this project writes a file: whole or not at all.

`write_atomic(path, write)` lets `write` fill a temporary file in the same folder, flushes it to the disk and
only then moves it over `path` (`os.replace` is atomic on one file system), so a crash at any moment leaves
either the old file or the new one, never half of either. Every file the project writes goes through it:
data caches, trained models, stage results, figures, the report, metrics.json.

A write that the system refuses (a full disk, no permission, a read-only file system) raises `WriteError`, an
`OSError` whose message is one line naming the path and the cause; the old file is left as it was and no
temporary file is left behind. A run killed mid-write leaves its temporary file, named
`.<name>.<host>-<pid>.<random>.tmp`, which `remove_stale_temporaries` deletes on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["WriteError", "check_writable", "remove_stale_temporaries", "write_atomic", "write_bytes_atomic"]

# Why a write failed, in words, and what the user can do about it; other causes use the system's own words.
CAUSES = {
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EDQUOT: "the disk quota is used up: free some space and run again",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: move the folder away or choose another path",
    errno.ENOENT: "its folder does not exist: create it or choose another path",
}
STALE_AFTER_S = 24 * 3600  # a temporary file that no process of this machine can be writing: see below
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")


class WriteError(OSError):
    """A file or folder could not be written; str() is one line naming the path and the cause."""

    def __init__(self, path: str | os.PathLike, cause: OSError | str, *, code: int | None = None) -> None:
        code = cause.errno if isinstance(cause, OSError) else code
        words = cause if isinstance(cause, str) else CAUSES.get(code, cause.strerror or str(cause))
        super().__init__(code, words, str(path))
        self.message = f"cannot write {path}: {words}"

    def __str__(self) -> str:
        return self.message


def _host_tag() -> str:
    """Six hex digits naming this machine in temporary names (a host name may hold dots; a hash never does)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: str, path: Path) -> None:
    """The moment a finished file becomes visible under its name (the crash tests kill the process here)."""
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(binary file) on a temporary file beside `path`, fsync it, then move it into place; on any
    error the temporary file is removed and `path` is left as it was, and an OSError becomes a `WriteError`
    naming `path`. Returns `path`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host_tag()}-{os.getpid()}.",
                                   suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # as a plain open() would have made it
        _replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err) from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            with contextlib.suppress(OSError):  # (on a file system gone read-only: the next run removes it)
                os.unlink(tmp)
    return path


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    """`write_atomic` for a payload already in memory."""
    return write_atomic(path, lambda f: f.write(payload))


def make_folder(folder: str | os.PathLike) -> Path:
    """`folder` and its parents created if missing; an OSError becomes a `WriteError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word when `folder` is a file
        raise WriteError(folder, "it is a file, not a folder: choose another path", code=errno.ENOTDIR) from None
    except OSError as err:
        raise WriteError(folder, err) from None
    return folder


def check_writable(folder: str | os.PathLike) -> None:
    """Raise `WriteError` (naming `folder` and the cause) unless a file can be created in `folder`, or, for a
    folder yet to be made, in its nearest existing parent. A real file is created and removed: permission bits
    say nothing for root, and only a write says whether the file system is read-only or full."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise WriteError(folder, f"{existing} is a file, not a folder: choose another path", code=errno.ENOTDIR)
    probe = None
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=f".writable.{_host_tag()}-{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WriteError(folder, err) from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _is_stale(match: re.Match, age_s: float) -> bool:
    """A temporary file of a process of this machine that has ended is stale at once (the usual case: a killed
    run, then its rerun); one from another machine sharing the folder, or named before names held a process
    id, only once no write has touched it for a day, since no process here can tell whether its writer lives."""
    if match["pid"] is not None and match["host"] == _host_tag() and int(match["pid"]) != os.getpid():
        return not _pid_is_running(int(match["pid"]))
    return age_s > STALE_AFTER_S


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `write_atomic` (or `check_writable`) left under `folder` (recursively)
    when its process was killed, and only those; returns what was deleted. Safe beside a live writer: see
    `_is_stale`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for path in sorted(folder.rglob(".*.tmp")):
        match = _TEMPORARY.match(path.name)
        try:
            if match is None or not path.is_file() or path.is_symlink():
                continue
            if _is_stale(match, now - path.lstat().st_mtime):
                path.unlink()
                removed.append(path)
        except OSError:  # gone already (another run cleaned it), or a folder we cannot write: left alone
            continue
    return removed
