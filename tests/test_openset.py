"""Open-set noise: OOD images replace some training images, labels kept, mask and true labels marked."""

from __future__ import annotations

import numpy as np
import pytest

from cdmix.data.openset import apply_open_set, ood_images
from cdmix.data.types import RawData
from cdmix.errors import UserError


def make_raw(n=50, size=12, channels=3, true=True):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 5
    return RawData(train_images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
                   train_labels=labels.copy(), test_images=np.zeros((4, size, size, channels), np.uint8),
                   test_labels=np.zeros(4, np.int64), class_names=[str(i) for i in range(5)],
                   mean=(0.5,) * channels, std=(0.25,) * channels,
                   train_true_labels=labels.copy() if true else None)


@pytest.mark.parametrize("source", ["noise", "digits"])
def test_replaces_round_rate_n_images_and_keeps_labels(source):
    raw = make_raw()
    new, info = apply_open_set(raw, 0.3, source, seed=1)
    mask = new.train_is_ood
    assert mask.dtype == bool and mask.sum() == round(0.3 * 50) == info["open_set_count"]
    assert info["open_set_rate"] == 0.3 and info["open_set_source"] == source
    assert np.array_equal(new.train_labels, raw.train_labels)
    assert np.array_equal(new.train_images[~mask], raw.train_images[~mask])
    assert not np.array_equal(new.train_images[mask], raw.train_images[mask])
    assert new.train_images.dtype == np.uint8 and new.train_images.shape == raw.train_images.shape
    assert np.all(new.train_true_labels[mask] == -1)
    assert np.array_equal(new.train_true_labels[~mask], raw.train_true_labels[~mask])
    # the input is not modified
    assert raw.train_is_ood is None and np.all(raw.train_true_labels >= 0)


def test_seeded_and_rate_zero():
    raw = make_raw()
    a, _ = apply_open_set(raw, 0.2, "noise", seed=3)
    b, _ = apply_open_set(raw, 0.2, "noise", seed=3)
    c, _ = apply_open_set(raw, 0.2, "noise", seed=4)
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.train_is_ood, b.train_is_ood)
    assert not np.array_equal(a.train_is_ood, c.train_is_ood)
    same, info = apply_open_set(raw, 0.0, "noise", seed=0)
    assert info["open_set_count"] == 0 and not same.train_is_ood.any()
    assert np.array_equal(same.train_images, raw.train_images)
    unknown, _ = apply_open_set(make_raw(true=False), 0.2, "noise", seed=0)
    assert unknown.train_true_labels is None and unknown.train_is_ood.sum() == 10


def test_digits_are_inverted_resized_and_replicated():
    imgs = ood_images("digits", 20, 16, 16, 3, np.random.default_rng(0))
    assert imgs.shape == (20, 16, 16, 3) and imgs.dtype == np.uint8
    assert np.array_equal(imgs[..., 0], imgs[..., 2])
    assert imgs.mean() > 127  # inverted: dark strokes on a white background
    gray = ood_images("noise", 5, 8, 8, 1, np.random.default_rng(0))
    assert gray.shape == (5, 8, 8, 1) and 90 < gray.mean() < 165


def test_npz_and_cifar100_sources(tmp_path, cifar100_subset):
    path = tmp_path / "c100.npz"
    np.savez(path, train_images=cifar100_subset["train_images"][:40])
    for source in (f"npz:{path}", f"cifar100:{path}"):
        new, _ = apply_open_set(make_raw(size=16), 0.4, source, seed=0)
        assert new.train_is_ood.sum() == 20 and new.train_images.shape == (50, 16, 16, 3)
    gray, _ = apply_open_set(make_raw(size=8, channels=1), 0.4, f"npz:{path}", seed=0)
    assert gray.train_images.shape == (50, 8, 8, 1)


def test_errors_are_user_errors(tmp_path):
    raw = make_raw()
    with pytest.raises(UserError, match="needs a path"):
        apply_open_set(raw, 0.1, "cifar100", seed=0)
    with pytest.raises(UserError, match="unknown open-set source"):
        apply_open_set(raw, 0.1, "imagenet", seed=0)
    with pytest.raises(UserError, match="does not exist"):
        apply_open_set(raw, 0.1, f"npz:{tmp_path / 'missing.npz'}", seed=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, labels=np.zeros(3))
    with pytest.raises(UserError, match="train_images"):
        apply_open_set(raw, 0.1, f"npz:{bad}", seed=0)
    with pytest.raises(UserError):
        apply_open_set(raw, 1.0, "noise", seed=0)
