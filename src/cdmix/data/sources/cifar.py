"""CIFAR-10 / CIFAR-100: the official "python version" pickle folders, optionally downloaded (only
with ``download=True``) and md5-checked; the pickles are read by an unpickler that builds nothing
but numpy arrays and builtins."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.data.sources.common import SourceSettings
from cdmix.data.sources.download import download_file, extract_tar, verify_md5
from cdmix.data.sources.normalization import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from cdmix.data.types import RawData
from cdmix.errors import UserError

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


def read_cifar(dataset: str, data_path: str, download: bool, progress: bool) -> dict[str, Any]:
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



def load_cifar(settings: SourceSettings) -> RawData:
    return RawData(**read_cifar(settings.dataset, settings.data_path, settings.download, settings.progress),
                   train_true_labels=None)
