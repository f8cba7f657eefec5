"""A run's data: the source's arrays with the run's label noise and validation split, and the
fingerprints that let a resume or an evaluation refuse data other than the run's own."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdmix import runs
from cdmix.atomic import atomic_write
from cdmix.config import Config, noise_setting, normalization_for
from cdmix.data.noise import apply_noise
from cdmix.data.sources import SourceSettings, load_source
from cdmix.data.types import RawData
from cdmix.errors import UserError

logger = logging.getLogger("cdmix")

# Above this many bytes of training images, the training fingerprint hashes an evenly spaced sample of
# rows of about this size (every row's shape and every label still count): a resume must not read a
# 150 GB Clothing1M store once more only to check it; a replaced share of the images is still caught.
FINGERPRINT_FULL_BYTES = 1 << 30


@dataclass
class PreparedData:
    raw: RawData
    noise_info: dict[str, Any]
    train_pos: np.ndarray  # positions of the training part (the rest is validation)
    val_pos: np.ndarray


def load_data(config: Config, raw: RawData | None = None) -> PreparedData:
    """Source arrays (``raw``, or the config's dataset) with the run's label noise applied and the
    validation part split off."""
    if raw is None:
        raw = load_source(SourceSettings.from_config(config))
    noise_mode, noise_rate = noise_setting(config) or (None, 0.0)
    if config.open_set_classes:
        from cdmix.data.openset import held_out_classes

        raw, noise_info = held_out_classes(raw, config.open_set_classes, noise_rate, noise_mode or "sym",
                                           config.seed)
    else:
        if raw.train_true_labels is not None and noise_rate > 0 and config.noise_rate is not None:
            logger.warning(f"{config.dataset} brings its own noisy labels and their true labels; the synthetic "
                           f"noise asked for (--noise-rate {config.noise_rate}) is not added")
        raw, noise_info = apply_noise(raw, noise_mode, noise_rate, config.seed, config.noise_file)
    if config.open_set_rate > 0:
        from cdmix.data.openset import apply_open_set

        raw, open_info = apply_open_set(raw, config.open_set_rate, config.open_set_source, config.seed)
        noise_info.update(open_info)
    normalization = normalization_for(config)
    if normalization == "imagenet" and raw.train_images.shape[-1] == 3:
        from cdmix.data.sources import IMAGENET_MEAN, IMAGENET_STD

        raw = dataclasses.replace(raw, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    elif normalization == "encoder":  # the mean and std the --pretrained encoder was pretrained with
        from cdmix.models.encoder import encoder_normalization

        mean, std = encoder_normalization(config.pretrained, raw.train_images.shape[-1])
        raw = dataclasses.replace(raw, mean=mean, std=std)
    n = len(raw.train_labels)
    order = np.random.default_rng([config.seed, 7]).permutation(n)
    # A source with a clean validation set (Clothing1M) selects on it: the noisy set is not split.
    n_val = 0 if raw.val_images is not None else int(round(config.val_fraction * n))
    return PreparedData(raw, noise_info, np.sort(order[n_val:]), np.sort(order[:n_val]))


def hash_images(images: np.ndarray, labels: np.ndarray, max_bytes: int | None = None) -> str:
    """A hash (hex) of uint8 ``images`` (N x ...) and int ``labels`` (N,): the shapes, the labels, and
    the image bytes (all of them, or with ``max_bytes`` an evenly spaced sample of rows of about that
    many bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    digest.update(repr((tuple(images.shape), str(images.dtype), len(labels))).encode())
    digest.update(labels.tobytes())
    n = len(images)
    row_bytes = max(1, int(np.prod(images.shape[1:], dtype=np.int64)) * images.dtype.itemsize)
    if max_bytes is not None and n * row_bytes > max_bytes:
        rows = np.unique(np.linspace(0, n - 1, num=max(1, max_bytes // row_bytes)).astype(np.int64))
        digest.update(rows.tobytes())
        for start in range(0, len(rows), 4096):
            digest.update(np.ascontiguousarray(images[rows[start:start + 4096]]).tobytes())
        return digest.hexdigest()
    for start in range(0, n, 4096):
        digest.update(np.ascontiguousarray(images[start:start + 4096]).tobytes())
    return digest.hexdigest()


def hash_test_split(raw: RawData) -> str:
    """A hash of the test images and labels (hex), saved with the run: evaluate refuses other test data."""
    return hash_images(raw.test_images, raw.test_labels)


def hash_train_images(raw: RawData) -> str:
    """A hash of the training images (hex, with their shape; labels are compared on their own), saved
    with the run: resume refuses other training images under the same names."""
    return hash_images(raw.train_images, np.zeros(0, dtype=np.int64), FINGERPRINT_FULL_BYTES)


def save_labels(run_dir: Path, data: PreparedData) -> None:
    raw = data.raw
    arrays = {"train_labels": raw.train_labels, "train_pos": data.train_pos, "val_pos": data.val_pos,
              "class_names": np.asarray(raw.class_names), "test_fingerprint": np.asarray(hash_test_split(raw)),
              "train_fingerprint": np.asarray(hash_train_images(raw))}
    if raw.train_ids is not None:
        arrays["train_ids"] = np.asarray(raw.train_ids, dtype=str)
    if raw.train_true_labels is not None:
        arrays["train_true_labels"] = raw.train_true_labels
    atomic_write(run_dir / runs.LABELS, lambda fh: np.savez(fh, **arrays))


def check_data_unchanged(run_dir: Path, data: PreparedData, training: bool = False) -> None:
    """Refuse data that is not what the run was trained and tested on (its labels.npz): other training
    labels would resume a different run, another test split would make evaluate score something else.
    ``training``: also refuse other training images (a resume; evaluate scores the test split only)."""
    saved = runs.read_labels(run_dir)
    path = run_dir / runs.LABELS
    if not np.array_equal(saved["train_labels"], data.raw.train_labels):
        raise UserError(f"the data no longer matches the labels saved in {path}; "
                        "was the dataset or noise file changed?")
    if training and "train_fingerprint" in saved and str(saved["train_fingerprint"]) != hash_train_images(data.raw):
        raise UserError(f"the training images differ from those the run was trained on (see {path}); was the "
                        "data folder changed since training? Point --data-path back at the original images")
    if "test_fingerprint" not in saved:
        logger.warning(f"{path} predates the test-data check: cannot confirm the test images are the ones the "
                       "run was tested on")
    elif str(saved["test_fingerprint"]) != hash_test_split(data.raw):
        raise UserError(f"the test images or labels differ from those the run was tested on (see {path}); "
                        "was the data folder changed since training? Point --data-path back at the original data")
    if training and "train_fingerprint" not in saved:
        logger.warning(f"{path} predates the training-image check: cannot confirm the training images are the "
                       "ones the run was trained on")
