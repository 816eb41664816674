"""The one way this project writes a file: whole or not at all.

`write_atomic(path, write)` lets `write` fill a temporary file in the same folder, flushes it to the disk and
only then moves it over `path` (`os.replace` is atomic on one file system), so a crash at any moment leaves
either the old file or the new one, never half of either. Every file the project writes goes through it:
data caches, trained models, stage results, figures, the report, metrics.json.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: str, path: Path) -> None:
    """The moment a finished file becomes visible under its name (the crash tests kill the process here)."""
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(binary file) on a temporary file beside `path`, fsync it, then move it into place; on any
    error the temporary file is removed and `path` is left as it was. Returns `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # as a plain open() would have made it
        _replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    """`write_atomic` for a payload already in memory."""
    return write_atomic(path, lambda f: f.write(payload))
