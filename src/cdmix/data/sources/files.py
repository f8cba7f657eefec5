"""Folder and CSV sources: one sub-folder per class (optionally under ``train/`` and ``test/``), or a
``path,label[,split]`` CSV with paths relative to its folder. Their images are decoded once into an
image store in ``<data>/.cdmix_cache/`` and read from it by index."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.data.names import IMAGE_EXTENSIONS
from cdmix.data.sources.cache import cache_folder
from cdmix.data.sources.common import SourceSettings, check_class_count, image_size
from cdmix.data.sources.stored import file_decoder, image_file_samples, store_raw_data
from cdmix.data.store import build_store, default_workers
from cdmix.data.types import RawData
from cdmix.errors import UserError
from cdmix.safetext import restore_cell

# What a scan returns: (root, image paths, labels, is_test or None, class names).
Listing = tuple[Path, list[Path], np.ndarray, "np.ndarray | None", list[str]]
log = logging.getLogger("cdmix")


def load_folder(settings: SourceSettings) -> RawData:
    left_out: list[tuple[str, str]] = []
    return _through_store(scan_folder(settings.data_path, left_out), settings, left_out)


def load_csv(settings: SourceSettings) -> RawData:
    return _through_store(scan_csv(settings.data_path), settings)


def _through_store(listing: Listing, settings: SourceSettings, excluded: list[tuple[str, str]] = ()) -> RawData:
    """Decode through an image store in the cache folder (built on first use, reused after; a changed
    file list is another store) and return views of it: nothing is read into memory here."""
    root, paths, labels, is_test, class_names = listing
    size = image_size(settings.image_size)
    samples = image_file_samples(paths, root, labels, is_test)
    folder, verify = cache_folder(settings.cache_dir, root)
    store = build_store(folder / f"store_{size}px_{samples.files_hash()[:20]}", samples, class_names, size,
                        file_decoder(paths, size, default_workers()), source=str(root), progress=settings.progress,
                        excluded=excluded, cache=True, verify=verify)
    return store_raw_data(store, labels, is_test, class_names, settings.seed)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def storable(name: str) -> bool:
    """Whether a file name can be written to a store's UTF-8 lists (not a name of undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A file name as text, its undecodable bytes written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _class_files(folder: Path, left_out: list[tuple[str, str]], root: Path) -> list[Path]:
    """The images under one class folder, sorted; names that cannot be stored go to ``left_out``."""
    files = []
    for p in folder.rglob("*"):
        if not is_image(p) or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if storable(str(p)):
            files.append(p)
        else:
            left_out.append((shown(p.relative_to(root).as_posix()), "file name is not valid UTF-8; rename it"))
    return sorted(files, key=lambda p: str(p.relative_to(folder)))


def _warn_outside(root: Path, paths: list[Path], folders: list[Path]) -> None:
    """Warn about class folders and images that are links to places outside ``root``."""
    real_root = root.resolve()
    # rglob does not descend into linked sub-folders, so an image leaves root only through a link
    # to itself, its class folder, or train/ and test/.
    outside = [p for p in folders + paths if p.is_symlink() and not p.resolve().is_relative_to(real_root)]
    if outside:
        log.warning(f"{len(outside)} class folder(s) or image(s) under {root} are links to places outside it "
                    f"(e.g. {outside[0]} -> {outside[0].resolve()}); they are read as if they were in it")


def _scan_classes(root: Path, class_names: list[str], left_out: list[tuple[str, str]],
                  data_root: Path) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = _class_files(folder, left_out, data_root)
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, labels


def _nonempty_classes(train_root: Path) -> list[str]:
    """The class folders of ``train_root`` that hold an image; empty ones are skipped with a warning."""
    folders = _class_dirs(train_root)
    empty = [d.name for d in folders if not any(is_image(p) for p in d.rglob("*"))]
    if empty and len(empty) < len(folders):  # none with images: the caller's error says so, alone
        log.warning(f"{len(empty)} class folder(s) of {train_root} hold no images and are not classes: "
                    f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    return [d.name for d in folders if d.name not in empty]


def scan_folder(data_path: str, left_out: list[tuple[str, str]] | None = None) -> Listing:
    """(root, image paths, labels, is_test or None, class names) of a class-per-folder tree.

    Files whose names cannot be stored (not UTF-8) are appended to ``left_out`` as (name, reason).
    """
    left_out = [] if left_out is None else left_out
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; pass --data-path to a folder with one "
                        f"sub-folder per class")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split_dirs else root
    if not _class_dirs(train_root):
        raise UserError(f"no class sub-folders in {train_root}; put each class's images in its own sub-folder")
    class_names = _nonempty_classes(train_root)
    if not class_names:
        raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in the class folders of {train_root}")
    paths, labels = _scan_classes(train_root, class_names, left_out, root)
    is_test = None
    if split_dirs:
        extra = sorted({d.name for d in _class_dirs(root / "test")} - set(class_names))
        if extra:
            raise UserError(f"{root / 'test'} has class folder(s) {', '.join(extra)} missing from "
                            f"{train_root}; use the same class folders in both")
        test_paths, test_labels = _scan_classes(root / "test", class_names, left_out, root)
        if not paths or not test_paths:
            which = train_root if not paths else root / "test"
            raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {which}")
        is_test = np.array([False] * len(paths) + [True] * len(test_paths))
        paths, labels = paths + test_paths, labels + test_labels
    if not paths:
        raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {root}")
    check_class_count(len(class_names), str(train_root))
    _warn_outside(root, paths, [train_root, root / "test"] + [d / c for d in (train_root, root / "test")
                                                               for c in class_names])
    if left_out:
        log.warning(f"{len(left_out)} image(s) under {root} have names that are not valid UTF-8 and are left out "
                    f"(e.g. {left_out[0][0]}); rename them to include them")
    return root, paths, np.asarray(labels, dtype=np.int64), is_test, class_names


