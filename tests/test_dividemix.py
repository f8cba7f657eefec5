"""DivideMix method behaviour on a tiny real dataset (sklearn digits)."""

import numpy as np
import pytest
import torch

from cdmix.config import Config, resolve
from cdmix.data.batches import DeviceImages
from cdmix.data.noise import make_noisy_labels
from cdmix.data.sources import load_source
from cdmix.engine import seed_epoch
from cdmix.methods.base import TrainSet
from cdmix.methods.dividemix import DivideMix


@pytest.fixture(scope="module")
def train_set():
    raw = load_source("digits", "unused")
    keep = np.arange(300)
    true = raw.train_labels[keep]
    noisy = make_noisy_labels(true, 10, "sym", 0.4, seed=0)
    images = DeviceImages(raw.train_images[keep], raw.mean, raw.std, "cpu")
    return TrainSet(images, torch.as_tensor(noisy), torch.as_tensor(true), keep, 10)


def make(train_set, **kw):
    config = resolve(Config(**{"width": 8, "batch_size": 32, "warmup": 1, "epochs": 4, "progress": False, **kw}), 10, 8)
    torch.manual_seed(0)
    return DivideMix(config, train_set)


def test_warmup_then_codivide_order(train_set, monkeypatch):
    method = make(train_set)
    row = method.train_epoch(seed_epoch(method.config, 0))
    assert "labeled_net1" not in row and np.isfinite(row["train_loss"])
    calls = []
    original = method.train_net

    def spy(a, b, clean_prob, ctx):
        calls.append((a, b, clean_prob.copy()))
        return original(a, b, clean_prob, ctx)

    monkeypatch.setattr(method, "train_net", spy)
    row = method.train_epoch(seed_epoch(method.config, 1))
    division = method.last_division
    # net1 (0) is trained on net2's division, then net2 (1) on net1's.
    assert [(a, b) for a, b, _ in calls] == [(0, 1), (1, 0)]
    np.testing.assert_array_equal(calls[0][2], division["clean_prob_net2"])
    np.testing.assert_array_equal(calls[1][2], division["clean_prob_net1"])
    np.testing.assert_allclose(division["clean_prob"], (division["clean_prob_net1"] + division["clean_prob_net2"]) / 2)
    assert row["labeled_net1"] == int((division["clean_prob_net1"] > 0.5).sum())
    for key in ("lx_net1", "lu_net1", "penalty_net1", "sel_auc_net1", "lambda_u_eff"):
        assert np.isfinite(row[key]), key
    # λu ramps from the end of warm-up: epoch 1, warm-up 1 → at most 1/16 of λu.
    assert 0 < row["lambda_u_eff"] <= 25 / 16


def test_empty_labeled_set_falls_back_and_does_not_nan(train_set, caplog):
    method = make(train_set, p_threshold=1.01)  # nothing can pass
    method.train_epoch(seed_epoch(method.config, 0))
    with caplog.at_level("WARNING", logger="cdmix"):
        row = method.train_epoch(seed_epoch(method.config, 1))
    assert "most likely clean instead" in caplog.text
    assert row["labeled_net1"] == 0 and row["labeled_used_net1"] == 32
    assert np.isfinite(row["loss_net1"]) and np.isfinite(row["loss_net2"])


def test_empty_unlabeled_set(train_set):
    method = make(train_set, p_threshold=-1.0)  # everything labeled
    method.train_epoch(seed_epoch(method.config, 0))
    row = method.train_epoch(seed_epoch(method.config, 1))
    assert row["labeled_used_net1"] == len(train_set)
    assert row["lu_net1"] == 0 and np.isfinite(row["loss_net1"])


def test_loss_history_averages_last_epochs(train_set):
    method = make(train_set, loss_history=3)
    method.train_epoch(seed_epoch(method.config, 0))
    for epoch in (1, 2, 3):
        method.train_epoch(seed_epoch(method.config, epoch))
    history = method.loss_history[0]
    assert len(history) == 3
    np.testing.assert_allclose(method.last_division["loss_net1"], np.mean(history, axis=0))


