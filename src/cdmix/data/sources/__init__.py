"""Data sources: every supported dataset loaded into one :class:`RawData`.

``load_source`` looks the dataset name up in ``LOADERS``; each loader takes one
:class:`SourceSettings` and returns a :class:`RawData`. One module per kind of source:

- ``digits``: scikit-learn's bundled 8x8 digits (no download), a seeded stratified 25% test split.
- ``cifar``: ``cifar10`` / ``cifar100``, the official "python version" pickle folders, optionally
  downloaded (only with ``download=True``, see ``download``) and md5-checked.
- ``cifar_n``: ``cifar10n`` / ``cifar100n``, CIFAR images with the CIFAR-N human labels (``*_human.pt``).
- ``files``: ``folder`` (one sub-folder per class, optionally under ``train/`` and ``test/``) and
  ``csv`` (a ``path,label[,split]`` file, paths relative to the CSV's folder).
- ``npz``: a numpy archive with ``train_images``, ``train_labels``, ``test_images``, ``test_labels``.
- ``stored``: ``store``, a store made by ``cdmix prepare`` (``prepare``), and the one helper that turns
  a store's rows into views by split, which every store-backed source uses.
- ``realworld``: ``clothing1m``, ``webvision``, ``food101n``, ``animal10n`` in their official layouts
  (read by ``cdmix.data.realworld``), with Clothing1M's clean validation set and WebVision's
  ILSVRC2012 test set.
- ``hf``: a Hugging Face dataset (``save_to_disk`` folder, parquet or imagefolder files) through the
  optional ``datasets`` package; its Image and label columns by name, ids from an ``id`` column.
- ``normalization``: the published mean / std constants; ``cache``: where decoded images are kept.

``folder`` / ``csv`` / ``hf`` / real-world images are decoded once into an image store (``cdmix.data.store``) in
``<data>/.cdmix_cache/`` and read from it by index; a large ``npz`` goes through a store too.
Every mistake a user can make raises :class:`cdmix.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import urllib.error  # noqa: F401  (``sources.urllib.request.urlopen`` is what downloads call)
import urllib.request  # noqa: F401
from collections.abc import Callable

from cdmix.config import DATASETS
from cdmix.data.names import CIFARN_LABEL_SETS, IMAGE_EXTENSIONS
from cdmix.data.sources.cache import CACHE_DIR_NAME, cache_folder
from cdmix.data.sources.cifar import CIFAR10_NAMES, CIFAR_ARCHIVES, load_cifar, read_cifar
from cdmix.data.sources.cifar_n import CIFARN_FILES, load_cifar_n
from cdmix.data.sources.common import (DEFAULT_IMAGE_SIZE, SourceSettings, check_class_count, image_size,
                                      split_indices)
from cdmix.data.sources.digits import load_digits
from cdmix.data.sources.download import download_file, extract_tar, file_md5, verify_md5
from cdmix.data.sources.files import is_image, load_csv, load_folder, scan_csv, scan_folder
from cdmix.data.sources.hf import load_hf
from cdmix.data.sources.normalization import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                              CLOTHING1M_MEAN, CLOTHING1M_STD, IMAGENET_MEAN, IMAGENET_STD)
from cdmix.data.sources.npz import load_npz, npz_headers, npz_store
from cdmix.data.sources.prepare import prepare_store, source_kind
from cdmix.data.sources.realworld import REALWORLD_IMAGE_SIZES, load_realworld, load_realworld_source
from cdmix.data.sources.stored import (decoded_rows, file_decoder, image_file_samples, load_store, raw_from_store,
                                       split_rows, store_raw_data)
from cdmix.data.store import available_memory  # noqa: F401  (npz looks it up here: tests pretend less memory)
from cdmix.data.types import RawData
from cdmix.errors import UserError

# The names tests and older callers used when this was one module.
_scan_folder, _scan_csv, _file_samples, _file_decoder = scan_folder, scan_csv, image_file_samples, file_decoder


def _load_arrays(settings: SourceSettings) -> RawData:
    """The arrays of a run started from arrays, kept in its folder."""
    from cdmix.data.arrays import load_arrays

    return load_arrays(settings.data_path)


Loader = Callable[[SourceSettings], RawData]
LOADERS: dict[str, Loader] = {
    "digits": load_digits,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "cifar10n": load_cifar_n,
    "cifar100n": load_cifar_n,
    "folder": load_folder,
    "csv": load_csv,
    "npz": load_npz,
    "store": load_store,
    **{name: load_realworld_source for name in REALWORLD_IMAGE_SIZES},
    "arrays": _load_arrays,
    "hf": load_hf,
}
"""Dataset name -> loader; every name of ``cdmix.config.DATASETS`` has one."""


def load_source(dataset: str | SourceSettings, data_path: str = "", **settings) -> RawData:
    """Load a dataset into a :class:`RawData` (``name`` set to the dataset's name).

    Either one :class:`SourceSettings`, or the dataset name, its path and any other field of
    ``SourceSettings`` as keywords (``labels``, ``label_file``, ``download``, ``image_size``, ``seed``,
    ``cache_dir``, ``progress``, ``extra_data_path``, ``clean_train``, ``hf_image_column``, ``hf_label_column``).
    """
    if not isinstance(dataset, SourceSettings):
        dataset = SourceSettings(dataset, data_path, **settings)
    loader = LOADERS.get(dataset.dataset)
    if loader is None:
        raise UserError(f"unknown dataset {dataset.dataset!r}; choose one of {', '.join(DATASETS)}")
    raw = loader(dataset)
    check_class_count(raw.num_classes, f"the {dataset.dataset} data {dataset.data_path}".rstrip())
    raw.name = dataset.dataset
    return raw


__all__ = [
    "CACHE_DIR_NAME", "CIFAR10_MEAN", "CIFAR10_NAMES", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "CIFARN_FILES", "CIFARN_LABEL_SETS", "CIFAR_ARCHIVES", "CLOTHING1M_MEAN", "CLOTHING1M_STD",
    "DEFAULT_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LOADERS", "REALWORLD_IMAGE_SIZES",
    "SourceSettings", "cache_folder", "decoded_rows", "download_file", "extract_tar", "file_md5", "image_size",
    "is_image", "load_realworld", "load_source", "npz_headers", "prepare_store", "raw_from_store", "read_cifar",
    "source_kind", "split_indices", "split_rows", "store_raw_data", "verify_md5",
]
