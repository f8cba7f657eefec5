"""Tests for cdmix.selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdmix import selection as S


def _bimodal(n_clean=300, n_noisy=100, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.normal(0.1, 0.03, n_clean)
    noisy = rng.normal(0.8, 0.05, n_noisy)
    x = np.concatenate([clean, noisy])
    truth = np.concatenate([np.ones(n_clean, bool), np.zeros(n_noisy, bool)])
    return x, truth


def test_minmax_normalise():
    out = S.minmax_normalise(np.array([2.0, 4.0, 3.0]))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5])
    t = S.minmax_normalise(torch.tensor([1.0, 3.0], dtype=torch.bfloat16))
    np.testing.assert_allclose(t, [0.0, 1.0])
    const = S.minmax_normalise(np.full(5, 7.0))
    assert np.array_equal(const, np.zeros(5))
    assert S.minmax_normalise(np.array([])).size == 0
    with pytest.raises(ValueError):
        S.minmax_normalise(np.array([1.0, np.nan]))


def test_fit_gmm_bimodal_and_posterior_formula():
    x, truth = _bimodal()
    x = S.minmax_normalise(x)
    prob, params = S.fit_gmm_clean_prob(x, seed=0)
    assert prob.shape == x.shape and prob.dtype == np.float64
    assert not params["degenerate"]
    assert params["means"][params["clean_component"]] == min(params["means"])
    assert prob[truth].min() > 0.99
    assert prob[~truth].max() < 0.01
    np.testing.assert_allclose(prob, S.gmm_posterior_from_params(x, params), atol=1e-8)
    # reproducible for a fixed seed
    prob2, _ = S.fit_gmm_clean_prob(x, seed=0)
    np.testing.assert_array_equal(prob, prob2)


def test_fit_gmm_overlapping_posterior_matches_formula():
    rng = np.random.default_rng(3)
    x = S.minmax_normalise(np.concatenate([rng.normal(0.3, 0.2, 200), rng.normal(0.6, 0.2, 200)]))
    prob, params = S.fit_gmm_clean_prob(x, seed=1)
    assert np.all((prob >= 0) & (prob <= 1))
    np.testing.assert_allclose(prob, S.gmm_posterior_from_params(x, params), atol=1e-8)


@pytest.mark.parametrize("x", [np.array([]), np.array([0.3]), np.zeros(10), np.full(4, 0.5)])
def test_fit_gmm_degenerate(x):
    prob, params = S.fit_gmm_clean_prob(x)
    assert params["degenerate"] is True
    assert np.array_equal(prob, np.ones(x.size))
    assert not np.isnan(prob).any()
    assert np.array_equal(S.gmm_posterior_from_params(x, params), np.ones(x.size))


def test_gmm_posterior_by_hand():
    params = {"means": [0.0, 1.0], "variances": [0.25, 0.25], "weights": [0.5, 0.5]}
    # midpoint of equal components: posterior 0.5; symmetric points mirror
    post = S.gmm_posterior_from_params(np.array([0.5, 0.0, 1.0]), params)
    assert post[0] == pytest.approx(0.5)
    assert post[1] == pytest.approx(1 - post[2])
    # by hand at x=0: ratio of N(0;1,.25) / N(0;0,.25) = exp(-2)
    assert post[1] == pytest.approx(1 / (1 + math.exp(-2)))
    # far out: no overflow, no NaN
    far = S.gmm_posterior_from_params(np.array([-1e3, 1e3]), params)
    assert np.all(np.isfinite(far))
    assert far[0] == pytest.approx(1.0) and far[1] == pytest.approx(0.0)
    # clean component given explicitly
    flipped = dict(params, means=[1.0, 0.0], clean_component=1)
    np.testing.assert_allclose(S.gmm_posterior_from_params(np.array([0.0]), flipped), post[1:2])
    zero_w = dict(params, weights=[1.0, 0.0])
    assert S.gmm_posterior_from_params(np.array([1.0]), zero_w)[0] == pytest.approx(1.0)


def test_running_mean_update():
    prev = {"means": [0.1, 0.7], "variances": [0.01, 0.02], "weights": [0.6, 0.4],
            "clean_component": 0, "degenerate": False}
    new = {"means": [0.9, 0.3], "variances": [0.04, 0.03], "weights": [0.5, 0.5],
           "clean_component": 1, "degenerate": False}
    out = S.running_mean_update(prev, new, 0.75)
    assert out["clean_component"] == 0
    np.testing.assert_allclose(out["means"], [0.75 * 0.1 + 0.25 * 0.3, 0.75 * 0.7 + 0.25 * 0.9])
    np.testing.assert_allclose(out["variances"], [0.75 * 0.01 + 0.25 * 0.03,
                                                  0.75 * 0.02 + 0.25 * 0.04])
    np.testing.assert_allclose(out["weights"], [0.575, 0.425])
    first = S.running_mean_update(None, new, 0.9)
    np.testing.assert_allclose(first["means"], [0.3, 0.9])
    zero = S.running_mean_update(prev, new, 0.0)
    np.testing.assert_allclose(zero["means"], [0.3, 0.9])
    deg = {"degenerate": True, "means": [0.5, 0.5], "variances": [0, 0], "weights": [1, 0]}
    assert S.running_mean_update(prev, deg, 0.5) == prev
    post = S.gmm_posterior_from_params(np.array([0.0, 1.0]), out)
    assert post[0] > 0.99 and post[1] < 0.01
    with pytest.raises(ValueError):
        S.running_mean_update(prev, new, 1.5)


def test_loss_history_average():
    hist = [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 6.0])]
    np.testing.assert_allclose(S.loss_history_average(hist, 2), [4.0, 5.0])
    np.testing.assert_allclose(S.loss_history_average(hist, 5), [3.0, 4.0])
    np.testing.assert_allclose(S.loss_history_average(np.stack(hist), 1), [5.0, 6.0])
    np.testing.assert_allclose(S.loss_history_average(np.array([1.0, 2.0]), 5), [1.0, 2.0])
    np.testing.assert_allclose(S.loss_history_average([torch.tensor([1.0, 3.0])], 5), [1.0, 3.0])
    with pytest.raises(ValueError):
        S.loss_history_average(hist, 0)
    with pytest.raises(ValueError):
        S.loss_history_average([], 3)


def test_ood_metrics():
    assert S.ood_metrics(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == \
        {"ood_precision": 0.5, "ood_recall": 0.5}
    assert S.ood_metrics(np.zeros(3, bool), np.zeros(3, bool)) == {"ood_precision": 0.0, "ood_recall": 0.0}
    assert S.ood_metrics(torch.tensor([True, False]), torch.tensor([True, True]))["ood_recall"] == 0.5


def test_selection_metrics():
    selected = np.array([True, True, False, False, True])
    truth = np.array([True, False, True, False, True])
    score = np.array([0.9, 0.6, 0.4, 0.1, 0.8])
    m = S.selection_metrics(selected, score, truth)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    # AUC by pair counting: clean scores {0.9, 0.4, 0.8} vs noisy {0.6, 0.1}: 5 of 6 pairs
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["n_selected"] == 3
    empty = S.selection_metrics(np.zeros(5, bool), score, truth)
    assert empty["precision"] == 0.0 and empty["recall"] == 0.0
    one_class = S.selection_metrics(selected, score, np.ones(5, bool))
    assert math.isnan(one_class["auc"]) and one_class["precision"] == 1.0
    none_clean = S.selection_metrics(selected, score, np.zeros(5, bool))
    assert none_clean["recall"] == 0.0 and math.isnan(none_clean["auc"])
    t = S.selection_metrics(torch.tensor(selected), torch.tensor(score), torch.tensor(truth))
    assert t["auc"] == pytest.approx(5 / 6)


def test_per_class_threshold_mask():
    # class 0 easy (scores high), class 1 hard (all below the base threshold)
    score = np.array([0.9, 0.8, 0.95, 0.2, 0.1, 0.3, 0.05])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    mask = S.per_class_threshold_mask(score, labels, 3, 0.5)
    # class 0: threshold min(0.5, median 0.9) = 0.5 -> all selected
    # class 1: sorted [0.05, 0.1, 0.2, 0.3], lower median 0.1 -> 0.1, 0.2, 0.3 selected
    assert mask.tolist() == [True, True, True, True, True, True, False]
    # a global threshold would starve class 1 entirely
    assert not (score[labels == 1] > 0.5).any()
    strict = S.per_class_threshold_mask(score, labels, 3, 0.5, quantile=1.0)
    assert strict.tolist() == [True, True, True, False, False, True, False]
    assert S.per_class_threshold_mask(np.array([]), np.array([], int), 3, 0.5).size == 0
    # every class keeps at least half its samples
    rng = np.random.default_rng(0)
    sc = rng.random(1000) * 0.4
    lb = rng.integers(0, 10, 1000)
    m = S.per_class_threshold_mask(sc, lb, 10, 0.9)
    for c in range(10):
        assert m[lb == c].sum() >= math.ceil((lb == c).sum() / 2)


def test_blend_clean_prob():
    out = S.blend_clean_prob(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.25)
    np.testing.assert_allclose(out, [0.75, 0.25])
    np.testing.assert_allclose(S.blend_clean_prob([0.3], torch.tensor([0.9]), 0.0), [0.3])
    np.testing.assert_allclose(S.blend_clean_prob([0.3], [0.9], 1.0), [0.9])
    with pytest.raises(ValueError):
        S.blend_clean_prob([0.3], [0.9], 1.5)


def test_gmm_separation_is_ashmans_d_and_ignores_a_sliver():
    from cdmix.selection import gmm_separation

    params = {"means": [0.1, 0.7], "variances": [0.01, 0.03], "weights": [0.6, 0.4]}
    assert gmm_separation(params) == pytest.approx(0.6 / np.sqrt(0.02))
    assert gmm_separation({**params, "weights": [0.98, 0.02]}) == 0.0  # a few outliers are not a split
    assert gmm_separation({**params, "degenerate": True}) == 0.0


def test_warmup_decision_floor_threshold_patience_ceiling_cap():
    from cdmix.selection import warmup_decision

    def decide(seps, per_epoch=10, lo=30, hi=1000, cap=100):
        return warmup_decision(seps, per_epoch, lo, hi, cap)

    assert decide([5.0, 5.0]) is None  # 20 steps: below the 30-step floor, however separated
    assert decide([5.0, 5.0, 5.0]) == "separated"
    assert decide([1.0, 1.5, 2.0, 2.5]) is None  # still improving
    assert decide([1.0, 2.0, 2.6, 2.0, 1.6, 1.2]) == "separation stopped improving"
    assert decide([1.0] * 5, hi=50) == "step ceiling"
    assert decide([1.0] * 3, cap=3) == "epoch cap"
    assert decide([]) is None
