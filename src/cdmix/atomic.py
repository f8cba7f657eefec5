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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def run_inputs(run_dir: str | Path) -> list[Path]:
    """The files and folders a run was made from (its config.json's data_path, label_file, noise_file,
    extra_data_path, pretrained), as they are named there; [] when the config cannot be read."""
    import json

    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(config, dict):
        return []
    keys = ("data_path", "label_file", "noise_file", "extra_data_path", "pretrained")
    return [Path(config[k]).expanduser() for k in keys if isinstance(config.get(k), str) and config[k]]


def refuse_inputs(path: str | Path, flag: str, run_dir: str | Path | None = None,
                  inputs: tuple[str | Path, ...] | list = ()) -> None:
    """Raise ``UserError`` when an output ``path`` is what ``run_dir``'s run was made from (``run_inputs``:
    its data CSV, noise or label file, weights, or an existing image in its data folder) or one of the
    command's own ``inputs``: writing there would destroy data, ``--overwrite`` or not."""
    path = Path(path)
    sources = run_inputs(run_dir) if run_dir is not None else []
    for source, what in [*((s, "the data the run was made from") for s in sources),
                         *((Path(s), "an input of this command") for s in inputs)]:
        if _same_file(path, source) or path.resolve() == source.resolve():
            raise UserError(f"{flag} {path} is {what}; writing there would destroy it, choose another file name")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.exists() and _inside(path, source):
            raise UserError(f"{flag} {path} is an image in the run's data folder {source}; cdmix never replaces "
                            "the data a run was made from, choose another file name")


def check_output(path: str | Path, flag: str, *, overwrite: bool = False, run_dir: str | Path | None = None,
                 replaceable: str | Path | None = None, inputs: tuple[str | Path, ...] | list = ()) -> Path:
    """Refuse an output file a command must not write; returns ``path`` as a Path.

    Refused, with a ``UserError`` naming ``flag`` (``--clean-csv``, ``--html``, ``--csv``): a path that
    ``atomic_write`` would refuse (a folder, a link, a missing folder); a run folder's own file
    (``config.json``, ``summary.json``, ``label_issues.csv``, its checkpoints, ...; ``runs.is_own_file``),
    except ``replaceable`` (the file this command itself writes there, e.g. the run's own review page);
    what ``run_dir``'s run was made from (its data CSV or noise file, an image in its data folder) and
    the command's own ``inputs``, even with ``overwrite``; and any other existing file unless
    ``overwrite``.
    """
    from cdmix import runs

    path = Path(path)
    check_target(path)
    if replaceable is not None and (path.resolve() == Path(replaceable).resolve()):
        return path
    runs.refuse_run_file(path, flag)
    if runs.is_own_file(path.name) and runs.is_run_folder(path.parent):
        raise UserError(f"{flag} {path} is a file of the run in {path.parent}; writing there would break the run, "
                        "choose another file name")
    refuse_inputs(path, flag, run_dir, inputs)
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; give --overwrite to replace it, or another file name")
    return path


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
