"""Tests for cdmix.losses: values by hand or by independent formulas, edge cases, bf16 safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdmix import losses as L


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ------------------------------------------------------------------ sharpen / co-refine / guess


def test_sharpen_by_hand():
    out = L.sharpen(torch.tensor([[0.2, 0.8]]), 0.5)
    assert close(out, [[0.04 / 0.68, 0.64 / 0.68]])


def test_sharpen_t1_renormalises_and_zero_row_safe():
    out = L.sharpen(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), 1.0)
    assert close(out[0], [0.25, 0.75])
    assert torch.equal(out[1], torch.zeros(2))
    tiny = L.sharpen(torch.tensor([[1e-30, 2e-30, 0.0]]), 0.1)
    assert torch.isfinite(tiny).all() and close(tiny.sum(), 1.0)
    with pytest.raises(ValueError):
        L.sharpen(torch.tensor([[0.5, 0.5]]), 0.0)


def test_co_refine_by_hand():
    p1 = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    p2 = torch.tensor([[0.2, 0.8], [0.1, 0.9]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([0.5, 1.0])
    # row 0: p = [0.4, 0.6]; p' = 0.5*[1,0] + 0.5*[0.4,0.6] = [0.7, 0.3]; T=1 -> unchanged
    out = L.co_refine(p1, p2, y, w, 1.0)
    assert close(out, [[0.7, 0.3], [0.0, 1.0]])
    out_col = L.co_refine(p1, p2, y, w.view(2, 1), 0.5)
    assert close(out_col[0], [0.49 / 0.58, 0.09 / 0.58])


def test_co_guess_mean_then_sharpen():
    ps = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]),
          torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]])]
    assert close(L.co_guess(ps, 0.5), [[0.5, 0.5]])
    ps2 = [torch.tensor([[0.2, 0.8]]), torch.tensor([[0.2, 0.8]])]
    assert close(L.co_guess(ps2, 0.5), [[0.04 / 0.68, 0.64 / 0.68]])
    with pytest.raises(ValueError):
        L.co_guess([], 0.5)


# ------------------------------------------------------------------ mixup


def test_mixup_lam_one_identity_and_formula():
    x = torch.arange(12.0).view(4, 3)
    t = torch.eye(4)
    perm = torch.tensor([3, 2, 1, 0])
    mx, mt = L.mixup(x, t, 1.0, perm)
    assert torch.equal(mx, x) and torch.equal(mt, t)
    mx, mt = L.mixup(x, t, 0.75, perm)
    assert close(mx, 0.75 * x + 0.25 * x.flip(0))
    assert close(mt, 0.75 * t + 0.25 * t.flip(0))
    assert close(mt.sum(1), torch.ones(4))


def test_sample_mix_lambda_reproducible_and_in_range():
    a = [L.sample_mix_lambda(4.0, np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    expected = np.random.default_rng(7).beta(4.0, 4.0)
    assert a[0] == pytest.approx(max(expected, 1 - expected))
    rng = np.random.default_rng(0)
    draws = [L.sample_mix_lambda(4.0, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in draws)
    assert len(set(draws)) > 150
    assert L.sample_mix_lambda(4.0, 7) == a[0]
    with pytest.raises(ValueError):
        L.sample_mix_lambda(0.0, rng)


# ------------------------------------------------------------------ DivideMix losses


def test_soft_cross_entropy_matches_hard_ce_and_hand_value():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 3, 1, 2, 2])
    assert close(L.soft_cross_entropy(z, F.one_hot(y, 4).float()), F.cross_entropy(z, y))
    # uniform logits, any target distribution: CE = log C
    assert close(L.soft_cross_entropy(torch.zeros(2, 4), torch.full((2, 4), 0.25)), math.log(4))
    per = L.soft_cross_entropy(z, F.one_hot(y, 4).float(), reduction="none")
    assert per.shape == (5,)
    assert close(L.soft_cross_entropy(z, F.one_hot(y, 4).float(), reduction="sum"), per.sum())
    empty = L.soft_cross_entropy(torch.zeros(0, 4), torch.zeros(0, 4))
    assert empty.item() == 0.0
    with pytest.raises(ValueError):
        L.soft_cross_entropy(z, z, reduction="bad")


def test_mse_consistency_mean_over_samples_and_classes():
    z = torch.zeros(2, 4)  # softmax = 0.25 everywhere
    t = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    # squared errors: row0 0.5625 + 3*0.0625 = 0.75, row1 0 -> sum 0.75 over 8 entries
    assert close(L.mse_consistency(z, t), 0.75 / 8)
    assert L.mse_consistency(torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0.0


def test_linear_rampup_fixed_points():
    assert L.linear_rampup(5, 10) == 0.0
    assert L.linear_rampup(10, 10) == 0.0
    assert L.linear_rampup(14, 10) == pytest.approx(0.25)
    assert L.linear_rampup(18.0, 10) == pytest.approx(0.5)
    assert L.linear_rampup(26, 10) == 1.0
    assert L.linear_rampup(300, 10) == 1.0
    assert L.linear_rampup(12, 10, rampup_epochs=4) == pytest.approx(0.5)
    assert L.linear_rampup(10, 10, rampup_epochs=0) == 1.0
    assert L.linear_rampup(9.9, 10, rampup_epochs=0) == 0.0


def test_uniform_prior_penalty_zero_for_uniform_mean_and_kl_otherwise():
    # two rows whose softmax means are uniform
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert abs(L.uniform_prior_penalty(z).item()) < 1e-7
    z2 = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert L.uniform_prior_penalty(z2).item() == pytest.approx(kl, abs=1e-6)
    assert L.uniform_prior_penalty(z2).item() > 0
    # extreme logits: a class with mean prob ~0 stays finite
    assert torch.isfinite(L.uniform_prior_penalty(torch.tensor([[1e4, -1e4, 0.0]])))
    assert L.uniform_prior_penalty(torch.zeros(0, 3)).item() == 0.0


def test_neg_entropy_penalty():
    z = torch.zeros(3, 4)
    assert L.neg_entropy_penalty(z).item() == pytest.approx(-math.log(4), abs=1e-6)
    # one-hot-like prediction: entropy 0, and probs of exactly 0 do not give NaN
    big = torch.tensor([[1e4, -1e4, -1e4]], requires_grad=True)
    val = L.neg_entropy_penalty(big)
    assert abs(val.item()) < 1e-6
    val.backward()
    assert torch.isfinite(big.grad).all()
    assert L.neg_entropy_penalty(torch.zeros(0, 4)).item() == 0.0


def test_dividemix_loss_composition():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, generator=g, requires_grad=True)
    t = torch.softmax(torch.randn(8, 5, generator=g), 1)
    total, lx, lu, pen = L.dividemix_loss(z, t, 4, 2.5)
    assert close(lx, -(t[:4] * F.log_softmax(z[:4], 1)).sum(1).mean())
    assert close(lu, ((torch.softmax(z[4:], 1) - t[4:]) ** 2).mean())
    mean_p = torch.softmax(z, 1).mean(0)
    assert close(pen, (0.2 * torch.log(0.2 / mean_p)).sum())
    assert close(total, lx + 2.5 * lu + pen)
    total.backward()
    assert torch.isfinite(z.grad).all()


def test_dividemix_loss_missing_parts_are_zero():
    z = torch.randn(6, 3, requires_grad=True)
    t = torch.full((6, 3), 1 / 3)
    total, lx, lu, pen = L.dividemix_loss(z, t, 0, 10.0)
    assert lx.item() == 0.0 and torch.isfinite(total)
    total, lx, lu, pen = L.dividemix_loss(z, t, 6, 10.0)
    assert lu.item() == 0.0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(z.grad).all()
    total, lx, lu, pen = L.dividemix_loss(torch.zeros(0, 3), torch.zeros(0, 3), 0, 1.0)
    assert total.item() == 0.0
    with pytest.raises(ValueError):
        L.dividemix_loss(z, t, 7, 1.0)


def test_dividemix_loss_bf16_no_nan():
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(16, 10, generator=g) * 50).bfloat16().requires_grad_()
    t = torch.softmax(torch.randn(16, 10, generator=g), 1)
    total, lx, lu, pen = L.dividemix_loss(z, t, 8, 25.0)
    assert total.dtype == torch.float32
    assert all(torch.isfinite(v) for v in (total, lx, lu, pen))
    total.backward()
    assert torch.isfinite(z.grad.float()).all()


# ------------------------------------------------------------------ Jo-SRC


def test_smooth_labels():
    out = L.smooth_labels(torch.tensor([0, 2]), 4, 0.6)
    assert close(out, [[0.4, 0.2, 0.2, 0.2], [0.2, 0.2, 0.4, 0.2]])
    assert close(out.sum(1), [1.0, 1.0])
    assert torch.equal(L.smooth_labels(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.equal(L.smooth_labels(torch.tensor([0]), 1, 0.6), torch.ones(1, 1))


def _js_reference(p, q):
    """Independent JS in base 2 via scipy-free float64 numpy, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_js_divergence_base2_values():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    js = L.js_divergence_base2(p, p)
    assert close(js, [0.0, 0.0])
    one_hots = torch.eye(3)
    assert close(L.js_divergence_base2(one_hots, one_hots.roll(1, 0)), [1.0, 1.0, 1.0])
    a = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    b = torch.tensor([[0.1, 0.3, 0.6], [1.0, 0.0, 0.0]])
    ref = [_js_reference(a[i], b[i]) for i in range(2)]
    assert close(L.js_divergence_base2(a, b), ref)
    assert close(L.js_divergence_base2(b, a), ref)  # symmetric


