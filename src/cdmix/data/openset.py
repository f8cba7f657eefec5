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
