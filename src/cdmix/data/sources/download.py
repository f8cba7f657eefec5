"""Downloads and archives: fetch a file with a progress bar, check its md5, extract a tar safely."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from cdmix.errors import UserError

def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: str | Path, expected: str | None) -> None:
    """Raise ``UserError`` (and delete the file) when ``path``'s md5 is not ``expected``."""
    if expected is None:
        return
    actual = file_md5(path)
    if actual != expected.lower():
        Path(path).unlink(missing_ok=True)
        raise UserError(f"md5 mismatch for {path}: got {actual}, expected {expected}; the file was deleted, "
                        f"run again to download it afresh")


def download_file(url: str, dest: str | Path, md5: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` into ``dest`` (via a ``.part`` file) with a progress bar, then check ``md5``."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise UserError(f"could not download {url} ({reason}); fetch it by hand into {dest}") from None
    os.replace(part, dest)
    verify_md5(dest, md5)
    return dest


def extract_tar(archive: str | Path, dest: str | Path) -> None:
    """Extract a tar archive refusing absolute paths, ``..``, links and special files."""
    archive, dest = Path(archive), Path(dest).resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                target = (dest / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest):
                    raise UserError(f"{archive} holds an unsafe entry {member.name!r}; delete the archive")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"could not extract {archive} ({exc}); delete it and run again with --download") from None

