"""scikit-learn's bundled 8x8 digits (no download), with a seeded stratified 25% test split."""

from __future__ import annotations

import numpy as np

from cdmix.data.sources.common import SourceSettings, split_indices
from cdmix.data.types import RawData, channel_stats


def load_digits(settings: SourceSettings) -> RawData:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    targets = bunch.target.astype(np.int64)
    train_idx, test_idx = split_indices(targets, test_fraction=0.25, seed=settings.seed)
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
