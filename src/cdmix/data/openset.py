"""Open-set label noise: some training images are replaced by images from outside the label space.

``apply_open_set(raw, rate, source, seed)`` picks ``round(rate * N)`` training positions with a
seeded generator and overwrites their images by out-of-distribution (OOD) images, keeping the
labels they had (the "CIFAR-80N" style setting Jo-SRC evaluates). Sources:

* ``noise``: Gaussian noise images (mean 127.5, std 64, clipped to uint8), one per replaced sample;
* ``digits``: scikit-learn's 8x8 handwritten digits, inverted (dark strokes on white), resized to
  the image size (bilinear) and replicated to the image's channels;
* ``npz:PATH``: the ``train_images`` (or ``images``) array of a numpy archive, e.g. CIFAR-100 images
  written with ``numpy.savez(PATH, train_images=...)``; resized and converted to the channel count;
* ``cifar100:PATH``: CIFAR-100 training images from PATH, either such an ``.npz`` or a folder
  holding the official ``cifar-100-python`` archive contents. ``cifar100`` without a path is an
  error (the images are not bundled).

The replaced samples are marked in ``RawData.train_is_ood``; where true labels are known their true
label becomes -1 (no class is right), so the clean-selection metrics count them as noisy.

``held_out_classes(raw, open_classes, closed_rate, mode, seed)`` is the official Jo-SRC construction
("CIFAR-80N", ``--open-set-classes 20``): real images of the last classes become the open set, see
its docstring.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.data.types import RawData
from cdmix.errors import UserError

SOURCES = ("noise", "digits", "npz:PATH", "cifar100:PATH")


def apply_open_set(raw: RawData, rate: float, source: str, seed: int) -> tuple[RawData, dict[str, Any]]:
    """Replace ``round(rate * N)`` training images by OOD images from ``source`` (labels kept).

    Returns the new ``RawData`` (``train_is_ood`` set) and ``{"open_set_rate", "open_set_source",
    "open_set_count"}``. ``rate == 0`` returns ``raw`` unchanged (with an all-False mask).
    """
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise UserError(f"open-set rate must be in [0, 1), got {rate}")
    if source.startswith("cifar100") and raw.name in ("cifar100", "cifar100n"):
        raise UserError(f"--open-set-source {source} would put images of the classes being trained on into the "
                        f"open set of {raw.name}; for Jo-SRC's CIFAR-80N use --open-set-classes 20 instead")
    n = len(raw.train_labels)
    k = int(round(rate * n))
    info = {"open_set_rate": rate, "open_set_source": source, "open_set_count": k}
    mask = np.zeros(n, dtype=bool)
    if k == 0:
        return dataclasses.replace(raw, train_is_ood=mask), info
    rng = np.random.default_rng([int(seed), 0x0_5E7])
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    height, width, channels = raw.train_images.shape[1:4] if raw.train_images.ndim == 4 else (
        *raw.train_images.shape[1:3], 1)
    ood = ood_images(source, k, height, width, channels, rng)
    images = raw.train_images.copy()
    images[chosen] = ood.reshape((k,) + images.shape[1:])
    mask[chosen] = True
    true = raw.train_true_labels
    if true is not None:
        true = np.asarray(true, dtype=np.int64).copy()
        true[chosen] = -1
    return dataclasses.replace(raw, train_images=images, train_true_labels=true, train_is_ood=mask), info


def open_set_transition_matrix(num_classes: int, open_classes: int, closed_rate: float,
                               mode: str = "sym") -> np.ndarray:
    """The official Jo-SRC noise transition matrix (data/noisy_cifar.py ``generate_noise_matrix``).

    ``K = num_classes - open_classes`` closed classes. Rows 0..K-1: ``sym``: 1 - r on the diagonal,
    r / (K - 1) elsewhere among the closed classes; ``pairflip``: 1 - r on the diagonal, r on the
    next closed class (circular). Rows K..C-1 (the open set): 1 / K over the closed classes.
    Columns K..C-1 are 0: no sample is ever labelled with an open class.
    """
    k = num_classes - open_classes
    if mode == "sym":
        matrix = np.full((num_classes, num_classes), closed_rate / (k - 1))
        np.fill_diagonal(matrix[:k, :k], 1.0 - closed_rate)
    elif mode == "pairflip":
        matrix = np.zeros((num_classes, num_classes))
        closed = np.arange(k)
        matrix[closed, closed] = 1.0 - closed_rate
        matrix[closed, (closed + 1) % k] += closed_rate
    else:
        raise UserError(f"--open-set-classes takes noise mode sym or pairflip (the official ones), got {mode!r}")
    matrix[k:, :] = 1.0 / k
    matrix[:, k:] = 0.0
    return matrix


def held_out_classes(raw: RawData, open_classes: int, closed_rate: float, mode: str,
                     seed: int) -> tuple[RawData, dict[str, Any]]:
    """Jo-SRC's open-set benchmark from a clean source (CIFAR-100 -> "CIFAR-80N" with 20).

    The last ``open_classes`` classes are the open set: their training images stay, each relabelled
    by a draw from the transition matrix (uniform over the K = C - open_classes closed classes); the
    closed classes' labels get ``closed_rate`` noise of ``mode`` among themselves. Labels are drawn
    per sample in training order with ``numpy.random.RandomState(seed).multinomial``, as the official
    ``multiclass_noisify`` does, so the same seed gives the official code's labels. The model sees K
    classes; the test set keeps only the closed classes' images. True labels: the original class,
    -1 for the open-set images (``train_is_ood`` marks them).
    """
    num_classes = raw.num_classes
    k = num_classes - open_classes
    if not 2 <= k < num_classes:
        raise UserError(f"--open-set-classes must be between 1 and {num_classes - 2} for {num_classes} classes, "
                        f"got {open_classes}")
    if raw.train_true_labels is not None:
        raise UserError("--open-set-classes builds the noise itself; use it with a clean dataset such as cifar100")
    matrix = open_set_transition_matrix(num_classes, open_classes, closed_rate, mode)
    original = np.asarray(raw.train_labels, dtype=np.int64)
    flipper = np.random.RandomState(seed)
    noisy = np.array([np.flatnonzero(flipper.multinomial(1, matrix[label]))[0] for label in original],
                     dtype=np.int64)
    is_ood = original >= k
    test_keep = np.asarray(raw.test_labels) < k
    new = dataclasses.replace(raw, train_labels=noisy, train_true_labels=np.where(is_ood, -1, original),
                              train_is_ood=is_ood, test_images=raw.test_images[test_keep],
                              test_labels=np.asarray(raw.test_labels)[test_keep],
                              class_names=list(raw.class_names[:k]))
    info = {"noise_rate_nominal": closed_rate, "noise_rate_actual": float((noisy != original).mean()),
            "noise_source": "synthetic", "noise_mode": f"{mode}+open-set-classes",
            "open_set_classes": open_classes, "open_set_count": int(is_ood.sum())}
    return new, info


def ood_images(source: str, count: int, height: int, width: int, channels: int,
               rng: np.random.Generator) -> np.ndarray:
    """``count`` uint8 OOD images of shape ``count x height x width x channels`` from ``source``."""
    name, _, path = source.partition(":")
    if name == "noise" and not path:
        pixels = rng.normal(127.5, 64.0, size=(count, height, width, channels))
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if name == "digits" and not path:
        from sklearn.datasets import load_digits

        pool = 255 - np.rint(load_digits().images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        pool = pool[..., None]
    elif name in ("npz", "cifar100"):
        if not path:
            raise UserError(f"open-set source {name!r} needs a path to the images: use "
                            f"--open-set-source {name}:/path/to/images.npz (an array train_images, "
                            "N x H x W x C uint8)" + (" or a folder with cifar-100-python" if name == "cifar100"
                                                       else ""))
        pool = _read_pool(name, Path(path))
    else:
        raise UserError(f"unknown open-set source {source!r}; choose one of {', '.join(SOURCES)}")
    picks = rng.choice(len(pool), size=count, replace=count > len(pool))
    return _fit(pool[picks], height, width, channels)


def _read_pool(name: str, path: Path) -> np.ndarray:
    if path.is_dir():
        if name != "cifar100":
            raise UserError(f"open-set source npz:{path} must be an .npz file, not a folder")
        from cdmix.data.sources import load_source

        return load_source("cifar100", str(path), download=False, progress=False).train_images
    if not path.is_file():
        raise UserError(f"open-set image file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = "train_images" if "train_images" in npz.files else ("images" if "images" in npz.files else None)
            if key is None:
                raise UserError(f"{path} has no 'train_images' (or 'images') array for open-set images")
            pool = npz[key]
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None
    if pool.ndim == 3:
        pool = pool[..., None]
    if pool.ndim != 4 or len(pool) == 0 or pool.dtype != np.uint8:
        raise UserError(f"{path}: open-set images must be a non-empty uint8 N x H x W x C array, "
                        f"got {pool.dtype} {pool.shape}")
    return pool


def _fit(images: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Resize (bilinear) and convert channels (gray -> replicated, colour -> mean) to the target shape."""
    import torch

    if images.shape[-1] != channels:
        if images.shape[-1] == 1:
            images = np.repeat(images, channels, axis=-1)
        elif channels == 1:
            images = np.rint(images.astype(np.float64).mean(axis=-1, keepdims=True)).astype(np.uint8)
        else:
            raise UserError(f"cannot convert {images.shape[-1]}-channel open-set images to {channels} channels")
    if images.shape[1:3] != (height, width):
        t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False,
                                            antialias=t.shape[-1] > width)
        images = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images, dtype=np.uint8)