def test_js_gradient_safe_at_zero():
    z = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    p = torch.softmax(z, 1)
    js = L.js_divergence_base2(p, L.smooth_labels(torch.tensor([1]), 3, 0.0))
    js.sum().backward()
    assert torch.isfinite(js).all() and torch.isfinite(z.grad).all()


def test_clean_likelihood():
    y = L.smooth_labels(torch.tensor([0, 1]), 2, 0.0)
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert close(L.clean_likelihood(probs, y), [1.0, 0.0])
    ys = L.smooth_labels(torch.tensor([2]), 3, 0.6)
    assert close(L.clean_likelihood(ys, ys), [1.0])


def test_symmetric_kl():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.75, 0.25]])
    kl_pq = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_qp = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert close(L.symmetric_kl(p, q, base2=False), [kl_pq + kl_qp])
    assert close(L.symmetric_kl(p, q), [(kl_pq + kl_qp) / math.log(2)])
    assert close(L.symmetric_kl(q, p), L.symmetric_kl(p, q))
    assert close(L.symmetric_kl(q, q), [0.0])
    # disjoint support: finite (official code gives inf/NaN)
    z = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    pz = torch.softmax(z, 1)
    s = L.symmetric_kl(pz[:1], pz[1:])
    assert torch.isfinite(s).all() and s.item() > 10
    s.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_josrc_split_and_targets():
    p1 = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    p2 = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8]])
    pc = torch.tensor([0.9, 0.1, 0.1])
    clean, idn, ood = L.josrc_split(p1, p2, pc, 0.5)
    assert clean.tolist() == [True, False, False]
    assert idn.tolist() == [False, True, False]
    assert ood.tolist() == [False, False, True]
    smoothed = L.smooth_labels(torch.tensor([0, 1, 1]), 2, 0.6)
    teacher = torch.tensor([[0.6, 0.4], [0.7, 0.3], [1.0, 0.0]])
    t = L.josrc_targets(clean, ood, smoothed, teacher, 10.0)
    assert close(t[0], smoothed[0])
    assert close(t[1], teacher[1])
    e0, e1 = math.exp(0.1), math.exp(0.0)
    assert close(t[2], [e0 / (e0 + e1), e1 / (e0 + e1)])
    # a sample flagged clean and OOD stays clean
    t2 = L.josrc_targets(torch.tensor([True]), torch.tensor([True]), smoothed[:1], teacher[:1])
    assert close(t2, smoothed[:1])


