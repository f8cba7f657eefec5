"""Hugging Face ``datasets`` source (``--dataset hf``, the optional ``datasets`` extra): a folder made by
``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or local parquet / imagefolder files (a folder
``datasets.load_dataset`` reads, or one ``.parquet`` file).

- Images: the ``--hf-image-column`` (default ``image``), an ``Image`` feature; labels: the
  ``--hf-label-column`` (default ``label``), class names from its ``ClassLabel`` (an integer column:
  "0" .. the largest label; a text column: its sorted values).
- Splits: ``train`` (or the only split) is trained on; ``test``, else ``validation`` / ``valid`` /
  ``val``, is the test split. Without one (a plain ``Dataset`` too), a seeded stratified 10% of the
  training rows is, as the folder source does without ``test/``. A split whose labels are all missing
  (-1, as in many hubs' test splits) is not a test split.
- ``label_issues.csv``'s ``id``: each row's ``id`` column when the dataset has one, else its row number
  in its split (``ds["train"][i]``), as text.

The images are decoded once into an image store in ``<data>/.cdmix_cache/`` (parquet / imagefolder:
``datasets``' own Arrow cache goes there too) and read from it by index, so the dataset never has to
fit in memory: the encoded bytes are read from the memory-mapped Arrow files a chunk at a time.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import multiprocessing
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.data.sources.cache import cache_folder
from cdmix.data.sources.common import SourceSettings, image_size, numbered_class_names
from cdmix.data.sources.stored import raw_from_store
from cdmix.data.store import Samples, _changed_ns, _decode_chunk, build_store, default_workers
from cdmix.data.types import RawData
from cdmix.errors import UserError

INSTALL_HINT = "--dataset hf needs the datasets package: pip install 'cdmix[datasets]' (or pip install datasets)"
TEST_SPLITS = ("test", "validation", "valid", "val")
log = logging.getLogger("cdmix")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return datasets


@contextmanager
def _quiet(datasets, progress: bool):
    """``datasets``' own progress bars only when cdmix shows its own."""
    was_disabled = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not progress and not was_disabled:
            datasets.enable_progress_bars()


def _open(path: Path, cache: Path, progress: bool) -> dict[str, Any]:
    """{split name: ``datasets.Dataset``} of ``path`` (a plain ``Dataset`` is the split ``train``)."""
    datasets = _datasets()
    try:
        with _quiet(datasets, progress):
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                found = datasets.load_from_disk(str(path))
            elif path.is_file() and path.suffix == ".parquet":
                found = datasets.load_dataset("parquet", data_files={"train": str(path)}, cache_dir=str(cache))
            elif path.is_dir():
                found = datasets.load_dataset(str(path), cache_dir=str(cache))
            else:
                raise UserError(f"{path} is neither a folder nor a .parquet file; pass --data-path to a folder made "
                                f"by save_to_disk, a folder of parquet / image files, or a .parquet file")
    except UserError:
        raise
    except Exception as exc:  # datasets' own errors (no data files, damaged arrow files, ...) as one line
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"datasets cannot read {path} ({type(exc).__name__}: {text[:300]})") from None
    if isinstance(found, datasets.Dataset):
        return {"train": found}
    if not isinstance(found, datasets.DatasetDict):  # an IterableDataset(Dict) or anything else
        raise UserError(f"{path} is a {type(found).__name__}; cdmix reads a Dataset or DatasetDict")
    return dict(found)


def _column(ds, name: str) -> np.ndarray:
    """One column of ``ds`` as a numpy array (read through Arrow; no image is decoded)."""
    table = ds.select_columns([name]).with_format("arrow")[:]
    return np.asarray(table.column(name).to_pylist(), dtype=object)


