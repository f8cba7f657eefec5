"""What every loader shares: the one settings object a loader takes, the seeded train/test split
and the image-size rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdmix.data.store import MAX_SIZE
from cdmix.errors import UserError

DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class SourceSettings:
    """Everything a loader may need besides the pixels: a loader reads the fields that apply to it.

    ``labels`` / ``label_file``: CIFAR-N's label set and file; ``download``: CIFAR and CIFAR-N;
    ``image_size`` and ``cache_dir``: sources decoded into an image store (folder, csv, the
    real-world sets; ``None``: their default size); ``extra_data_path``: WebVision's ImageNet,
    Food-101N's Food-101 folder; ``clean_train``: Clothing1M; ``seed``: the test split of sources
    that have none (digits, folder and csv without one, stores, hf); ``hf_image_column`` /
    ``hf_label_column``: the columns of a Hugging Face dataset.
    """

    dataset: str
    data_path: str = ""
    labels: str | None = None
    label_file: str | None = None
    download: bool = False
    image_size: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    progress: bool = True
    extra_data_path: str | None = None
    clean_train: bool = False
    hf_image_column: str = "image"
    hf_label_column: str = "label"

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "SourceSettings":
        """The settings of a run's ``Config`` (``overrides`` replace fields)."""
        fields = dict(dataset=config.dataset, data_path=config.data_path, labels=config.labels,
                      label_file=config.label_file, download=config.download, image_size=config.image_size,
                      seed=config.seed, progress=config.progress, extra_data_path=config.extra_data_path,
                      clean_train=config.clean_train, hf_image_column=config.hf_image_column,
                      hf_label_column=config.hf_label_column)
        return cls(**{**fields, **overrides})


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


def image_size(requested: int | None, default: int = DEFAULT_IMAGE_SIZE) -> int:
    """The decoded image size in pixels: ``requested``, else ``default``."""
    size = default if requested is None else int(requested)
    if not 1 <= size <= MAX_SIZE:
        raise UserError(f"image size must be 1..{MAX_SIZE} pixels, got {requested}")
    return size


def check_class_count(count: int, where: str) -> None:
    """Refuse data with fewer than 2 classes: there is no label noise to find in one class."""
    if count < 2:
        raise UserError(f"{where} holds {count} class{'es' if count != 1 else ''}; label noise needs at least 2 "
                        f"classes (one sub-folder or label per class)")


def numbered_class_names(top: int, n_samples: int, where: str) -> list[str]:
    """Class names "0" .. ``top`` for integer labels without names; refuses a largest label far above
    the sample count (a label of 2**40 would make a name, and a net output, for every number below it)."""
    limit = max(100 * n_samples, 100_000)
    if top >= limit:
        raise UserError(f"{where}: label {top} is far above the {n_samples} samples (at most {limit - 1} here); "
                        f"labels must be class indices 0..C-1, or give class names")
    return [str(i) for i in range(top + 1)]
