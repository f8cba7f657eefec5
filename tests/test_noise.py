"""Synthetic label noise and DivideMix noise files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdmix.data.noise import (
    CIFAR100_COARSE,
    apply_noise,
    asym_map,
    cifar100_superclass_map,
    make_noisy_labels,
    noise_rate_actual,
    read_noise_file,
    write_noise_file,
)
from cdmix.data.types import RawData
from cdmix.errors import UserError


def _labels(n: int, c: int, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, size=n)


def _chosen(n: int, rate: float, seed: int) -> np.ndarray:
    """The indices the implementation picks: the first draw of its generator is the permutation."""
    return np.random.default_rng(seed).permutation(n)[: int(round(rate * n))]


@pytest.mark.parametrize("mode", ["sym", "sym-exclusive", "asym", "pairflip"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_changes_only_chosen_indices(mode: str, rate: float) -> None:
    true = _labels(1000, 10)
    noisy = make_noisy_labels(true, 10, mode, rate, seed=7)
    assert noisy.dtype == np.int64 and noisy.shape == true.shape
    outside = np.setdiff1d(np.arange(1000), _chosen(1000, rate, 7))
    assert np.array_equal(noisy[outside], true[outside])
    assert noisy.min() >= 0 and noisy.max() < 10


def test_exact_count_sym_exclusive_and_pairflip() -> None:
    true = _labels(999, 10)
    for rate in (0.1, 0.37, 0.8):
        expected = int(round(rate * 999))
        assert np.sum(make_noisy_labels(true, 10, "sym-exclusive", rate, seed=1) != true) == expected
        assert np.sum(make_noisy_labels(true, 10, "pairflip", rate, seed=1) != true) == expected


def test_sym_rate_includes_true_class() -> None:
    n, c, rate = 200_000, 10, 0.5
    true = _labels(n, c)
    noisy = make_noisy_labels(true, c, "sym", rate, seed=3)
    actual = noise_rate_actual(noisy, true)
    k = round(rate * n)
    # k draws, each wrong with probability (C-1)/C: binomial sd = sqrt(k p (1-p)) / n ~ 0.0007
    assert abs(actual - rate * (c - 1) / c) < 6 * np.sqrt(k * 0.9 * 0.1) / n
    chosen = _chosen(n, rate, 3)
    # the new labels of the chosen samples are uniform over all classes
    counts = np.bincount(noisy[chosen], minlength=c) / k
    assert np.all(np.abs(counts - 1 / c) < 0.01)


def test_sym_exclusive_rate_exact() -> None:
    true = _labels(10_000, 100)
    noisy = make_noisy_labels(true, 100, "sym-exclusive", 0.45, seed=0)
    assert noise_rate_actual(noisy, true) == 0.45


def test_asym_cifar10_map() -> None:
    expected = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    true = _labels(5000, 10)
    noisy = make_noisy_labels(true, 10, "asym", 0.4, seed=11)
    changed = np.flatnonzero(noisy != true)
    for t, nl in zip(true[changed], noisy[changed]):
        assert expected[int(t)] == nl
    chosen = _chosen(5000, 0.4, 11)
    assert len(changed) == np.isin(true[chosen], list(expected)).sum()
    # every chosen sample of a mapped class changes
    only_trucks = np.full(1000, 9)
    assert np.sum(make_noisy_labels(only_trucks, 10, "asym", 0.3, seed=2) == 1) == 300


def test_asym_cifar100_superclass_map_real_grouping(cifar100n_file) -> None:
    import torch

    content = torch.load(cifar100n_file, weights_only=False)
    fine = np.asarray(content["clean_label"])
    coarse = np.asarray(content["clean_coarse_label"])
    assert np.array_equal(CIFAR100_COARSE[fine], coarse)  # our table is the official grouping


def test_asym_cifar100_cyclic_within_superclass() -> None:
    mapping = cifar100_superclass_map()
    assert np.array_equal(np.sort(mapping), np.arange(100))  # a permutation
    assert np.all(mapping != np.arange(100))
    assert np.all(CIFAR100_COARSE[mapping] == CIFAR100_COARSE)
    assert np.bincount(CIFAR100_COARSE).tolist() == [5] * 20
    for start in range(100):  # each superclass is one 5-cycle
        c, steps = mapping[start], 1
        while c != start:
            c, steps = mapping[c], steps + 1
        assert steps == 5
    true = _labels(3000, 100)
    noisy = make_noisy_labels(true, 100, "asym", 0.6, seed=4)
    changed = noisy != true
    assert changed.sum() == round(0.6 * 3000)
    assert np.array_equal(noisy[changed], mapping[true[changed]])


def test_asym_other_class_counts_use_pairflip() -> None:
    assert np.array_equal(asym_map(7), (np.arange(7) + 1) % 7)
    assert asym_map(10)[9] == 1


def test_pairflip() -> None:
    true = _labels(2000, 5)
    noisy = make_noisy_labels(true, 5, "pairflip", 0.25, seed=9)
    changed = noisy != true
    assert changed.sum() == 500
    assert np.array_equal(noisy[changed], (true[changed] + 1) % 5)


def test_seeded_determinism() -> None:
    true = _labels(3000, 10)
    a = make_noisy_labels(true, 10, "sym", 0.5, seed=5)
    b = make_noisy_labels(true, 10, "sym", 0.5, seed=5)
    c = make_noisy_labels(true, 10, "sym", 0.5, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_rate_outside_unit_interval(rate: float) -> None:
    with pytest.raises(UserError, match="noise rate"):
        make_noisy_labels(_labels(10, 10), 10, "sym", rate, seed=0)


def test_unknown_mode_and_bad_labels() -> None:
    with pytest.raises(UserError, match="unknown noise mode"):
        make_noisy_labels(_labels(10, 10), 10, "weird", 0.2, seed=0)
    with pytest.raises(UserError, match="outside"):
        make_noisy_labels(np.array([0, 12]), 10, "sym", 0.2, seed=0)


def test_noise_rate_actual() -> None:
    assert noise_rate_actual(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    assert noise_rate_actual(np.array([], dtype=int), np.array([], dtype=int)) == 0.0


def test_noise_file_round_trip(tmp_path) -> None:
    labels = _labels(500, 10)
    path = tmp_path / "sub" / "0.5_sym.json"
    write_noise_file(path, labels)
    assert np.array_equal(read_noise_file(path, 500), labels)
    assert read_noise_file(path, 500).dtype == np.int64
    assert [p.name for p in path.parent.iterdir()] == ["0.5_sym.json"]  # no temp file left


def test_read_official_format(tmp_path) -> None:
    # the official code writes json.dump(list_of_python_ints, f): "[6, 9, 9, 4, ...]"
    path = tmp_path / "0.2_sym.json"
    with path.open("w") as fh:
        json.dump([6, 9, 9, 4, 1, 1, 2, 7], fh)
    assert read_noise_file(path, 8).tolist() == [6, 9, 9, 4, 1, 1, 2, 7]


def test_noise_file_errors(tmp_path) -> None:
    path = tmp_path / "n.json"
    write_noise_file(path, np.arange(10) % 3)
    with pytest.raises(UserError, match="has 10 labels but the training set has 11"):
        read_noise_file(path, 11)
    with pytest.raises(UserError, match="outside"):
        read_noise_file(path, 10, num_classes=2)
    path.write_text("[1, 2,")
    with pytest.raises(UserError, match="not valid JSON"):
        read_noise_file(path, 2)
    path.write_text('{"a": 1}')
    with pytest.raises(UserError, match="flat JSON list"):
        read_noise_file(path, 1)
    with pytest.raises(UserError, match="does not exist"):
        read_noise_file(tmp_path / "missing.json", 1)


def _raw(n: int = 400, true_labels: np.ndarray | None = None, labels: np.ndarray | None = None) -> RawData:
    labels = _labels(n, 10) if labels is None else labels
    return RawData(train_images=np.zeros((n, 4, 4, 1), np.uint8), train_labels=labels,
                   test_images=np.zeros((5, 4, 4, 1), np.uint8), test_labels=np.zeros(5, np.int64),
                   class_names=[str(i) for i in range(10)], mean=(0.5,), std=(0.25,),
                   train_true_labels=true_labels, name="digits")


def test_apply_noise_synthetic_writes_then_reads_file(tmp_path) -> None:
    raw = _raw()
    path = tmp_path / "noise" / "0.4_sym-exclusive.json"
    noisy_raw, info = apply_noise(raw, "sym-exclusive", 0.4, seed=1, noise_file=str(path))
    assert info == {"noise_rate_nominal": 0.4, "noise_rate_actual": 0.4, "noise_source": "synthetic",
                    "noise_mode": "sym-exclusive"}
    assert np.array_equal(noisy_raw.train_true_labels, raw.train_labels)
    assert path.is_file()
    again, info2 = apply_noise(raw, "sym-exclusive", 0.4, seed=99, noise_file=str(path))
    assert info2["noise_source"] == "file"
    assert np.array_equal(again.train_labels, noisy_raw.train_labels)
    assert raw.train_true_labels is None  # the input is not modified


def test_apply_noise_without_file_and_zero_rate() -> None:
    raw = _raw()
    noisy_raw, info = apply_noise(raw, "sym", 0.5, seed=0, noise_file=None)
    assert info["noise_source"] == "synthetic" and 0.35 < info["noise_rate_actual"] < 0.55
    clean_raw, info0 = apply_noise(raw, "sym", 0.0, seed=0, noise_file=None)
    assert info0["noise_source"] == "none" and info0["noise_rate_actual"] is None
    # No noise added and no source of truth: the given labels are the data, the true labels unknown.
    assert clean_raw.train_true_labels is None and np.array_equal(clean_raw.train_labels, raw.train_labels)
    none_raw, _ = apply_noise(raw, None, None, seed=0, noise_file=None)
    assert none_raw.train_true_labels is None


def test_apply_noise_human_labels_untouched() -> None:
    true = _labels(400, 10, seed=1)
    noisy = true.copy()
    noisy[:100] = (noisy[:100] + 1) % 10
    raw = _raw(labels=noisy, true_labels=true)
    out, info = apply_noise(raw, "sym", 0.5, seed=0, noise_file=None)
    assert out is raw
    assert info["noise_source"] == "human" and info["noise_rate_actual"] == 0.25
    assert info["synthetic_ignored"] == {"mode": "sym", "rate": 0.5}