def _clean_row(row: dict[Any, Any]) -> dict[str, str]:
    """Lower-cased stripped keys, stripped string values (extra or missing cells become "")."""
    return {str(k).strip().lower(): v.strip() for k, v in row.items() if isinstance(k, str) and isinstance(v, str)}



def scan_csv(data_path: str) -> Listing:
    """(the CSV's folder, image paths, labels, is_test or None, class names) of a path,label[,split] CSV."""
    csv_path = Path(data_path).expanduser()
    if not csv_path.is_file():
        raise UserError(f"CSV file {csv_path} does not exist; pass --data-path to a CSV with columns path,label")
    base = csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            repeated = sorted({f for f in fields if fields.count(f) > 1})
            if repeated:
                raise UserError(f"{csv_path}: column(s) {', '.join(repeated)} appear more than once in the header; "
                                "keep one of each")
            if "path" not in fields or "label" not in fields:
                raise UserError(f"{csv_path} needs a header with columns path,label (optional split); "
                                f"found {','.join(fields) or 'no header'}")
            rows = [(_clean_row(row), reader.line_num) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path} is not a readable UTF-8 CSV file ({exc})") from None
    has_split = "split" in fields
    paths: list[Path] = []
    names: list[str] = []
    splits: list[bool] = []
    seen: dict[str, int] = {}
    for row, line in rows:
        if not any(row.values()):
            continue  # blank line
        # A label cdmix wrote spreadsheet-safe (--clean-csv, the review page: '=x for =x) is read as it was.
        rel, label = row.get("path", ""), restore_cell(row.get("label", ""))
        if not rel:
            raise UserError(f"{csv_path} line {line}: empty path")
        _check_label(csv_path, line, rel, label)
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise UserError(f"{csv_path} line {line}: image {rel} not found (looked at {path})")
        key = os.path.normpath(path)
        if key in seen:
            raise UserError(f"{csv_path} line {line}: image {rel} is listed again (first on line {seen[key]}); "
                            f"list each image once, with one label")
        seen[key] = line
        if has_split:
            split = row.get("split", "").lower()
            if split not in ("train", "test"):
                raise UserError(f"{csv_path} line {line}: split must be train or test, got {split!r}")
            splits.append(split == "test")
        paths.append(path)
        names.append(label)
    if not paths:
        raise UserError(f"{csv_path} lists no images")
    if all(_is_int(n) for n in names):  # integer labels: numeric order, "01" and "1" are one class
        names = [str(int(n)) for n in names]
        class_names = [str(v) for v in sorted({int(n) for n in names})]
    else:
        class_names = sorted(set(names))
    check_class_count(len(class_names), str(csv_path))
    lookup = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([lookup[n] for n in names], dtype=np.int64)
    is_test = None
    if has_split:
        is_test = np.asarray(splits, dtype=bool)
        if is_test.all() or not is_test.any():
            missing = "train" if is_test.all() else "test"
            raise UserError(f"{csv_path} has no {missing} rows in its split column; mark some rows {missing}")
    return base, paths, labels, is_test, class_names


def _check_label(csv_path: Path, line: int, rel: str, label: str) -> None:
    """Refuse an empty label, one that reads as a missing value, or one holding control characters."""
    if not label:
        raise UserError(f"{csv_path} line {line}: empty label for {rel}; give every row a label")
    if label.lower() == "nan":
        raise UserError(f"{csv_path} line {line}: label {label!r} of {rel} reads as a missing value; give every "
                        f"row a label")
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise UserError(f"{csv_path} line {line}: label {label!r} of {rel} holds control characters (NUL?); fix "
                        f"that cell")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