def test_josrc_loss_by_formula():
    g = torch.Generator().manual_seed(4)
    l1 = torch.randn(6, 3, generator=g, requires_grad=True)
    l2 = torch.randn(6, 3, generator=g, requires_grad=True)
    t = torch.softmax(torch.randn(6, 3, generator=g), 1)
    ood = torch.tensor([True, False, False, True, False, False])
    total, lc, lo = L.josrc_loss(l1, l2, t, ood, alpha=0.5)
    ce = -(t * F.log_softmax(l1, 1)).sum(1) - (t * F.log_softmax(l2, 1)).sum(1)
    p1, p2 = torch.softmax(l1, 1), torch.softmax(l2, 1)
    skl = ((p1 - p2) * (torch.log2(p1) - torch.log2(p2))).sum(1)  # KL12 + KL21 identity
    sign = torch.tensor([-1.0, 1, 1, -1, 1, 1])
    assert close(lc, ce.mean(), 1e-5)
    assert close(lo, (sign * skl).mean(), 1e-5)
    assert close(total, 0.5 * lc + 0.5 * lo, 1e-5)
    total.backward()
    assert torch.isfinite(l1.grad).all() and torch.isfinite(l2.grad).all()
    total_a, _, _ = L.josrc_loss(l1, l2, t, ood, alpha=0.2)
    assert close(total_a, 0.8 * lc + 0.2 * lo, 1e-5)


