"""CIFAR-10N / CIFAR-100N: CIFAR images with the CIFAR-N human labels (``*_human.pt``), read with
``weights_only=True`` and only numpy's array reconstruction allowed."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.data.names import CIFARN_LABEL_SETS
from cdmix.data.sources.cifar import read_cifar
from cdmix.data.sources.common import SourceSettings
from cdmix.data.sources.download import download_file
from cdmix.data.types import RawData
from cdmix.errors import UserError

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


def load_cifar_n(settings: SourceSettings) -> RawData:
    """CIFAR images with the noisy labels of the ``settings.labels`` set and the clean labels as
    ``train_true_labels``; the label file is ``settings.label_file`` or ``<data_path>/<file>``."""
    dataset, data_path, labels, label_file = settings.dataset, settings.data_path, settings.labels, settings.label_file
    download, progress = settings.download, settings.progress
    choices = CIFARN_LABEL_SETS[dataset]
    name = labels if labels is not None else next(iter(choices))
    if name not in choices:
        raise UserError(f"unknown {dataset} label set {name!r}; choose one of {', '.join(choices)}")
    base = "cifar10" if dataset == "cifar10n" else "cifar100"
    data = read_cifar(base, data_path, download, progress)

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

