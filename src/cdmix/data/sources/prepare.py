"""``cdmix prepare``: decode the images of a folder, csv or npz source into an image store."""

from __future__ import annotations

from pathlib import Path

from cdmix.data.sources.files import scan_csv, scan_folder
from cdmix.data.sources.npz import npz_headers, npz_store
from cdmix.data.sources.stored import file_decoder, image_file_samples
from cdmix.data.store import Store, build_store, default_workers
from cdmix.errors import UserError


def source_kind(source: Path) -> str:
    """folder | csv | npz, from what ``source`` is."""
    if source.is_dir():
        return "folder"
    if source.suffix.lower() in (".csv", ".npz"):
        return source.suffix.lower()[1:]
    raise UserError(f"{source} is neither a folder of class sub-folders, a .csv nor an .npz file "
                    "(or give --dataset folder|csv|npz)")


def prepare_store(source: str | Path, out: str | Path, size: int = 256, *, workers: int | None = None,
                  kind: str | None = None, progress: bool = True, chunk_size: int = 64,
                  after_commit=None) -> Store:
    """Decode the images of a folder, csv or npz ``source`` into the store ``out`` at ``size`` px
    (``cdmix prepare``); restartable, a complete store of the same files is reused (see ``store``)."""
    if size < 1:
        raise UserError(f"--size must be a positive number of pixels, got {size}")
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; give an image folder, a .csv or an .npz file")
    kind = kind or source_kind(path)
    if kind == "npz":
        return npz_store(path, npz_headers(path), Path(out), size, progress, chunk_size, after_commit)
    if kind not in ("folder", "csv"):
        raise UserError(f"cannot prepare a store from a {kind!r} source; use folder, csv or npz")
    left_out: list[tuple[str, str]] = []  # files whose names cannot be stored: listed in skipped.txt
    root, paths, labels, is_test, class_names = (scan_folder(str(path), left_out) if kind == "folder"
                                                 else scan_csv(str(path)))
    return build_store(out, image_file_samples(paths, root, labels, is_test), class_names, size,
                       file_decoder(paths, size, workers or default_workers()), source=str(path),
                       progress=progress, chunk_size=chunk_size, after_commit=after_commit, excluded=left_out)
