"""npz source: a numpy archive with ``train_images``, ``train_labels``, ``test_images``, ``test_labels``
(optional ``train_true_labels``, ``class_names``, ``train_ids``). One that would not fit in memory
goes through an image store, streamed from the archive."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from cdmix.data.sources.cache import cache_folder
from cdmix.data.sources.common import SourceSettings, numbered_class_names
from cdmix.data.sources.stored import store_raw_data
from cdmix.data.store import Samples, Store, array_chunks, build_store
from cdmix.data.types import RawData, channel_stats
from cdmix.errors import UserError

REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")
OPTIONAL = ("train_true_labels", "class_names", "train_ids")


def _available_memory() -> int:
    # Looked up on the package at call time, so that a caller (or a test) can pretend to have less.
    from cdmix.data import sources

    return sources.available_memory()


def _npz_images(arr: np.ndarray, key: str, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        hint = " (channels first? store N x H x W x C)" if arr.ndim == 4 and arr.shape[1] in (1, 3) else ""
        raise UserError(f"{path}: {key} has shape {arr.shape}; expected N x H x W or N x H x W x C "
                        f"with C = 1 or 3{hint}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise UserError(f"{path}: {key} must be uint8 pixel values 0..255, got {arr.dtype}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _npz_labels(arr: np.ndarray, key: str, path: Path, n: int) -> np.ndarray:
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: {key} must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    if len(arr) != n:
        raise UserError(f"{path}: {key} has {len(arr)} labels but there are {n} images")
    if len(arr) and arr.min() < 0:
        raise UserError(f"{path}: {key} holds negative labels; use class ids 0..C-1")
    return arr.astype(np.int64)


def load_npz(settings: SourceSettings) -> RawData:
    path = Path(settings.data_path).expanduser()
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist; pass --data-path to a .npz with train_images, "
                        f"train_labels, test_images, test_labels")
    headers = npz_headers(path)
    image_bytes = sum(int(np.prod(headers[k][0])) for k in ("train_images", "test_images") if k in headers)
    if image_bytes > 0.5 * _available_memory():  # would not fit in memory: the images go through a store
        return _load_large_npz(path, headers, settings.cache_dir, settings.progress)
    arrays = _read_arrays(path)
    train_images = _npz_images(arrays["train_images"], "train_images", path)
    test_images = _npz_images(arrays["test_images"], "test_images", path)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UserError(f"{path}: train images {train_images.shape[1:]} and test images "
                        f"{test_images.shape[1:]} differ in size or channels")
    train_labels = _npz_labels(arrays["train_labels"], "train_labels", path, len(train_images))
    test_labels = _npz_labels(arrays["test_labels"], "test_labels", path, len(test_images))
    true_labels = None
    if "train_true_labels" in arrays:
        true_labels = _npz_labels(arrays["train_true_labels"], "train_true_labels", path, len(train_images))
    class_names = _class_names(path, arrays.get("class_names"), (train_labels, test_labels, true_labels))
    if len(train_images) == 0 or len(test_images) == 0:
        raise UserError(f"{path}: train and test sets must both hold images")
    mean, std = channel_stats(train_images)
    train_ids = None
    if "train_ids" in arrays:  # the user's names of the training images (label_issues.csv's id column)
        train_ids = [str(v) for v in np.asarray(arrays["train_ids"]).reshape(-1)]
        if len(train_ids) != len(train_images):
            raise UserError(f"{path}: train_ids has {len(train_ids)} entries for {len(train_images)} images")
    return RawData(train_images=train_images, train_labels=train_labels, test_images=test_images,
                   test_labels=test_labels, class_names=class_names, mean=mean, std=std,
                   train_true_labels=true_labels, train_ids=train_ids)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The required and optional arrays of the archive, read into memory."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in REQUIRED if k not in npz.files]
            if missing:
                raise UserError(f"{path} lacks key(s) {', '.join(missing)}; it needs "
                                f"{', '.join(REQUIRED)} (optional train_true_labels, class_names)")
            return {k: npz[k] for k in npz.files if k in REQUIRED + OPTIONAL}
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(f"{path} could not be read ({exc}); store class_names as a string array, "
                        f"not objects") from None
    except (OSError, EOFError, KeyError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None


def _class_names(path: Path, names: np.ndarray | None, label_sets: Sequence[np.ndarray | None]) -> list[str]:
    """``class_names`` of the archive (each label must have one), else "0" .. the largest label."""
    top = max((int(a.max()) for a in label_sets if a is not None and a.size), default=0)
    if names is None:
        return numbered_class_names(top, sum(len(a) for a in label_sets if a is not None), str(path))
    class_names = [str(v) for v in np.asarray(names).reshape(-1)]
    if top >= len(class_names):
        raise UserError(f"{path}: label {top} but only {len(class_names)} class_names")
    return class_names


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the ``.npy`` member ``fh``, which is left at its data."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    return tuple(shape), fortran, dtype


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the arrays in an .npz, read from the headers alone (no data)."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".npy"):
                    with archive.open(name) as fh:
                        shape, _, dtype = _npy_header(fh)
                    headers[name[:-4]] = (shape, dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None
    return headers


def _npz_blocks(path: Path, keys: Sequence[str], block_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """The rows of the uint8 image arrays ``keys`` of an .npz, in order, as N x H x W x C blocks,
    streamed from the archive (never the whole array in memory)."""
    with zipfile.ZipFile(path) as archive:
        for key in keys:
            with archive.open(f"{key}.npy") as fh:
                shape, _, _ = _npy_header(fh)
                row_shape = tuple(shape[1:]) + ((1,) if len(shape) == 3 else ())
                row_bytes = int(np.prod(row_shape))
                step = max(1, block_bytes // max(row_bytes, 1))
                for start in range(0, shape[0], step):
                    k = min(step, shape[0] - start)
                    data = fh.read(k * row_bytes)
                    if len(data) != k * row_bytes:
                        raise UserError(f"{path}: {key} is truncated")
                    yield np.frombuffer(data, dtype=np.uint8).reshape((k,) + row_shape)


def npz_store(path: Path, headers: dict, out: Path, size: int | None, progress: bool, chunk_size: int = 64,
               after_commit=None, cache: bool = False, verify: bool = False) -> Store:
    """The store of an .npz's train and test images (ids ``train/i``, ``test/i``), labels from it."""
    for key in ("train_images", "test_images", "train_labels", "test_labels"):
        if key not in headers:
            raise UserError(f"{path} lacks {key}; it needs train_images, train_labels, test_images, test_labels")
    shapes = [headers[k][0] for k in ("train_images", "test_images")]
    for key, (shape, dtype) in (("train_images", headers["train_images"]), ("test_images", headers["test_images"])):
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise UserError(f"{path}: {key} is {dtype} of shape {shape}; a store needs uint8 N x H x W (x C, "
                            f"C = 1 or 3)")
    channels = shapes[0][3] if len(shapes[0]) == 4 else 1
    with np.load(path, allow_pickle=False) as npz:
        train_labels = _npz_labels(npz["train_labels"], "train_labels", path, shapes[0][0])
        test_labels = _npz_labels(npz["test_labels"], "test_labels", path, shapes[1][0])
        names = npz["class_names"] if "class_names" in npz.files else None
    labels = np.concatenate([train_labels, test_labels])
    class_names = _class_names(path, names, (labels,))
    size = size or min(shapes[0][1:3])
    n_train, n_test = shapes[0][0], shapes[1][0]
    st = path.stat()
    samples = Samples([f"train/{i}" for i in range(n_train)] + [f"test/{i}" for i in range(n_test)], labels,
                      ["train"] * n_train + ["test"] * n_test, [st.st_size] * len(labels),
                      [max(st.st_mtime_ns, st.st_ctime_ns)] * len(labels))

    def produce(chunks):
        return array_chunks(lambda: _npz_blocks(path, ["train_images", "test_images"]), size, chunks)

    return build_store(out, samples, class_names, size, produce, channels=channels, source=str(path),
                       progress=progress, chunk_size=chunk_size, after_commit=after_commit, cache=cache,
                       verify=verify)


def _load_large_npz(path: Path, headers: dict, cache_dir: str | None, progress: bool) -> RawData:
    folder, verify = cache_folder(cache_dir, path.parent)
    st = path.stat()
    key = hashlib.sha256(f"{path.name}|{st.st_size}|{max(st.st_mtime_ns, st.st_ctime_ns)}".encode()).hexdigest()[:20]
    store = npz_store(path, headers, folder / f"store_npz_{key}", None, progress, cache=True, verify=verify)
    is_test = np.asarray([s == "test" for s in store.samples.splits])
    raw = store_raw_data(store, store.samples.labels, is_test, store.class_names, seed=0)
    if "train_true_labels" in headers:
        with np.load(path, allow_pickle=False) as npz:
            raw.train_true_labels = _npz_labels(npz["train_true_labels"], "train_true_labels", path,
                                                len(raw.train_labels))
    return raw

