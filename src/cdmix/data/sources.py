"""Data sources: every supported dataset loaded into one :class:`RawData`.

``load_source`` dispatches on the dataset name:

- ``digits``: scikit-learn's bundled 8x8 digits (no download), a seeded stratified 25% test split.
- ``cifar10`` / ``cifar100``: the official "python version" pickle folders, optionally downloaded
  (only with ``download=True``) and md5-checked.
- ``cifar10n`` / ``cifar100n``: CIFAR images with the CIFAR-N human labels (``*_human.pt``).
- ``folder``: one sub-folder per class (optionally under ``train/`` and ``test/``).
- ``csv``: a ``path,label[,split]`` file, paths relative to the CSV's folder.
- ``npz``: a numpy archive with ``train_images``, ``train_labels``, ``test_images``, ``test_labels``.
- ``clothing1m``, ``webvision``, ``food101n``, ``animal10n``: the real-world noisy benchmarks in their
  official layouts (read by ``cdmix.data.realworld``), with Clothing1M's clean validation set and
  WebVision's ILSVRC2012 test set.

``folder`` / ``csv`` / real-world images are decoded once into an image store (``cdmix.data.store``) in
``<data>/.cdmix_cache/`` and read from it by index; ``store`` opens a store made by ``cdmix prepare``
(:func:`prepare_store`); a large ``npz`` goes through a store too.
Every mistake a user can make raises :class:`cdmix.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdmix.config import DATASETS
from cdmix.data.store import (SKIPPED, Samples, Store, array_chunks, available_memory, build_store,
                              decoded_file_chunks, default_workers, file_samples, open_store)
from cdmix.data.types import RawData, channel_stats
from cdmix.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_IMAGE_SIZE = 32
CACHE_DIR_NAME = ".cdmix_cache"
log = logging.getLogger("cdmix")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.507, 0.487, 0.441)
CIFAR100_STD = (0.267, 0.256, 0.276)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Official archives (cs.toronto.edu/~kriz/cifar.html) and the CIFAR-N label files.
CIFAR_ARCHIVES = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "size": "163 MB",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "size": "161 MB",
    },
}
CIFARN_FILES = {
    "cifar10n": {
        "file": "CIFAR-10_human.pt",
        "url": "https://raw.githubusercontent.com/UCSC-REAL/cifar-10-100n/main/data/CIFAR-10_human.pt",
        "md5": "96644db5574813cae939af5f7f2a0aec",
    },
    "cifar100n": {
        "file": "CIFAR-100_human.pt",
        "url": "https://raw.githubusercontent.com/UCSC-REAL/cifar-10-100n/main/data/CIFAR-100_human.pt",
        "md5": None,  # not pinned: no independently published checksum
    },
}
# --labels name -> key in the CIFAR-N file; the first entry is the default.
CIFARN_LABEL_SETS = {
    "cifar10n": {
        "worst": "worse_label",
        "aggre": "aggre_label",
        "random1": "random_label1",
        "random2": "random_label2",
        "random3": "random_label3",
    },
    "cifar100n": {"noisy": "noisy_label"},
}



def load_source(
    dataset: str,
    data_path: str,
    *,
    labels: str | None = None,
    label_file: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
    extra_data_path: str | None = None,
    clean_train: bool = False,
) -> RawData:
    """Load ``dataset`` from ``data_path`` into a :class:`RawData` (``name == dataset``).

    ``labels`` / ``label_file`` apply to CIFAR-N, ``download`` to CIFAR and CIFAR-N,
    ``image_size`` and ``cache_dir`` to ``folder`` / ``csv`` and the real-world sources (whose default
    size is ``REALWORLD_IMAGE_SIZES``); ``extra_data_path`` (WebVision's ImageNet, Food-101N's Food-101
    folder) and ``clean_train`` (Clothing1M) to those; ``seed`` fixes the test split of sources that
    have none (digits, folder and csv without one).
    """
    if dataset == "digits":
        raw = _load_digits(seed)
    elif dataset in ("cifar10", "cifar100"):
        raw = _load_cifar(dataset, data_path, download=download, progress=progress)
    elif dataset in ("cifar10n", "cifar100n"):
        raw = _load_cifar_n(dataset, data_path, labels=labels, label_file=label_file, download=download,
                            progress=progress)
    elif dataset == "folder":
        raw = _load_folder(data_path, image_size=image_size, seed=seed, cache_dir=cache_dir, progress=progress)
    elif dataset == "csv":
        raw = _load_csv(data_path, image_size=image_size, seed=seed, cache_dir=cache_dir, progress=progress)
    elif dataset == "npz":
        raw = _load_npz(data_path, cache_dir=cache_dir, progress=progress)
    elif dataset == "store":
        raw = _load_store(data_path, image_size=image_size, seed=seed)
    elif dataset in REALWORLD_IMAGE_SIZES:
        raw = load_realworld(dataset, data_path, image_size=image_size, cache_dir=cache_dir, progress=progress,
                             extra_data_path=extra_data_path, clean_train=clean_train)
    elif dataset == "arrays":  # the arrays of a run started from arrays, kept in its folder
        from cdmix.data.arrays import load_arrays

        raw = load_arrays(data_path)
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    raw.name = dataset
    return raw


# ----------------------------------------------------------------------------------------- digits


def _load_digits(seed: int) -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    targets = bunch.target.astype(np.int64)
    train_idx, test_idx = split_indices(targets, test_fraction=0.25, seed=seed)
    train_images = images[train_idx]
    mean, std = channel_stats(train_images)
    return RawData(
        train_images=train_images,
        train_labels=targets[train_idx],
        test_images=images[test_idx],
        test_labels=targets[test_idx],
        class_names=[str(c) for c in range(10)],
        mean=mean,
        std=std,
        train_true_labels=None,
    )


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split of ``range(len(labels))`` (sorted index arrays).

    The test part has ``ceil(test_fraction * n)`` samples (as scikit-learn counts), at least one, and
    at least one sample stays for training; falls back to a plain random split when some class
    is too small to stratify.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if n < 2:
        raise UserError(f"need at least 2 images to make a train/test split, found {n}")
    n_test = min(max(1, math.ceil(round(test_fraction * n, 6))), n - 1)  # sklearn's ceil, minus float fuzz
    index = np.arange(n)
    try:
        train_idx, test_idx = train_test_split(index, test_size=n_test, stratify=labels, random_state=seed)
    except ValueError:  # a class with a single member, or fewer test slots than classes
        train_idx, test_idx = train_test_split(index, test_size=n_test, random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


# ------------------------------------------------------------------------------------------ CIFAR


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds what the official CIFAR pickles hold (numpy arrays, builtins)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module == "numpy.core.multiarray":  # Python-2 era files; avoid numpy 2's deprecated alias
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys (the files hold ``bytes`` keys)."""
    try:
        with path.open("rb") as fh:
            obj = _CifarUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; delete {path.parent} and run again with --download") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, ImportError) as exc:
        raise UserError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                        f"delete {path.parent} and run again with --download") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR pickle (holds {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 32 x 32 x 3 uint8) and labels (int64) of one CIFAR pickle."""
    batch = _read_pickle(path)
    if "data" not in batch or label_key not in batch:
        missing = [k for k in ("data", label_key) if k not in batch]
        raise UserError(f"{path} lacks key(s) {', '.join(missing)}; it is not an official CIFAR file "
                        f"(delete {path.parent} and run again with --download)")
    data = batch["data"]
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{path}: labels are not integers; the file is damaged") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise UserError(f"{path}: data has shape {shape}, expected N x 3072 uint8; the file is damaged "
                        f"(delete {path.parent} and run again with --download)")
    if len(labels) != len(data):
        raise UserError(f"{path}: {len(labels)} labels for {len(data)} images; the file is damaged "
                        f"(delete {path.parent} and run again with --download)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _decode_names(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_folder(dataset: str, data_path: str, download: bool, progress: bool) -> Path:
    """The folder holding the pickles, downloading the archive when allowed."""
    spec = CIFAR_ARCHIVES[dataset]
    root = Path(data_path).expanduser()
    marker = "data_batch_1" if dataset == "cifar10" else "train"
    if root.name == spec["folder"] and (root / marker).is_file():  # data_path is the folder itself
        return root
    folder = root / spec["folder"]
    if folder.is_dir():
        return folder
    if not download:
        raise UserError(f"{dataset} not found: no folder {folder}; pass --download to fetch it "
                        f"({spec['size']}) or --data-path to the folder that holds {spec['folder']}")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec["url"].rsplit("/", 1)[1]
    if not archive.is_file():
        download_file(spec["url"], archive, md5=spec["md5"], progress=progress)
    else:
        verify_md5(archive, spec["md5"])
    extract_tar(archive, root)
    archive.unlink()
    if not folder.is_dir():
        raise UserError(f"{archive.name} did not contain {spec['folder']}; delete it and retry")
    return folder


def _read_cifar(dataset: str, data_path: str, download: bool, progress: bool) -> dict[str, Any]:
    folder = _cifar_folder(dataset, data_path, download, progress)
    if dataset == "cifar10":
        parts = [_batch_arrays(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
        train_images = np.concatenate([p[0] for p in parts])
        train_labels = np.concatenate([p[1] for p in parts])
        test_images, test_labels = _batch_arrays(folder / "test_batch", "labels")
        meta_path, names_key, default_names = folder / "batches.meta", "label_names", list(CIFAR10_NAMES)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        train_images, train_labels = _batch_arrays(folder / "train", "fine_labels")
        test_images, test_labels = _batch_arrays(folder / "test", "fine_labels")
        meta_path, names_key, default_names = folder / "meta", "fine_label_names", [str(i) for i in range(100)]
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    names = default_names
    if meta_path.is_file():
        meta = _read_pickle(meta_path)
        if names_key not in meta:
            raise UserError(f"{meta_path} lacks key {names_key}; the file is damaged "
                            f"(delete {folder} and run again with --download)")
        names = _decode_names(meta[names_key])
    for split, labels in (("training", train_labels), ("test", test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise UserError(f"{folder}: {split} labels outside 0..{len(names) - 1}; the files are damaged")
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                test_labels=test_labels, class_names=names, mean=mean, std=std)


def _load_cifar(dataset: str, data_path: str, download: bool, progress: bool) -> RawData:
    return RawData(**_read_cifar(dataset, data_path, download, progress), train_true_labels=None)


def _label_array(value: Any, path: Path, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise UserError(f"{path}: {key} is not a flat array of integer labels")
    return arr.astype(np.int64)


def _load_label_file(path: Path) -> Any:
    """A CIFAR-N label file (``torch.save`` of a dict of numpy arrays), read with ``weights_only=True``
    and only numpy's array reconstruction allowed: a planted file cannot run code."""
    import torch

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               *(type(np.dtype(kind)) for kind in kinds)]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_cifar_n(dataset: str, data_path: str, labels: str | None, label_file: str | None, download: bool,
                  progress: bool) -> RawData:
    import torch

    choices = CIFARN_LABEL_SETS[dataset]
    name = labels if labels is not None else next(iter(choices))
    if name not in choices:
        raise UserError(f"unknown {dataset} label set {name!r}; choose one of {', '.join(choices)}")
    base = "cifar10" if dataset == "cifar10n" else "cifar100"
    data = _read_cifar(base, data_path, download, progress)

    spec = CIFARN_FILES[dataset]
    path = Path(label_file).expanduser() if label_file else Path(data_path).expanduser() / spec["file"]
    if not path.is_file():
        if not download:
            raise UserError(f"{dataset} label file {path} not found; pass --download to fetch it "
                            f"or --label-file to point at {spec['file']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        download_file(spec["url"], path, md5=spec["md5"], progress=progress)
    try:
        content = _load_label_file(path)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than label arrays, so it was not loaded (loading it could "
                        f"run code); is it the {spec['file']} of CIFAR-N?") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"{path} could not be read ({type(exc).__name__}); "
                        f"delete it and run again with --download") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a CIFAR-N label file (holds {type(content).__name__}, not a dict)")
    key = choices[name]
    for needed in (key, "clean_label"):
        if needed not in content:
            raise UserError(f"{path} has no {needed!r} (keys: {', '.join(map(str, content))}); "
                            f"is it the {spec['file']} of CIFAR-N?")
    noisy = _label_array(content[key], path, key)
    clean = _label_array(content["clean_label"], path, "clean_label")
    n_images = len(data["train_labels"])
    for arr in (noisy, clean):
        if len(arr) != n_images:
            raise UserError(f"label file {path} has {len(arr)} labels but dataset has {n_images} images; "
                            f"use the {spec['file']} that matches these CIFAR files")
    num_classes = len(data["class_names"])
    if len(noisy) and (min(noisy.min(), clean.min()) < 0 or max(noisy.max(), clean.max()) >= num_classes):
        raise UserError(f"{path}: labels outside 0..{num_classes - 1}; is it the file for {dataset}?")
    data["train_labels"] = noisy
    return RawData(**data, train_true_labels=clean)


