"""Arrays a user already holds as a data source: ``cdmix.train(images, labels)``,
``cdmix.find_label_issues(images, labels)``.

The arrays become a :class:`RawData` directly (nothing is written). A run that is asked to keep a
folder stores them there as ``arrays.npz`` and names it as its data (``dataset = "arrays"``), so
``cdmix resume``, ``evaluate``, ``issues --html`` and ``report`` work on it like on any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdmix.atomic import atomic_write
from cdmix.data.types import RawData, channel_stats
from cdmix.errors import UserError


def _images(images: Any, what: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        hint = " (channels first? give N x H x W x C)" if arr.ndim == 4 and arr.shape[1] in (1, 3) else ""
        raise UserError(f"{what} must be N x H x W or N x H x W x C with C = 1 or 3, got shape {arr.shape}{hint}")
    if arr.shape[1] != arr.shape[2]:
        raise UserError(f"{what} must be square (H == W), got {arr.shape[1]} x {arr.shape[2]}; crop or resize them")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise UserError(f"{what} must be uint8 pixel values 0..255, got {arr.dtype}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _has_nan(labels: np.ndarray) -> bool:
    if np.issubdtype(labels.dtype, np.floating):
        return bool(np.isnan(labels).any())
    if labels.dtype == object:
        return any(isinstance(v, float) and v != v for v in labels.tolist())
    return False


def _classes(labels: np.ndarray, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels 0..C-1 and class names: ints are kept (names "0".."C-1" unless given), any
    other labels (e.g. strings) become the indices of their sorted distinct values, which name the classes."""
    from cdmix.data.sources.common import numbered_class_names

    if _has_nan(labels):
        raise UserError("labels hold NaN (a missing label?); give every image a label, or leave the image out")
    if np.issubdtype(labels.dtype, np.integer):
        top = int(labels.max()) if labels.size else 0
        if labels.size and labels.min() < 0:
            raise UserError("labels must be class indices 0..C-1 (or class names), found a negative one")
        names = ([str(c) for c in class_names] if class_names is not None
                 else numbered_class_names(top, len(labels), "labels"))
        if top >= len(names):
            raise UserError(f"label {top} but only {len(names)} class_names")
        return labels.astype(np.int64), names
    if class_names is not None:
        lookup = {str(name): i for i, name in enumerate(class_names)}
        unknown = sorted({str(v) for v in labels} - set(lookup))
        if unknown:
            raise UserError(f"labels {', '.join(unknown[:5])} are not in class_names")
        return np.asarray([lookup[str(v)] for v in labels], dtype=np.int64), [str(c) for c in class_names]
    names, inverse = np.unique(labels.astype(str), return_inverse=True)
    return inverse.astype(np.int64), [str(n) for n in names]


def raw_from_arrays(images: Any, labels: Any, *, test_images: Any = None, test_labels: Any = None,
                    class_names: Sequence[str] | None = None, ids: Sequence[Any] | None = None,
                    true_labels: Any = None) -> RawData:
    """A ``RawData`` of the user's arrays.

    images: uint8 N x H x W (x C), square; labels: (N,) class indices 0..C-1, or class names of any
    type; test_images / test_labels: an optional test set (none: test accuracy is not measured);
    class_names: names of the classes (or, with non-integer labels, their order); ids: (N,) names of
    the samples (label_issues.csv's ``id`` column); true_labels: (N,) the right labels where known
    (then selection metrics are measured against them). Raises UserError for arrays that do not fit.
    """
    train_images = _images(images, "images")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(train_images):
        raise UserError(f"labels must be one per image: got shape {labels.shape} for {len(train_images)} images")
    if len(labels) < 2:
        raise UserError("need at least 2 labelled images")
    train_labels, names = _classes(labels, class_names)
    if len(names) < 2:
        raise UserError("the labels name a single class; label noise needs at least 2 classes")
    if test_images is None:
        test = np.zeros((0, *train_images.shape[1:]), dtype=np.uint8)
        test_y = np.zeros(0, dtype=np.int64)
    else:
        test = _images(test_images, "test_images")
        if test.shape[1:] != train_images.shape[1:]:
            raise UserError(f"test_images are {test.shape[1:]}, images are {train_images.shape[1:]}; they must match")
        test_y = np.asarray(test_labels)
        if test_y.ndim != 1 or len(test_y) != len(test):
            raise UserError("test_labels must be one per test image")
        test_y, _ = _classes(test_y, names)
    true = None
    if true_labels is not None:
        true = np.asarray(true_labels)
        if true.shape != train_labels.shape:
            raise UserError("true_labels must be one per image")
        true, _ = _classes(true, names)
    id_list = None
    if ids is not None:
        id_list = [str(v) for v in ids]
        if len(id_list) != len(train_labels):
            raise UserError(f"ids must be one per image: got {len(id_list)} for {len(train_labels)} images")
    mean, std = channel_stats(train_images)
    return RawData(train_images=train_images, train_labels=train_labels, test_images=test, test_labels=test_y,
                   class_names=names, mean=mean, std=std, train_true_labels=true, name="arrays", train_ids=id_list)


def save_arrays(path: str | Path, raw: RawData) -> None:
    """Store ``raw`` as an ``.npz`` that ``load_arrays`` reads back (atomically)."""
    arrays = {"train_images": raw.train_images, "train_labels": raw.train_labels, "test_images": raw.test_images,
              "test_labels": raw.test_labels, "class_names": np.asarray(raw.class_names, dtype=str)}
    if raw.train_true_labels is not None:
        arrays["train_true_labels"] = raw.train_true_labels
    if raw.train_ids is not None:
        arrays["train_ids"] = np.asarray(raw.train_ids, dtype=str)
    atomic_write(Path(path), lambda fh: np.savez(fh, **arrays))


def load_arrays(path: str | Path) -> RawData:
    """The ``RawData`` ``save_arrays`` stored at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; a run started from arrays keeps them in its folder as arrays.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None
    return raw_from_arrays(data["train_images"], data["train_labels"],
                           test_images=data["test_images"] if len(data["test_images"]) else None,
                           test_labels=data["test_labels"] if len(data["test_images"]) else None,
                           class_names=list(data["class_names"]), ids=data.get("train_ids"),
                           true_labels=data.get("train_true_labels"))