def test_josrc_soft_ood_weights_and_sample_weights():
    g = torch.Generator().manual_seed(1)
    l1, l2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    smoothed = L.smooth_labels(torch.arange(8) % 5, 5, 0.6)
    p1, p2 = l1.softmax(1), l2.softmax(1)
    p_clean = L.clean_likelihood(p1, smoothed)
    clean, _, ood = L.josrc_split(p1, p2, p_clean, float(p_clean.median()))
    teacher = torch.rand(8, 5, generator=g).softmax(1)
    # a 0/1 float weight is exactly the mask; unit sample weights change nothing
    hard = L.josrc_targets(clean, ood, smoothed, teacher, 10.0)
    assert torch.equal(hard, L.josrc_targets(clean, ood.float(), smoothed, teacher, 10.0))
    ref = L.josrc_loss(l1, l2, hard, ood, 0.5)
    for a, b in zip(ref, L.josrc_loss(l1, l2, hard, ood.float(), 0.5, sample_weight=torch.ones(8))):
        assert torch.equal(a, b)
    # soft weight o: (1 - o)·s + o·softmax(s / T) for unclean rows; Lo sign (1 - 2o)
    o = torch.linspace(0, 1, 8)
    soft = L.josrc_targets(clean, o, smoothed, teacher, 10.0)
    mixed = (1 - o[:, None]) * teacher + o[:, None] * torch.softmax(teacher / 10.0, 1)
    assert close(soft, torch.where(clean[:, None], smoothed, mixed))
    w = torch.rand(8, generator=g)
    total, lc, lo = L.josrc_loss(l1, l2, soft, o, 0.3, sample_weight=w)
    ce = -(soft * F.log_softmax(l1, 1)).sum(1) - (soft * F.log_softmax(l2, 1)).sum(1)
    skl = ((p1 - p2) * (torch.log2(p1) - torch.log2(p2))).sum(1)
    assert close(lc, (w * ce).mean(), 1e-5) and close(lo, ((1 - 2 * o) * skl).mean(), 1e-5)
    assert close(total, 0.7 * lc + 0.3 * lo, 1e-5)
    # the soft disagreement replaces the argmax test; per-sample thresholds broadcast
    score = L.soft_ood_score(p1, p2)
    c2, i2, o2 = L.josrc_split(p1, p2, p_clean, torch.full((8,), float(p_clean.median())), score)
    assert torch.equal(c2, clean) and torch.equal(o2, (score > 0.5) & ~clean) and torch.equal(i2, ~clean & ~o2)


def test_soft_ood_score_and_confidence_cap():
    agree = torch.tensor([[0.98, 0.01, 0.01]])
    other = torch.tensor([[0.01, 0.98, 0.01]])
    assert float(L.soft_ood_score(agree, agree)) < 0.05
    assert float(L.soft_ood_score(agree, other)) > 0.95
    uniform = torch.full((1, 4), 0.25)
    assert float(L.soft_ood_score(uniform, uniform)) == pytest.approx(0.75)
    p = torch.tensor([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2]])
    capped = L.cap_confidence(p, 0.8)
    assert torch.allclose(capped.sum(1), torch.ones(2))
    assert float(capped.max(1).values[0]) == pytest.approx(0.8)
    assert torch.equal(capped[1], p[1])
    assert torch.equal(capped.argmax(1), p.argmax(1))
    assert L.cap_confidence(p, 1.0) is p
    with pytest.raises(ValueError):
        L.cap_confidence(p, 0.2)