# -------------------------------------------------------------------------------------- downloads


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


# ---------------------------------------------------------------------------- folder / csv images


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _image_size(image_size: int | None) -> int:
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise UserError(f"image size must be a positive number of pixels, got {image_size}")
    return size


def _assemble(
    paths: list[Path],
    labels: np.ndarray,
    is_test: np.ndarray | None,
    class_names: list[str],
    *,
    image_size: int | None,
    seed: int,
    cache_dir: Path,
    progress: bool,
    root: Path,
) -> RawData:
    """Decode through an image store in ``cache_dir`` (built on first use, reused after; a changed
    file list is another store) and return views of it: nothing is read into memory here."""
    size = _image_size(image_size)
    samples = _file_samples(paths, root, labels, is_test)
    out = _writable(cache_dir) / f"store_{size}px_{samples.files_hash()[:20]}"
    store = build_store(out, samples, class_names, size, _file_decoder(paths, size, default_workers()),
                        source=str(root), progress=progress)
    return store_raw_data(store, labels, is_test, class_names, seed)


def _file_samples(paths: Sequence[Path], root: Path, labels: np.ndarray, is_test: np.ndarray | None) -> Samples:
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]
    splits = [""] * len(paths) if is_test is None else ["test" if t else "train" for t in is_test]
    return file_samples(paths, names, labels, splits)