def _check_columns(path: Path, splits: dict[str, Any], image_column: str, label_column: str) -> None:
    datasets = _datasets()
    for split, ds in splits.items():
        features = ds.features
        for flag, name in (("--hf-image-column", image_column), ("--hf-label-column", label_column)):
            if name not in features:
                raise UserError(f"{path}: split {split} has no column {name!r} (columns: "
                                f"{', '.join(features) or 'none'}); name it with {flag}")
        if not isinstance(features[image_column], datasets.Image):
            raise UserError(f"{path}: column {image_column!r} holds {features[image_column]!r}, not images (an Image "
                            f"feature); name the image column with --hf-image-column")


def _choose_splits(path: Path, splits: dict[str, Any], label_column: str) -> tuple[str, str | None]:
    """(the training split, the test split or None) of ``splits``."""
    if "train" in splits:
        train = "train"
    elif len(splits) == 1:
        train = next(iter(splits))
    else:
        raise UserError(f"{path} has splits {', '.join(splits)} but none named train; name the training split "
                        f"train")
    for name in TEST_SPLITS:
        if name in splits and name != train:
            labels = _column(splits[name], label_column)
            if len(labels) and any(v is not None and v != -1 for v in labels):
                return train, name
            log.info(f"{path}: split {name} has no labels; it is not used as the test split")
    return train, None


def _labels_and_names(path: Path, splits: dict[str, Any], used: list[str], label_column: str
                      ) -> tuple[dict[str, np.ndarray], list[str]]:
    """({split: int64 labels}, class names) of the ``used`` splits."""
    datasets = _datasets()
    feature = splits[used[0]].features[label_column]
    values = {s: _column(splits[s], label_column) for s in used}
    for split, v in values.items():
        missing = int(sum(x is None or (not isinstance(x, str) and x == -1) for x in v))
        if missing:
            raise UserError(f"{path}: {missing} row(s) of split {split} have no label (-1 or empty) in column "
                            f"{label_column!r}; label them or leave them out")
    if isinstance(feature, datasets.ClassLabel):
        names = [str(n) for n in feature.names]
        labels = {s: np.asarray(v, dtype=np.int64) for s, v in values.items()}
        top = max((int(v.max()) for v in labels.values() if v.size), default=0)
        if top >= len(names):
            raise UserError(f"{path}: label {top} in column {label_column!r}, but its ClassLabel names only "
                            f"{len(names)} classes")
        return labels, names
    every = [x for v in values.values() for x in v]
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in every):
        labels = {s: np.asarray(v, dtype=np.int64) for s, v in values.items()}
        if any(int(v.min()) < 0 for v in labels.values() if v.size):
            raise UserError(f"{path}: column {label_column!r} holds negative labels; use class ids 0..C-1")
        top = max((int(v.max()) for v in labels.values() if v.size), default=0)
        return labels, numbered_class_names(top, len(every), str(path))
    if all(isinstance(x, str) for x in every):
        names = sorted(set(every))
        lookup = {n: i for i, n in enumerate(names)}
        return {s: np.asarray([lookup[x] for x in v], dtype=np.int64) for s, v in values.items()}, names
    raise UserError(f"{path}: column {label_column!r} holds {feature!r}; labels must be a ClassLabel, integers or "
                    f"text (name the label column with --hf-label-column)")


def _split_stamp(ds) -> tuple[int, int, str]:
    """(bytes, last change in ns, fingerprint) of the Arrow files behind ``ds``: a changed dataset is
    another store."""
    files = [Path(f["filename"]) for f in ds.cache_files]
    stats = [f.stat() for f in files if f.is_file()]
    return sum(s.st_size for s in stats), max((_changed_ns(s) for s in stats), default=0), str(ds._fingerprint)


def _encoded(ds, column: str, rows: np.ndarray):
    """The encoded images of ``ds``'s ``rows`` (in memory-mapped Arrow): file objects of their bytes,
    or their file paths (an imagefolder's rows refer to the files)."""
    datasets = _datasets()
    raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    out = []
    for value in raw[[int(r) for r in rows]][column]:
        if value is None:
            out.append(io.BytesIO(b""))  # an empty cell: an undecodable row, listed in skipped.txt
        elif value.get("bytes") is not None:
            out.append(io.BytesIO(value["bytes"]))
        else:
            out.append(str(value.get("path") or ""))
    return out


