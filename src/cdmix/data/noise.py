"""Synthetic label noise (official DivideMix semantics) and DivideMix noise files.

A noise setting picks exactly ``round(rate * N)`` training indices with a seeded permutation and
changes their labels:

- ``sym``: a label drawn uniformly from *all* C classes (it may equal the true one, so the actual
  rate is about ``rate * (C - 1) / C``), as the official code does;
- ``sym-exclusive``: a label drawn uniformly from the other C - 1 classes (actual rate == rate);
- ``asym``: a fixed class map -- CIFAR-10's truck->automobile, bird->airplane, deer->horse,
  cat<->dog for 10 classes, the next class within the same CIFAR-100 superclass (circular) for
  100 classes, ``pairflip`` otherwise; chosen samples of unmapped classes keep their label;
- ``pairflip``: class c -> (c + 1) mod C.

Noise files are the official DivideMix format: a JSON flat list of N integer labels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.atomic import atomic_write
from cdmix.config import NOISE_MODES
from cdmix.data.types import RawData
from cdmix.errors import UserError


# CIFAR-10 asymmetric map: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYM = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# Superclass (coarse label 0..19) of each CIFAR-100 fine label 0..99, in the official id order.
CIFAR100_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
], dtype=np.int64)


def cifar100_superclass_map() -> np.ndarray:
    """Fine label -> the next fine label (by id) of the same superclass, wrapping around."""
    mapping = np.arange(100, dtype=np.int64)
    for coarse in range(20):
        members = np.flatnonzero(CIFAR100_COARSE == coarse)  # ascending fine ids, 5 of them
        mapping[members] = np.roll(members, -1)
    return mapping


def asym_map(num_classes: int) -> np.ndarray:
    """The ``asym`` class map (array ``m``: class c becomes ``m[c]``) for ``num_classes`` classes."""
    if num_classes == 10:
        mapping = np.arange(10, dtype=np.int64)
        mapping[list(CIFAR10_ASYM)] = list(CIFAR10_ASYM.values())
        return mapping
    if num_classes == 100:
        return cifar100_superclass_map()
    return pairflip_map(num_classes)


def pairflip_map(num_classes: int) -> np.ndarray:
    return (np.arange(num_classes, dtype=np.int64) + 1) % num_classes


def _check_rate(rate: float) -> float:
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise UserError(f"noise rate must be a number in [0, 1], got {rate!r}") from None
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise UserError(f"noise rate must be in [0, 1], got {rate}")
    return rate


def make_noisy_labels(
    true_labels: np.ndarray,
    num_classes: int,
    mode: str,
    rate: float,
    seed: int,
    dataset: str = "cifar10",
) -> np.ndarray:
    """Noisy copy (int64) of ``true_labels`` under ``mode`` at ``rate``, deterministic in ``seed``.

    Exactly ``round(rate * N)`` indices are chosen (a seeded permutation); see the module docstring
    for what each mode does to them. ``dataset`` only names the data in error messages; the
    ``asym`` map follows the class count.
    """
    rate = _check_rate(rate)
    if mode not in NOISE_MODES:
        raise UserError(f"unknown noise mode {mode!r}; choose one of {', '.join(NOISE_MODES)}")
    labels = np.asarray(true_labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"true_labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if num_classes < 2:
        raise UserError(f"{dataset}: label noise needs at least 2 classes, found {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{dataset}: labels outside 0..{num_classes - 1}; cannot add noise")

    rng = np.random.default_rng(seed)
    n = len(labels)
    chosen = rng.permutation(n)[: int(round(rate * n))]
    noisy = labels.copy()
    if mode == "sym":
        noisy[chosen] = rng.integers(0, num_classes, size=len(chosen))
    elif mode == "sym-exclusive":
        noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    elif mode == "asym":
        noisy[chosen] = asym_map(num_classes)[labels[chosen]]
    else:  # pairflip
        noisy[chosen] = pairflip_map(num_classes)[labels[chosen]]
    return noisy


def noise_rate_actual(noisy: np.ndarray, true: np.ndarray) -> float:
    """Fraction of labels in ``noisy`` that differ from ``true``."""
    noisy, true = np.asarray(noisy), np.asarray(true)
    if noisy.shape != true.shape:
        raise ValueError(f"label arrays differ in shape: {noisy.shape} vs {true.shape}")
    return float(np.mean(noisy != true)) if noisy.size else 0.0


def read_noise_file(path: str | Path, n: int, num_classes: int | None = None) -> np.ndarray:
    """Labels (int64, length ``n``) from an official DivideMix noise file (a JSON list of ints)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"noise file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"noise file {path} is not valid JSON ({exc}); delete it to regenerate the noise") from None
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise UserError(f"noise file {path} must hold a flat JSON list of integer labels; delete it to "
                        f"regenerate the noise")
    if len(values) != n:
        raise UserError(f"noise file {path} has {len(values)} labels but the training set has {n} images; "
                        f"use the file made for this dataset or delete it to regenerate")
    labels = np.asarray(values, dtype=np.int64)
    if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"noise file {path} holds labels outside 0..{num_classes - 1}; "
                        f"use the file made for this dataset")
    return labels