def _file_decoder(paths: Sequence[Path], size: int, workers: int):
    files = [str(p) for p in paths]
    return lambda chunks: decoded_file_chunks(files, size, chunks, workers)


def _writable(cache_dir: Path) -> Path:
    """``cache_dir``, or a temporary folder when the data folder is read-only."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if os.access(cache_dir, os.W_OK):
            return cache_dir
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "cdmix_cache"
    fallback.mkdir(parents=True, exist_ok=True)
    log.info(f"{cache_dir} cannot be written; the decoded images go to {fallback}")
    return fallback


def store_raw_data(store: Store, labels: np.ndarray, is_test: np.ndarray | None, class_names: list[str],
                   seed: int) -> RawData:
    """``RawData`` whose images are views of ``store`` (skipped images left out, with a warning).

    ``is_test`` marks the test rows; ``None``: a seeded stratified 10% test split of the decoded rows.
    """
    valid = np.flatnonzero(store.decoded)
    skipped = len(store) - len(valid)
    if skipped:
        log.warning(f"{skipped} of {len(store)} images could not be decoded and are left out "
                    f"(listed in {store.path / SKIPPED})")
    if is_test is None:
        train_pos, test_pos = split_indices(labels[valid], test_fraction=0.1, seed=seed)
        train_rows, test_rows = valid[train_pos], valid[test_pos]
    else:
        train_rows, test_rows = valid[~is_test[valid]], valid[is_test[valid]]
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise UserError(f"{store.path}: no decodable {'training' if len(train_rows) == 0 else 'test'} images left")
    mean, std = store.mean_std(train_rows)
    return RawData(train_images=store.view(train_rows), train_labels=labels[train_rows],
                   test_images=store.view(test_rows), test_labels=labels[test_rows], class_names=list(class_names),
                   mean=mean, std=std, train_true_labels=None,
                   train_ids=[store.samples.names[r] for r in train_rows])


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _scan_classes(root: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted((p for p in folder.rglob("*") if _is_image(p)
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                       key=lambda p: str(p.relative_to(folder)))
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, labels


def _load_folder(data_path: str, image_size: int | None, seed: int, cache_dir: str | None,
                 progress: bool) -> RawData:
    root, paths, labels, is_test, class_names = _scan_folder(data_path)
    cache = Path(cache_dir).expanduser() if cache_dir else root / CACHE_DIR_NAME
    return _assemble(paths, labels, is_test, class_names, image_size=image_size, seed=seed, cache_dir=cache,
                     progress=progress, root=root)


def _scan_folder(data_path: str) -> tuple[Path, list[Path], np.ndarray, np.ndarray | None, list[str]]:
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


def _load_csv(data_path: str, image_size: int | None, seed: int, cache_dir: str | None,
              progress: bool) -> RawData:
    base, paths, labels, is_test, class_names = _scan_csv(data_path)
    cache = Path(cache_dir).expanduser() if cache_dir else base / CACHE_DIR_NAME
    return _assemble(paths, labels, is_test, class_names, image_size=image_size, seed=seed, cache_dir=cache,
                     progress=progress, root=base)


def _scan_csv(data_path: str) -> tuple[Path, list[Path], np.ndarray, np.ndarray | None, list[str]]:
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


# -------------------------------------------------------------------------------------------- npz


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


def _load_npz(data_path: str, cache_dir: str | None = None, progress: bool = True) -> RawData:
    path = Path(data_path).expanduser()
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist; pass --data-path to a .npz with train_images, "
                        f"train_labels, test_images, test_labels")
    headers = npz_headers(path)
    image_bytes = sum(int(np.prod(headers[k][0])) for k in ("train_images", "test_images") if k in headers)
    if image_bytes > 0.5 * available_memory():  # would not fit in memory: the images go through a store
        return _load_large_npz(path, headers, cache_dir, progress)
    required = ("train_images", "train_labels", "test_images", "test_labels")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise UserError(f"{path} lacks key(s) {', '.join(missing)}; it needs "
                                f"{', '.join(required)} (optional train_true_labels, class_names)")
            arrays = {k: npz[k] for k in npz.files if k in required + ("train_true_labels", "class_names",
                                                                         "train_ids")}
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(f"{path} could not be read ({exc}); store class_names as a string array, "
                        f"not objects") from None
    except (OSError, EOFError, KeyError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None
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
    top = max((int(a.max()) for a in (train_labels, test_labels, true_labels) if a is not None and a.size),
              default=0)
    if "class_names" in arrays:
        class_names = [str(v) for v in np.asarray(arrays["class_names"]).reshape(-1)]
        if top >= len(class_names):
            raise UserError(f"{path}: label {top} but only {len(class_names)} class_names")
    else:
        class_names = [str(i) for i in range(top + 1)]
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


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the arrays in an .npz, read from the headers alone (no data)."""
    fmt = np.lib.format
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".npy"):
                    with archive.open(name) as fh:
                        version = fmt.read_magic(fh)
                        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                        shape, _, dtype = read(fh)
                    headers[name[:-4]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None
    return headers


def _npz_blocks(path: Path, keys: Sequence[str], block_bytes: int = 64 << 20):
    """The rows of the uint8 image arrays ``keys`` of an .npz, in order, as N x H x W x C blocks,
    streamed from the archive (never the whole array in memory)."""
    fmt = np.lib.format
    with zipfile.ZipFile(path) as archive:
        for key in keys:
            with archive.open(f"{key}.npy") as fh:
                version = fmt.read_magic(fh)
                shape, fortran, _ = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
                row_shape = tuple(shape[1:]) + ((1,) if len(shape) == 3 else ())
                row_bytes = int(np.prod(row_shape))
                step = max(1, block_bytes // max(row_bytes, 1))
                for start in range(0, shape[0], step):
                    k = min(step, shape[0] - start)
                    data = fh.read(k * row_bytes)
                    if len(data) != k * row_bytes:
                        raise UserError(f"{path}: {key} is truncated")
                    yield np.frombuffer(data, dtype=np.uint8).reshape((k,) + row_shape)


def _npz_store(path: Path, headers: dict, out: Path, size: int | None, progress: bool, chunk_size: int = 64,
               after_commit=None) -> Store:
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
        names = [str(v) for v in npz["class_names"].reshape(-1)] if "class_names" in npz.files else None
    labels = np.concatenate([train_labels, test_labels])
    class_names = names or [str(i) for i in range(int(labels.max(initial=0)) + 1)]
    size = size or min(shapes[0][1:3])
    n_train, n_test = shapes[0][0], shapes[1][0]
    st = path.stat()
    samples = Samples([f"train/{i}" for i in range(n_train)] + [f"test/{i}" for i in range(n_test)], labels,
                      ["train"] * n_train + ["test"] * n_test, [st.st_size] * len(labels),
                      [max(st.st_mtime_ns, st.st_ctime_ns)] * len(labels))

    def produce(chunks):
        return array_chunks(lambda: _npz_blocks(path, ["train_images", "test_images"]), size, chunks)

    return build_store(out, samples, class_names, size, produce, channels=channels, source=str(path),
                       progress=progress, chunk_size=chunk_size, after_commit=after_commit)


def _load_large_npz(path: Path, headers: dict, cache_dir: str | None, progress: bool) -> RawData:
    cache = _writable(Path(cache_dir).expanduser() if cache_dir else path.parent / CACHE_DIR_NAME)
    st = path.stat()
    key = hashlib.sha256(f"{path.name}|{st.st_size}|{max(st.st_mtime_ns, st.st_ctime_ns)}".encode()).hexdigest()[:20]
    store = _npz_store(path, headers, cache / f"store_npz_{key}", None, progress)
    is_test = np.asarray([s == "test" for s in store.samples.splits])
    raw = store_raw_data(store, store.samples.labels, is_test, store.class_names, seed=0)
    if "train_true_labels" in headers:
        with np.load(path, allow_pickle=False) as npz:
            raw.train_true_labels = _npz_labels(npz["train_true_labels"], "train_true_labels", path,
                                                len(raw.train_labels))
    return raw


# ----------------------------------------------------------------------------------- real-world sets

# Decoded image size (short side, center square) of each real-world source: the official pipelines'
# Resize (DivideMix: 256 for Clothing1M, 320 for WebVision; Jo-SRC: 256), ANIMAL-10N's own 64 px.
REALWORLD_IMAGE_SIZES = {"clothing1m": 256, "webvision": 320, "food101n": 256, "animal10n": 64}
# DivideMix's dataloader_clothing1M.py normalises with these Clothing1M statistics.
CLOTHING1M_MEAN = (0.6959, 0.6537, 0.6371)
CLOTHING1M_STD = (0.3113, 0.3192, 0.3214)


def load_realworld(dataset: str, data_path: str, *, image_size: int | None = None, cache_dir: str | None = None,
                   progress: bool = True, extra_data_path: str | None = None, clean_train: bool = False) -> RawData:
    """A real-world benchmark (``REALWORLD_IMAGE_SIZES``' names) read by its ``cdmix.data.realworld``
    reader, its images decoded into one store (train, test, clean val and extra test rows) in
    ``<data>/.cdmix_cache/`` (or ``cache_dir``), returned as views of it.

    ``val_images`` / ``val_labels``: Clothing1M's clean validation set; ``extra_tests``: WebVision's
    ILSVRC2012 validation images as ``"imagenet"``. Mean / std: Clothing1M's published statistics
    (DivideMix's), else those of the decoded training images. Undecodable images are left out with a
    warning (the store lists them).
    """
    from cdmix.data import realworld

    if dataset == "clothing1m":
        images = realworld.read_clothing1m(data_path, include_clean_train=clean_train)
    elif dataset == "webvision":
        images = realworld.read_webvision(data_path, imagenet_root=extra_data_path)
    elif dataset == "food101n":
        images = realworld.read_food101n(data_path, food101_root=extra_data_path)
    else:
        images = realworld.read_animal10n(data_path)
    root = Path(data_path).expanduser()
    size = _image_size(image_size if image_size is not None else REALWORLD_IMAGE_SIZES[dataset])
    parts = [("train", images.train_paths, images.train_labels), ("test", images.test_paths, images.test_labels)]
    if images.val_paths is not None:
        parts.append(("val", images.val_paths, images.val_labels))
    parts += [(f"test:{name}", paths, labels) for name, (paths, labels) in images.extra_tests.items()]
    paths = [p for _, part_paths, _ in parts for p in part_paths]
    labels = np.concatenate([part_labels for _, _, part_labels in parts])
    splits = [split for split, part_paths, _ in parts for _ in part_paths]
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]
    samples = file_samples(paths, names, labels, splits)
    cache = _writable(Path(cache_dir).expanduser() if cache_dir else root / CACHE_DIR_NAME)
    store = build_store(cache / f"store_{dataset}_{size}px_{samples.files_hash()[:20]}", samples, images.class_names,
                        size, _file_decoder(paths, size, default_workers()), source=str(root), progress=progress)
    decoded = store.decoded
    skipped = int((~decoded).sum())
    if skipped:
        log.warning(f"{skipped} of {len(store)} images could not be decoded and are left out "
                    f"(listed in {store.path / SKIPPED})")
    split_of = np.asarray(splits)

    def rows(split: str) -> np.ndarray:
        found = np.flatnonzero((split_of == split) & decoded)
        if len(found) == 0:
            raise UserError(f"{store.path}: no decodable {split} images left; see {store.path / SKIPPED}")
        return found

    train_rows, test_rows = rows("train"), rows("test")
    mean, std = (CLOTHING1M_MEAN, CLOTHING1M_STD) if dataset == "clothing1m" else store.mean_std(train_rows)
    train_pos = train_rows  # train rows come first in the store, so a row is its position in the train list
    raw = RawData(train_images=store.view(train_rows), train_labels=labels[train_rows],
                  test_images=store.view(test_rows), test_labels=labels[test_rows],
                  class_names=list(images.class_names), mean=mean, std=std,
                  train_ids=None if images.train_ids is None else [images.train_ids[i] for i in train_pos])
    if images.val_paths is not None:
        val_rows = rows("val")
        raw.val_images, raw.val_labels = store.view(val_rows), labels[val_rows]
    for name in images.extra_tests:
        extra_rows = rows(f"test:{name}")
        raw.extra_tests[name] = (store.view(extra_rows), labels[extra_rows])
    return raw


# ------------------------------------------------------------------------------------- image stores


def _load_store(data_path: str, image_size: int | None, seed: int) -> RawData:
    store = open_store(Path(data_path).expanduser())
    if image_size is not None and int(image_size) != store.size:
        raise UserError(f"the store {store.path} holds {store.size} px images, not {image_size}; drop --image-size "
                        f"or prepare another store with --size {image_size}")
    splits = store.samples.splits
    is_test = np.asarray([s == "test" for s in splits]) if any(splits) else None
    return store_raw_data(store, store.samples.labels, is_test, store.class_names, seed)


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
        return _npz_store(path, npz_headers(path), Path(out), size, progress, chunk_size, after_commit)
    if kind not in ("folder", "csv"):
        raise UserError(f"cannot prepare a store from a {kind!r} source; use folder, csv or npz")
    root, paths, labels, is_test, class_names = _scan_folder(str(path)) if kind == "folder" else _scan_csv(str(path))
    return build_store(out, _file_samples(paths, root, labels, is_test), class_names, size,
                       _file_decoder(paths, size, workers or default_workers()), source=str(path),
                       progress=progress, chunk_size=chunk_size, after_commit=after_commit)
