"""The hybrid (REFERENCE §4): JS selection on the averaged prediction, mean teachers, stabilisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cdmix
from cdmix import losses as L
from cdmix.config import Config, resolve
from cdmix.data.batches import DeviceImages
from cdmix.methods.averaging import ema_decay
from cdmix.methods.base import EpochContext, TrainSet
from cdmix.methods.hybrid import Hybrid, late_fraction
from cdmix.selection import blend_clean_prob, fit_gmm_clean_prob, running_mean_update


pytestmark = pytest.mark.usefixtures("one_thread")


def make_train(n=64, classes=4, seed=0, size=8):
    rng = np.random.default_rng(seed)
    true = np.arange(n) % classes
    # Images that carry their class a little, so the nets learn something in a few steps.
    images = rng.integers(0, 120, size=(n, size, size, 1)).astype(np.int64)
    images[np.arange(n), true, :, 0] += 120
    labels = true.copy()
    labels[: n // 4] = (labels[: n // 4] + 1) % classes
    return TrainSet(images=DeviceImages(images.astype(np.uint8), (0.3,), (0.25,), "cpu"),
                    labels=torch.as_tensor(labels), true_labels=torch.as_tensor(true),
                    index=np.arange(n), num_classes=classes)


def make_hybrid(train=None, **overrides):
    train = train or make_train()
    settings = dict(dataset="digits", method="hybrid", model="small_cnn", width=4, warmup=1, epochs=6, batch_size=16,
                    device="cpu", progress=False, rampup_epochs=1)
    settings.update(overrides)
    config = resolve(Config(**settings), train.num_classes, train.images.shape[-1])
    torch.manual_seed(0)
    return Hybrid(config, train)


def ctx(epoch, seed=0):
    return EpochContext(epoch=epoch, generator=torch.Generator().manual_seed(seed + epoch),
                        rng=np.random.default_rng(seed + epoch), progress=False)


def test_selection_is_js_of_averaged_prediction_with_report_tau():
    m = make_hybrid(tau_clean_max=0.8)
    row = {}
    scores = m.divide(ctx(1), row)
    l1, l2 = m.predict_logits(m.train.images, 32, nets=m.nets)
    p = F.softmax((l1 + l2) / 2, 1)
    smoothed = L.smooth_labels(m.train.labels, 4, 0.6)
    m_ = (p + smoothed) / 2
    js_nats = 0.5 * (p * (p / m_).log()).sum(1) + 0.5 * (smoothed * (smoothed / m_).log()).sum(1)
    expected = (1 - (js_nats / math.log(2)).clamp(0, 1)).numpy()
    np.testing.assert_allclose(scores[0], expected, atol=1e-5)
    assert scores[0] is scores[1]
    assert row["tau_clean"] == pytest.approx(L.tau_clean_report(1, 1, 0.8))
    assert np.array_equal(m.selected, scores[0] > row["tau_clean"])
    assert row["labeled_net1"] == int(m.selected.sum())
    assert "sel_auc_net1" in row and np.array_equal(m.clean_prob(), scores[0])


def test_warmup_updates_teachers_and_keeps_ce():
    m = make_hybrid(warmup=2)
    before = [p.clone() for p in m.teachers[0].parameters()]
    row = m.train_epoch(ctx(0))
    assert "labeled_net1" not in row and math.isfinite(row["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.teachers[0].parameters()))


def test_full_epoch_finite_metrics_and_teacher_ema():
    m = make_hybrid()
    m.train_epoch(ctx(0))
    row = m.train_epoch(ctx(1))
    for key in ("lx_net1", "lu_net1", "lcons_net1", "penalty_net1", "lambda_u_eff", "tau_clean", "train_loss"):
        assert math.isfinite(row[key]), key
    gaps = [(t - n).abs().max() for t, n in zip(m.teachers[0].parameters(), m.nets[0].parameters())]
    assert max(gaps) > 0


def test_no_nan_with_empty_or_full_selection():
    empty = make_hybrid(tau_clean_max=1.0)  # P_clean > 1 is impossible: nothing selected
    empty.train_epoch(ctx(0))
    row = empty.train_epoch(ctx(1))
    assert row["labeled_net1"] == 0 and math.isfinite(row["train_loss"])
    full = make_hybrid(tau_clean_max=0.0)  # everything selected: no unlabeled batch
    full.train_epoch(ctx(0))
    row = full.train_epoch(ctx(1))
    assert row["labeled_net1"] == 64 and row["lu_net1"] == 0.0 and math.isfinite(row["train_loss"])
    for net in full.nets + empty.nets:
        assert all(torch.isfinite(p).all() for p in net.parameters())


def test_temperature_decay_lowers_sharpening_late():
    assert late_fraction(1, 1, 11) == 0.0 and late_fraction(5, 1, 11) == 0.0 and late_fraction(6, 1, 11) > 0
    assert late_fraction(10, 1, 11) == 1.0
    m = make_hybrid(epochs=11, stab_temperature_decay=True)
    assert m.temperature(2) == 0.5 and m.lambda_u_scale(2) == 1.0
    assert m.temperature(10) == pytest.approx(1.0) and m.lambda_u_scale(10) == pytest.approx(0.5)
    assert 0.5 < m.temperature(8) < 1.0
    plain = make_hybrid(epochs=11)
    assert plain.temperature(10) == 0.5 and plain.lambda_u_scale(10) == 1.0
    q = torch.tensor([[0.6, 0.3, 0.1]])
    assert L.sharpen(q, m.temperature(10)).max() < L.sharpen(q, m.temperature(2)).max()


def _pseudo(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    u1 = torch.randn(8, 1, 8, 8, generator=g)
    u2 = u1 + 0.1 * torch.randn(8, 1, 8, 8, generator=g)
    return m.pseudo_labels(u1, u2)


def test_teacher_cap_limits_max_prob_and_soft_ood_flattens():
    base = make_hybrid()
    for t in base.teachers:  # confident teachers
        last = [mod for mod in t.modules() if isinstance(mod, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(30.0)
    q = _pseudo(base)
    assert float(q.max()) > 0.9
    capped = make_hybrid(stab_teacher_cap=0.7)
    soft = make_hybrid(stab_soft_ood=True)
    for other in (capped, soft):
        for t, src in zip(other.teachers, base.teachers):
            t.load_state_dict(src.state_dict())
    qc, qs = _pseudo(capped), _pseudo(soft)
    assert float(qc.max()) <= 0.7 + 1e-6 and torch.equal(qc.argmax(1), q.argmax(1))
    assert torch.allclose(qc.sum(1), torch.ones(8))
    assert torch.all(qs.max(1).values <= q.max(1).values + 1e-6) and float((q - qs).abs().max()) > 0


def test_running_mean_gmm_smooths_statistics():
    m = make_hybrid(stab_gmm_running_mean=True)
    assert m.blend_weight() == 0.5
    m.divide(ctx(1), {})
    first = dict(m.gmm_state)
    m.train_epoch(ctx(1))  # nets change, so the second fit differs
    row = {}
    m.divide(ctx(2), row)
    raw, params = fit_gmm_clean_prob(m.last_division["loss_net1"], seed=0)
    expected = running_mean_update(first, params, 0.9)
    np.testing.assert_allclose(m.gmm_state["means"], expected["means"])
    clean_raw = min(params["means"])
    # the smoothed clean mean sits between last epoch's and this epoch's fit
    lo, hi = sorted([first["means"][0], clean_raw])
    assert lo - 1e-12 <= m.gmm_state["means"][0] <= hi + 1e-12
    assert row["gmm_mean_clean_net1"] == pytest.approx(m.gmm_state["means"][0])


def test_blended_selection_changes_clean_prob():
    m = make_hybrid(stab_blend_selection=0.3)
    m.train_epoch(ctx(0))
    row = {}
    score = m.divide(ctx(1), row)[0]
    div = m.last_division
    np.testing.assert_allclose(score, blend_clean_prob(div["gmm_prob"], div["js_clean_likelihood"], 0.3))
    assert not np.allclose(score, div["js_clean_likelihood"])
    assert row["threshold"] == pytest.approx(0.7 * 0.5 + 0.3 * row["tau_clean"])


def test_per_class_threshold_keeps_every_class():
    m = make_hybrid(stab_per_class_threshold=True, tau_clean_max=0.999)
    m.divide(ctx(1), {})
    labels = m.train.labels.numpy()
    for k in range(4):
        assert m.selected[labels == k].mean() >= 0.5
    plain = make_hybrid(tau_clean_max=0.999)
    plain.divide(ctx(1), {})
    assert plain.selected.sum() < m.selected.sum()


def test_second_warmup_schedule_and_teacher_reset():
    m = make_hybrid(warmup=1, epochs=7, stab_second_warmup=2)
    assert m.second_warmup_start() == 4
    assert [m.in_second_warmup(e) for e in range(7)] == [False] * 4 + [True, True, False]
    assert m.ramp_start(3) == 1 and m.ramp_start(6) == 6
    row = m.train_epoch(ctx(4))
    assert row["second_warmup"] == 1 and "lu_net1" not in row
    row = m.train_epoch(ctx(5))
    for t, n in zip(m.teachers, m.nets):
        assert all(torch.equal(a, b) for a, b in zip(t.parameters(), n.parameters()))


def test_slow_ema_and_swa():
    m = make_hybrid(stab_slow_ema=0.999, stab_swa_start=1)
    assert ema_decay(m.config, 0) == 0.99 and ema_decay(m.config, 1) == 0.999
    m.train_epoch(ctx(0))
    assert m.eval_nets() is m.nets
    snap1 = [p.clone() for p in m.nets[0].parameters()]
    m.train_epoch(ctx(1))
    snap2 = [p.clone() for p in m.nets[0].parameters()]
    row = m.train_epoch(ctx(2))
    assert row["swa_count"] == 2 and m.eval_nets() is m.swa.nets
    for avg, a, b in zip(m.swa.nets[0].parameters(), snap2, m.nets[0].parameters()):
        assert torch.allclose(avg, (a + b) / 2, atol=1e-6)
    del snap1


def _step_parts(m, seed=0):
    m.selected = np.arange(64) % 2 == 0
    idx_x, idx_u = m.labeled_split(np.full(64, 0.7), "t")
    weights = torch.full((64,), 0.7)
    return tuple(v.detach() for v in m.loss_parts(0, 1, idx_x[:16], idx_u[:16], weights, 5.0, ctx(3, seed)))


def test_confidence_penalty_and_label_smoothing_enter_the_loss():
    total, lx, *_ = _step_parts(make_hybrid())
    pen_total, pen_lx, *_ = _step_parts(make_hybrid(stab_confidence_penalty=0.5))
    assert float(pen_lx) == pytest.approx(float(lx), rel=1e-5)
    assert float(pen_total) < float(total)  # + 0.5·mean Σ p log p (a negative entropy)
    _, ls_lx, *_ = _step_parts(make_hybrid(stab_label_smoothing=0.3))
    assert float(ls_lx) != pytest.approx(float(lx), rel=1e-5)
    strong = _step_parts(make_hybrid(stab_strong_aug=True))
    assert all(math.isfinite(float(v)) for v in strong)
    no_cons = _step_parts(make_hybrid(lambda_cons=0.0))
    assert float(no_cons[4]) == 0.0


def test_state_roundtrip():
    m = make_hybrid(stab_gmm_running_mean=True, stab_swa_start=1)
    m.train_epoch(ctx(0))
    m.train_epoch(ctx(1))
    other = make_hybrid(stab_gmm_running_mean=True, stab_swa_start=1)
    other.load_state_dict(m.state_dict())
    assert other.gmm_state == m.gmm_state and other.swa.count == 1
    assert np.array_equal(other.selected, m.selected)
    for a, b in zip(m.teachers[1].parameters(), other.teachers[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("extra", [{}, {"stab_temperature_decay": True, "stab_teacher_cap": 0.9,
                                        "stab_gmm_running_mean": True, "stab_per_class_threshold": True,
                                        "stab_strong_aug": True, "stab_soft_ood": True, "stab_swa_start": 3,
                                        "stab_label_smoothing": 0.1, "stab_confidence_penalty": 0.1,
                                        "stab_slow_ema": 0.995}])
def test_end_to_end_hybrid(tmp_path, extra):
    result = cdmix.train(Config(dataset="digits", method="hybrid", epochs=6, warmup=3, out=str(tmp_path / "run"),
                                progress=False, width=8, **extra))
    # It learns: 10 classes, so chance is 10%; seeds 0-4 reach 31-47% (with and without stabilisers).
    assert result.test_acc_last > 20.0
    for row in result.metrics[3:]:
        for key in ("train_loss", "lcons", "tau_clean", "sel_auc_net1", "test_acc"):
            assert math.isfinite(row[key]), key
    assert (result.run_dir / "label_issues.csv").is_file()
    division = np.load(result.run_dir / "division.npz")
    assert division["clean_prob"].shape == (result.summary["num_train"],)
