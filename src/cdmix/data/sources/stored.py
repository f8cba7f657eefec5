"""Sources read through an image store: a store made by ``cdmix prepare`` (``--dataset store``), and
the one helper every store-backed source (folder, csv, large npz, real-world sets) uses to turn a
store's rows into a :class:`RawData` of views."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cdmix.data.sources.common import SourceSettings, split_indices
from cdmix.data.store import SKIPPED, Samples, Store, decoded_file_chunks, file_samples, open_store
from cdmix.data.types import RawData
from cdmix.errors import UserError

log = logging.getLogger("cdmix")


def decoded_rows(store: Store) -> np.ndarray:
    """The rows that hold an image, in store order; a warning says how many were left out."""
    valid = np.flatnonzero(store.decoded)
    skipped = len(store) - len(valid)
    if skipped:
        log.warning(f"{skipped} of {len(store)} images could not be decoded and are left out "
                    f"(listed in {store.path / SKIPPED})")
    return valid


def split_rows(store: Store, split_of: np.ndarray, split: str, valid: np.ndarray) -> np.ndarray:
    """The decoded rows (``valid``) whose split is ``split``; a UserError when none is left."""
    found = valid[split_of[valid] == split]
    if len(found) == 0:
        raise UserError(f"{store.path}: no decodable {split} images left; see {store.path / SKIPPED}")
    return found


def raw_from_store(store: Store, labels: np.ndarray, split_of: np.ndarray | None, class_names: Sequence[str], *,
                   seed: int = 0, mean_std: tuple | None = None, ids: Sequence[str] | None = None) -> RawData:
    """``RawData`` whose images are views of ``store``'s decoded rows (undecodable ones left out).

    ``split_of``: each row's split ("train", "test", "val" for a clean validation set, "test:<name>"
    for a further test set); ``None``: a seeded stratified 10% test split of the decoded rows.
    ``mean_std``: published statistics, else those of the training rows; ``ids``: each row's name
    (``train_ids`` of the training rows), or None.
    """
    valid = decoded_rows(store)
    if split_of is None:
        train_pos, test_pos = split_indices(labels[valid], test_fraction=0.1, seed=seed)
        train_rows, test_rows = valid[train_pos], valid[test_pos]
    else:
        train_rows, test_rows = (split_rows(store, split_of, s, valid) for s in ("train", "test"))
    mean, std = mean_std if mean_std is not None else store.mean_std(train_rows)
    raw = RawData(train_images=store.view(train_rows), train_labels=labels[train_rows],
                  test_images=store.view(test_rows), test_labels=labels[test_rows], class_names=list(class_names),
                  mean=mean, std=std, train_true_labels=None,
                  train_ids=None if ids is None else [ids[r] for r in train_rows])
    for split in ([] if split_of is None else dict.fromkeys(split_of.tolist())):
        if split == "val":
            rows = split_rows(store, split_of, split, valid)
            raw.val_images, raw.val_labels = store.view(rows), labels[rows]
        elif split.startswith("test:"):
            rows = split_rows(store, split_of, split, valid)
            raw.extra_tests[split.removeprefix("test:")] = (store.view(rows), labels[rows])
    return raw


def store_raw_data(store: Store, labels: np.ndarray, is_test: np.ndarray | None, class_names: list[str],
                   seed: int) -> RawData:
    """``RawData`` whose images are views of ``store`` (skipped images left out, with a warning),
    named by the store's sample names. ``is_test`` marks the test rows; ``None``: a seeded
    stratified 10% test split of the decoded rows."""
    split_of = None if is_test is None else np.where(is_test, "test", "train")
    return raw_from_store(store, labels, split_of, class_names, seed=seed, ids=store.samples.names)


def load_store(settings: SourceSettings) -> RawData:
    """A complete store made by ``cdmix prepare`` (its own split, else a seeded 10% test split)."""
    store = open_store(Path(settings.data_path).expanduser())
    if settings.image_size is not None and int(settings.image_size) != store.size:
        raise UserError(f"the store {store.path} holds {store.size} px images, not {settings.image_size}; drop "
                        f"--image-size or prepare another store with --size {settings.image_size}")
    splits = store.samples.splits
    is_test = np.asarray([s == "test" for s in splits]) if any(splits) else None
    return store_raw_data(store, store.samples.labels, is_test, store.class_names, settings.seed)


def image_file_samples(paths: Sequence[Path], root: Path, labels: np.ndarray, is_test: np.ndarray | None) -> Samples:
    """``Samples`` of image files, named by their path relative to ``root``."""
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]
    splits = [""] * len(paths) if is_test is None else ["test" if t else "train" for t in is_test]
    return file_samples(paths, names, labels, splits)


def file_decoder(paths: Sequence[Path], size: int, workers: int):
    """``produce`` for ``build_store``: the image files ``paths`` decoded at ``size`` px."""
    files = [str(p) for p in paths]
    return lambda chunks: decoded_file_chunks(files, size, chunks, workers)
