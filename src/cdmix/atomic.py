"""The one atomic file writer: write a temporary file beside the target, fsync, then rename.

A kill at any moment leaves either the old file or the new one, never half of one. Only a regular
file is ever replaced: a folder, a symbolic link, a device or a pipe at the path is refused, and so
is a folder that does not exist. A write that fails (read-only or full disk) raises ``UserError``
naming the path, and leaves the old file as it was.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from cdmix.errors import UserError

TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside the target


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (no race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(path: Path) -> None:
    """Raise ``UserError`` unless ``path`` is a regular file or absent, in a folder that exists."""
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link; cdmix writes only regular files (give the real path)")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise UserError(f"{path} is not a regular file (a device, pipe or socket); cdmix writes only regular files")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"cannot write {path}: {path.parent} {what}")


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any]) -> None:
    """Replace ``path`` with ``data``: bytes, text (UTF-8), or a function that writes to a binary file.

    The new file gets the user's umask (like any file the user creates), not mkstemp's 0600.
    """
    path = Path(path)
    check_target(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
