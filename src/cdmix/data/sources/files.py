"""Folder and CSV sources: one sub-folder per class (optionally under ``train/`` and ``test/``), or a
``path,label[,split]`` CSV with paths relative to its folder. Their images are decoded once into an
image store in ``<data>/.cdmix_cache/`` and read from it by index."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.data.names import IMAGE_EXTENSIONS
from cdmix.data.sources.cache import cache_folder
from cdmix.data.sources.common import SourceSettings, image_size
from cdmix.data.sources.stored import file_decoder, image_file_samples, store_raw_data
from cdmix.data.store import build_store, default_workers
from cdmix.data.types import RawData
from cdmix.errors import UserError

# What a scan returns: (root, image paths, labels, is_test or None, class names).
Listing = tuple[Path, list[Path], np.ndarray, "np.ndarray | None", list[str]]


def load_folder(settings: SourceSettings) -> RawData:
    return _through_store(scan_folder(settings.data_path), settings)


def load_csv(settings: SourceSettings) -> RawData:
    return _through_store(scan_csv(settings.data_path), settings)


def _through_store(listing: Listing, settings: SourceSettings) -> RawData:
    """Decode through an image store in the cache folder (built on first use, reused after; a changed
    file list is another store) and return views of it: nothing is read into memory here."""
    root, paths, labels, is_test, class_names = listing
    size = image_size(settings.image_size)
    samples = image_file_samples(paths, root, labels, is_test)
    out = cache_folder(settings.cache_dir, root) / f"store_{size}px_{samples.files_hash()[:20]}"
    store = build_store(out, samples, class_names, size, file_decoder(paths, size, default_workers()),
                        source=str(root), progress=settings.progress)
    return store_raw_data(store, labels, is_test, class_names, settings.seed)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _scan_classes(root: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted((p for p in folder.rglob("*") if is_image(p)
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                       key=lambda p: str(p.relative_to(folder)))
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, labels



def scan_folder(data_path: str) -> Listing:
    """(root, image paths, labels, is_test or None, class names) of a class-per-folder tree."""
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; pass --data-path to a folder with one "
                        f"sub-folder per class")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split_dirs else root
    class_names = [d.name for d in _class_dirs(train_root)]
    if not class_names:
        raise UserError(f"no class sub-folders in {train_root}; put each class's images in its own sub-folder")
    paths, labels = _scan_classes(train_root, class_names)
    is_test = None
    if split_dirs:
        extra = sorted({d.name for d in _class_dirs(root / "test")} - set(class_names))
        if extra:
            raise UserError(f"{root / 'test'} has class folder(s) {', '.join(extra)} missing from "
                            f"{train_root}; use the same class folders in both")
        test_paths, test_labels = _scan_classes(root / "test", class_names)
        if not paths or not test_paths:
            which = train_root if not paths else root / "test"
            raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {which}")
        is_test = np.array([False] * len(paths) + [True] * len(test_paths))
        paths, labels = paths + test_paths, labels + test_labels
    if not paths:
        raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {root}")
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
    for row, line in rows:
        if not any(row.values()):
            continue  # blank line
        rel, label = row.get("path", ""), row.get("label", "")
        if not rel:
            raise UserError(f"{csv_path} line {line}: empty path")
        if not label:
            raise UserError(f"{csv_path} line {line}: empty label for {rel}; give every row a label")
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise UserError(f"{csv_path} line {line}: image {rel} not found (looked at {path})")
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
    lookup = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([lookup[n] for n in names], dtype=np.int64)
    is_test = None
    if has_split:
        is_test = np.asarray(splits, dtype=bool)
        if is_test.all() or not is_test.any():
            missing = "train" if is_test.all() else "test"
            raise UserError(f"{csv_path} has no {missing} rows in its split column; mark some rows {missing}")
    return base, paths, labels, is_test, class_names


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