def _decoded_chunks(parts: list[tuple[str, Any, int]], column: str, size: int, chunks: list[np.ndarray],
                    workers: int):
    """``produce`` for ``build_store``: store rows are the ``parts`` (split, dataset, first row) one after
    another; each chunk's encoded images are read here and decoded by ``workers`` spawned processes,
    with a bounded number of chunks in flight (the dataset is never read whole)."""
    starts = np.asarray([first for _, _, first in parts])

    def task(rows: np.ndarray):
        images: list = []
        which = np.searchsorted(starts, rows, side="right") - 1
        for k in np.unique(which):  # rows of one split at a time, in row order
            _, ds, first = parts[k]
            images += _encoded(ds, column, rows[which == k] - first)
        return rows, images, size

    if workers <= 1 or len(chunks) <= 1:
        for rows in chunks:
            yield _decode_chunk(task(rows))
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
        pending: collections.deque = collections.deque()
        for rows in chunks:
            pending.append(pool.apply_async(_decode_chunk, (task(rows),)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def load_hf(settings: SourceSettings) -> RawData:
    """A Hugging Face dataset (see the module docstring) as views of its image store."""
    path = Path(settings.data_path).expanduser()
    root = path.parent if path.is_file() else path
    image_column, label_column = settings.hf_image_column, settings.hf_label_column
    _datasets()  # the install hint before anything else
    if not path.exists():  # before the cache folder is made in it
        raise UserError(f"Hugging Face dataset {path} does not exist; pass --data-path to a folder made by "
                        f"save_to_disk, or to parquet / image files")
    folder, verify = cache_folder(settings.cache_dir, root)
    splits = _open(path, folder / "hf", settings.progress)
    train, test = _choose_splits(path, splits, label_column)
    used = [train] + ([test] if test else [])
    _check_columns(path, {s: splits[s] for s in used}, image_column, label_column)
    labels, class_names = _labels_and_names(path, splits, used, label_column)
    if len(labels[train]) == 0:
        raise UserError(f"{path}: split {train} holds no rows")
    parts, first = [], 0
    for split in used:
        parts.append((split, splits[split], first))
        first += len(labels[split])
    stamps = {s: _split_stamp(splits[s]) for s in used}
    names = [f"{s}/{i}" for s in used for i in range(len(labels[s]))]
    store_splits = [("train" if s == train else "test") if test else "" for s in used for _ in range(len(labels[s]))]
    samples = Samples(names, np.concatenate([labels[s] for s in used]), store_splits,
                      [stamps[s][0] for s in used for _ in range(len(labels[s]))],
                      [stamps[s][1] for s in used for _ in range(len(labels[s]))])
    size = image_size(settings.image_size)
    # The image column and the datasets' fingerprints name the store as well as the files: another image
    # column of the same files is another store.
    key = hashlib.sha256("\n".join([samples.files_hash(), image_column] +
                                   [stamps[s][2] for s in used]).encode()).hexdigest()[:20]
    store = build_store(folder / f"store_hf_{size}px_{key}", samples, class_names, size,
                        lambda chunks: _decoded_chunks(parts, image_column, size, chunks, default_workers()),
                        source=str(path), progress=settings.progress, cache=True, verify=verify)
    if "id" in splits[train].features:
        ids = [str(v) for v in _column(splits[train], "id")]
    else:
        ids = [str(i) for i in range(len(labels[train]))]
    # Train rows come first in the store, so a train row is its position in ids.
    split_of = None if test is None else np.asarray(store_splits)
    return raw_from_store(store, samples.labels, split_of, class_names, seed=settings.seed, ids=ids)