def write_noise_file(path: str | Path, labels: np.ndarray) -> None:
    """Write ``labels`` as a JSON list of ints, atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([int(v) for v in np.asarray(labels).reshape(-1)])
    atomic_write(path, text)


def apply_noise(
    raw: RawData,
    mode: str,
    rate: float,
    seed: int,
    noise_file: str | None,
) -> tuple[RawData, dict[str, Any]]:
    """Add synthetic noise to a clean source; leave human-labelled (CIFAR-N) data unchanged.

    Clean source (``raw.train_true_labels is None``): the original labels become the true labels
    and ``train_labels`` the noisy ones -- read from ``noise_file`` when it exists, otherwise
    generated (and written to ``noise_file`` when one is named). With rate 0 (or None) and no file,
    nothing is added: the labels stay as given and the true labels stay unknown (None), since
    nothing says which given label is right. Source with true labels: nothing is added (``rate``
    is ignored).

    Returns the new ``RawData`` and ``{"noise_rate_nominal", "noise_rate_actual", "noise_source",
    "noise_mode"}`` plus, for human labels with a synthetic rate requested, ``"synthetic_ignored"``.
    Prints nothing.
    """
    rate = 0.0 if rate is None else _check_rate(rate)
    if raw.train_true_labels is not None:
        info: dict[str, Any] = {
            "noise_rate_nominal": None,
            "noise_rate_actual": noise_rate_actual(raw.train_labels, raw.train_true_labels),
            "noise_source": "human",
            "noise_mode": "human",
        }
        if mode and rate > 0:
            info["synthetic_ignored"] = {"mode": mode, "rate": rate}
        return raw, info

    if rate == 0 and not (noise_file and Path(noise_file).is_file()):
        return raw, {"noise_rate_nominal": None, "noise_rate_actual": None, "noise_source": "none",
                     "noise_mode": "none"}
    true = np.asarray(raw.train_labels, dtype=np.int64).copy()
    n = len(true)
    if noise_file and Path(noise_file).is_file():
        noisy = read_noise_file(noise_file, n, raw.num_classes)
        source = "file"
    else:
        noisy = make_noisy_labels(true, raw.num_classes, mode, rate, seed, dataset=raw.name)
        source = "synthetic"
        if noise_file:
            write_noise_file(noise_file, noisy)
    new = dataclasses.replace(raw, train_labels=noisy, train_true_labels=true)
    info = {
        "noise_rate_nominal": rate,
        "noise_rate_actual": noise_rate_actual(noisy, true),
        "noise_source": source,
        "noise_mode": mode,
    }
    return new, info
