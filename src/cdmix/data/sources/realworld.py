"""The real-world noisy benchmarks (Clothing1M, WebVision, Food-101N, ANIMAL-10N) in their official
layouts: read by ``cdmix.data.realworld``'s readers, their images decoded into one store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdmix.data.sources.cache import cache_folder
from cdmix.data.sources.common import SourceSettings, image_size
from cdmix.data.sources.normalization import CLOTHING1M_MEAN, CLOTHING1M_STD
from cdmix.data.sources.stored import file_decoder, raw_from_store
from cdmix.data.store import build_store, default_workers, file_samples
from cdmix.data.types import RawData

# Decoded image size (short side, center square) of each real-world source: the official pipelines'
# Resize (DivideMix: 256 for Clothing1M, 320 for WebVision; Jo-SRC: 256), ANIMAL-10N's own 64 px.
REALWORLD_IMAGE_SIZES = {"clothing1m": 256, "webvision": 320, "food101n": 256, "animal10n": 64}


def load_realworld(dataset: str, data_path: str, *, image_size: int | None = None, cache_dir: str | None = None,
                   progress: bool = True, extra_data_path: str | None = None, clean_train: bool = False) -> RawData:
    """``load_realworld_source`` with the settings as keywords."""
    return load_realworld_source(SourceSettings(dataset, data_path, image_size=image_size, cache_dir=cache_dir,
                                                progress=progress, extra_data_path=extra_data_path,
                                                clean_train=clean_train))


def _read(settings: SourceSettings):
    """The dataset's :class:`cdmix.data.realworld.ImageList` (paths and labels, no pixels)."""
    from cdmix.data import realworld

    if settings.dataset == "clothing1m":
        return realworld.read_clothing1m(settings.data_path, include_clean_train=settings.clean_train)
    if settings.dataset == "webvision":
        return realworld.read_webvision(settings.data_path, imagenet_root=settings.extra_data_path)
    if settings.dataset == "food101n":
        return realworld.read_food101n(settings.data_path, food101_root=settings.extra_data_path)
    return realworld.read_animal10n(settings.data_path)


def load_realworld_source(settings: SourceSettings) -> RawData:
    """A real-world benchmark (``REALWORLD_IMAGE_SIZES``' names) read by its ``cdmix.data.realworld``
    reader, its images decoded into one store (train, test, clean val and extra test rows) in
    ``<data>/.cdmix_cache/`` (or ``cache_dir``), returned as views of it.

    ``val_images`` / ``val_labels``: Clothing1M's clean validation set; ``extra_tests``: WebVision's
    ILSVRC2012 validation images as ``"imagenet"``. Mean / std: Clothing1M's published statistics
    (DivideMix's), else those of the decoded training images. Undecodable images are left out with a
    warning (the store lists them).
    """
    dataset = settings.dataset
    images = _read(settings)
    root = Path(settings.data_path).expanduser()
    size = image_size(settings.image_size, default=REALWORLD_IMAGE_SIZES[dataset])
    parts = [("train", images.train_paths, images.train_labels), ("test", images.test_paths, images.test_labels)]
    if images.val_paths is not None:
        parts.append(("val", images.val_paths, images.val_labels))
    parts += [(f"test:{name}", paths, labels) for name, (paths, labels) in images.extra_tests.items()]
    paths = [p for _, part_paths, _ in parts for p in part_paths]
    labels = np.concatenate([part_labels for _, _, part_labels in parts])
    splits = [split for split, part_paths, _ in parts for _ in part_paths]
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]
    samples = file_samples(paths, names, labels, splits)
    folder, verify = cache_folder(settings.cache_dir, root)
    store = build_store(folder / f"store_{dataset}_{size}px_{samples.files_hash()[:20]}", samples, images.class_names,
                        size, file_decoder(paths, size, default_workers()), source=str(root),
                        progress=settings.progress, cache=True, verify=verify)
    # Train rows come first in the store, so a train row is its position in the reader's train_ids.
    return raw_from_store(store, labels, np.asarray(splits), images.class_names,
                          mean_std=(CLOTHING1M_MEAN, CLOTHING1M_STD) if dataset == "clothing1m" else None,
                          ids=images.train_ids)