def test_josrc_loss_empty_and_bf16():
    z = torch.zeros(0, 5)
    total, lc, lo = L.josrc_loss(z, z, z, torch.zeros(0, dtype=torch.bool))
    assert total.item() == 0.0 and lc.item() == 0.0 and lo.item() == 0.0
    g = torch.Generator().manual_seed(5)
    l1 = (torch.randn(8, 10, generator=g) * 80).bfloat16().requires_grad_()
    l2 = (torch.randn(8, 10, generator=g) * 80).bfloat16().requires_grad_()
    t = L.smooth_labels(torch.arange(8) % 10, 10, 0.6)
    ood = torch.arange(8) % 2 == 0
    total, lc, lo = L.josrc_loss(l1, l2, t, ood)
    assert all(torch.isfinite(v) for v in (total, lc, lo))
    total.backward()
    assert torch.isfinite(l1.grad.float()).all() and torch.isfinite(l2.grad.float()).all()


def test_josrc_warmup_loss():
    g = torch.Generator().manual_seed(6)
    l1 = torch.randn(4, 3, generator=g, requires_grad=True)
    l2 = torch.randn(4, 3, generator=g)
    y = L.smooth_labels(torch.tensor([0, 1, 2, 0]), 3, 0.6)
    mask = torch.tensor([True, False, True, False])
    ce = -(y * F.log_softmax(l1, 1)).sum(1) - (y * F.log_softmax(l2, 1)).sum(1)
    assert close(L.josrc_warmup_loss(l1, l2, y, mask), ce[mask].mean())
    none = L.josrc_warmup_loss(l1, l2, y, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()  # still differentiable, gradient zero
    assert torch.equal(l1.grad, torch.zeros_like(l1))


def test_tau_clean_josrc_schedule():
    assert L.tau_clean_josrc(0, 10, 200) == 0.0
    assert L.tau_clean_josrc(5, 10, 200) == pytest.approx(0.375)
    assert L.tau_clean_josrc(10, 10, 200) == pytest.approx(0.75)
    # official denominator (epochs - warmup): the last epoch stops one step short of tau_max
    assert L.tau_clean_josrc(199, 10, 200) == pytest.approx(0.75 + 0.2 * 189 / 190)
    assert L.tau_clean_josrc(105, 10, 200) == pytest.approx(0.85)
    assert L.tau_clean_josrc(10, 10, 10) == pytest.approx(0.75)  # zero span guarded
    assert L.tau_clean_josrc(3, 0, 5, tau=0.5, tau_max=0.9) == pytest.approx(0.5 + 0.4 * 3 / 5)
    assert L.tau_clean_josrc(500, 10, 200) == pytest.approx(0.95)  # never beyond tau_max


def test_tau_clean_report():
    assert L.tau_clean_report(0, 10, 0.9) == 0.0
    assert L.tau_clean_report(5, 10, 0.9) == pytest.approx(0.45)
    assert L.tau_clean_report(10, 10, 0.9) == pytest.approx(0.9)
    assert L.tau_clean_report(50, 10, 0.9) == pytest.approx(0.9)
    assert L.tau_clean_report(3, 0, 0.9) == pytest.approx(0.9)


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher.train()
    teacher(torch.randn(8, 3))  # give the teacher BN running stats of its own
    with torch.no_grad():
        student[1].running_mean.fill_(5.0)
    before_t = [p.detach().clone() for p in teacher.parameters()]
    s_params = [p.detach().clone() for p in student.parameters()]
    buf_before = teacher[1].running_mean.clone()
    L.ema_update_(teacher.parameters(), student.parameters(), 0.99)
    for t, b, s in zip(teacher.parameters(), before_t, s_params):
        assert torch.allclose(t, 0.99 * b + 0.01 * s, atol=1e-7)
        assert not t.requires_grad or t.grad is None
    assert torch.equal(teacher[1].running_mean, buf_before)
    # decay 0 copies, decay 1 keeps
    L.ema_update_(teacher.parameters(), student.parameters(), 0.0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    with pytest.raises(ValueError):
        L.ema_update_(list(teacher.parameters())[:1], student.parameters(), 0.5)
