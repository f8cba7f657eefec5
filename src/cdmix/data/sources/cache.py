"""Where a source's decoded images are kept: an image store in ``<data>/.cdmix_cache/`` (or the
``cache_dir`` asked for)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

CACHE_DIR_NAME = ".cdmix_cache"
log = logging.getLogger("cdmix")


def cache_folder(cache_dir: str | None, data_root: Path) -> Path:
    """The folder for the stores of the data under ``data_root``: ``cache_dir`` when given, else
    ``data_root / CACHE_DIR_NAME``, or a temporary folder when that cannot be written."""
    folder = Path(cache_dir).expanduser() if cache_dir else data_root / CACHE_DIR_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "cdmix_cache"
    fallback.mkdir(parents=True, exist_ok=True)
    log.info(f"{folder} cannot be written; the decoded images go to {fallback}")
    return fallback
