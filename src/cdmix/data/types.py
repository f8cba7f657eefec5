"""The one shape every data source returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawData:
    """Arrays of one dataset, as loaded (before synthetic noise).

    train_images / test_images: uint8, N x H x W x C (C = 1 or 3): numpy arrays, or for sources
    decoded into an image store ``cdmix.data.store.StoreView`` rows, read on demand
    (``np.asarray(view)`` reads them all; ``view[idx]`` is again a view).
    train_labels: int64 (N,), the labels training sees (already noisy for CIFAR-N / user data).
    train_true_labels: int64 (N,) clean labels where known, else None (-1 marks an open-set image,
    whose given label fits no class).
    mean / std: per-channel normalisation in [0, 1] units (length C).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_true_labels: np.ndarray | None = None
    name: str = ""
    # bool (N,): training images replaced by out-of-distribution ones (``--open-set-rate``), else None.
    train_is_ood: np.ndarray | None = None
    # What names each training image in the user's data (label_issues.csv's ``id`` column): the path
    # relative to the data folder (folder, csv), or an id column (csv, npz ``train_ids``); None where
    # the position in the training order (the ``index`` column) is the name (digits, CIFAR, npz).
    train_ids: list[str] | None = None
    # A clean validation set for model selection (Clothing1M's), used instead of a --val-fraction split
    # of the noisy training set; None where the source has none.
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    # Further test sets by name, each (images, int64 labels), evaluated every epoch and reported as
    # test_acc_<name> (WebVision's "imagenet": the ILSVRC2012 validation images of its classes).
    extra_tests: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 N x H x W x C images."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = flat.std(axis=0)
    std[std == 0] = 1.0
    return tuple(float(v) for v in flat.mean(axis=0)), tuple(float(v) for v in std)