def test_faithful_coguess_updates_net_bn_stats_partner_untouched(train_set):
    method = make(train_set)
    net, partner = method.nets
    net.train()
    partner.eval()
    u = train_set.images.batch(torch.arange(16), augment=False)
    bn = lambda m: [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    before_net, before_partner = bn(net), bn(partner)
    with torch.no_grad():
        guess = method.guess_unlabeled(net, partner, u, u)
    assert torch.allclose(guess.sum(1), torch.ones(16))
    assert any(not torch.equal(a, b) for a, b in zip(before_net, bn(net)))  # train-mode forwards (official)
    assert all(torch.equal(a, b) for a, b in zip(before_partner, bn(partner)))


def test_fast_variant_agrees_where_it_should(train_set):
    """Eval-mode nets give the same guesses batched or not; train-mode BN statistics differ by design."""
    faithful, fast = make(train_set), make(train_set, faithful_order=False)
    fast.nets[0].load_state_dict(faithful.nets[0].state_dict())
    fast.nets[1].load_state_dict(faithful.nets[1].state_dict())
    u1 = train_set.images.batch(torch.arange(16), augment=False)
    u2 = train_set.images.batch(torch.arange(16, 32), augment=False)
    for m in (faithful, fast):
        m.nets[0].eval()
        m.nets[1].eval()
    with torch.no_grad():
        a = faithful.guess_unlabeled(faithful.nets[0], faithful.nets[1], u1, u2)
        b = fast.guess_unlabeled(fast.nets[0], fast.nets[1], u1, u2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_warmup_measures_decides_and_keeps_the_decision_in_its_state(train_set, monkeypatch):
    # 300 samples at batch 2 x 32: 5 steps per warm-up epoch; floor 10 steps, ceiling 15: ends after 3 at the latest.
    method = make(train_set, warmup="auto", warmup_min_steps=10, warmup_max_steps=15, epochs=10)
    assert method.warmup_end is None and method.warmup_steps_per_epoch() == 5
    rows = []
    epoch = 0
    while method.warmup_end is None:
        rows.append(method.train_epoch(seed_epoch(method.config, epoch)))
        epoch += 1
    assert 2 <= epoch <= 3 and method.warmup_end == epoch and rows[-1]["warmup_end"] == 1
    assert all(np.isfinite(r["warmup_separation"]) and "labeled_net1" not in r for r in rows)
    assert method.separations == [r["warmup_separation"] for r in rows]
    assert method.summary_info()["warmup_epochs"] == epoch and method.summary_info()["warmup_rule"].startswith("auto")
    cached = [loss.clone() for loss in method.measured_losses]
    seen = []
    original = method.per_sample_losses
    monkeypatch.setattr(method, "per_sample_losses", lambda net: seen.append(net) or original(net))
    row = method.train_epoch(seed_epoch(method.config, epoch))  # the first division reuses the last measurement
    assert seen == [] and "labeled_net1" in row and method.measured_losses is None
    np.testing.assert_allclose(method.last_division["loss_net1"], (cached[0] - cached[0].min()).numpy()
                               / float(cached[0].max() - cached[0].min()), rtol=1e-6)
    # the decision is part of the checkpointed state: a resumed method replays it
    fresh = make(train_set, warmup="auto", warmup_min_steps=10, warmup_max_steps=15, epochs=10)
    fresh.load_state_dict(method.state_dict())
    assert fresh.warmup_end == epoch and fresh.separations == method.separations
    assert fresh.ramp_start(epoch + 1) == epoch


def test_auto_warmup_cut_by_too_few_epochs_is_said_loudly(train_set, caplog):
    # 5 steps per epoch: the floor is 10 epochs (50 steps), but 6 epochs allow only 4 of warm-up.
    method = make(train_set, warmup="auto", epochs=6)
    with caplog.at_level("WARNING", logger="cdmix"):
        for epoch in range(4):
            method.train_epoch(seed_epoch(method.config, epoch))
    assert method.warmup_end == 4 and method.warmup_reason == "auto: epoch cap"
    assert "--epochs 6 cut the automatic warm-up to 4 epoch(s), 20 steps per net, below its 50-step floor" in caplog.text
