"""Where a source's decoded images are kept: an image store in ``<data>/.cdmix_cache/`` (or the
``cache_dir`` asked for), else in a private per-user cache.

When the data folder cannot be written, the stores go to ``$XDG_CACHE_HOME/cdmix`` (``~/.cache/cdmix``),
or, when that cannot be written either, ``$TMPDIR/cdmix-cache-<uid>``: never a folder shared between
users. The folder is made with mode 0700 and refused when another user owns it or others may write
to it; a store kept there records a digest of its pixels and is checked against it on every reuse
(see ``cdmix.data.store.build_store``'s ``verify``), so a replaced ``images.npy`` is refused, not trained on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from cdmix.errors import UserError

CACHE_DIR_NAME = ".cdmix_cache"
log = logging.getLogger("cdmix")


def cache_folder(cache_dir: str | None, data_root: Path) -> tuple[Path, bool]:
    """(folder for the stores of the data under ``data_root``, whether it is the private fallback).

    ``cache_dir`` when given, else ``data_root / CACHE_DIR_NAME``, else (neither can be written) a
    folder of the private cache named after ``data_root``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else data_root / CACHE_DIR_NAME
    if _writable(folder):
        return folder, False
    where = str(data_root.expanduser().resolve())
    private = private_cache() / f"{data_root.name or 'data'}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the image cache {private} ({exc.strerror or exc}); pass a writable "
                        f"folder as the cache") from None
    log.info(f"{folder} cannot be written; the decoded images go to {private}")
    return private, True


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def private_cache() -> Path:
    """This user's cache folder (made mode 0700); a UserError when another user could change it."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates = [home / "cdmix", Path(tempfile.gettempdir()) / f"cdmix-cache-{os.getuid()}"]
    for folder in candidates:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            check_private(folder)
            return folder
    raise UserError(f"no folder for decoded images can be written (tried {' and '.join(map(str, candidates))}); "
                    f"pass a writable cache folder")


def check_private(folder: Path) -> None:
    """Refuse ``folder`` unless it is a real folder of this user that no one else may write to."""
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"the image cache {folder} is not a folder (a link?); remove it and run again")
    if info.st_uid != os.getuid():
        raise UserError(f"the image cache {folder} belongs to another user (uid {info.st_uid}); remove it or set "
                        f"XDG_CACHE_HOME to a folder of your own")
    if info.st_mode & 0o077:
        raise UserError(f"the image cache {folder} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); "
                        f"run `chmod 700 {folder}` after checking what it holds, or remove it")
