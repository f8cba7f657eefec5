"""Jo-SRC method: τ schedule, mean teacher, OOD split, stabilisers, strong augmentation, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import cdmix
from cdmix import losses as L
from cdmix.config import Config, resolve
from cdmix.data.batches import DeviceImages
from cdmix.data.strong_aug import strong_augment
from cdmix.methods.averaging import SWA, ema_decay
from cdmix.methods.base import EpochContext, TrainSet
from cdmix.methods.josrc import JoSRC


pytestmark = pytest.mark.usefixtures("one_thread")


def make_train(n=48, classes=4, seed=0, size=8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)
    true = np.arange(n) % classes
    labels = true.copy()
    labels[: n // 4] = (labels[: n // 4] + 1) % classes
    return TrainSet(images=DeviceImages(images, (0.5,), (0.25,), "cpu"),
                    labels=torch.as_tensor(labels), true_labels=torch.as_tensor(true),
                    index=np.arange(n), num_classes=classes)


def make_josrc(train=None, **overrides):
    train = train or make_train()
    settings = dict(dataset="digits", method="josrc", model="small_cnn", width=4, warmup=1, epochs=4, batch_size=16,
                    device="cpu", progress=False)
    settings.update(overrides)
    config = resolve(Config(**settings), train.num_classes, train.images.shape[-1])
    torch.manual_seed(0)
    return JoSRC(config, train)


def ctx(epoch, seed=0):
    gen = torch.Generator().manual_seed(seed + epoch)
    return EpochContext(epoch=epoch, generator=gen, rng=np.random.default_rng(seed + epoch), progress=False)


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_tau_schedule_used_each_epoch():
    m = make_josrc(warmup=2, epochs=5, tau_clean=0.5, tau_clean_max=0.9)
    for e in range(5):
        row = m.train_epoch(ctx(e))
        assert row["tau_clean"] == pytest.approx(L.tau_clean_josrc(e, 2, 5, 0.5, 0.9))
        assert all(math.isfinite(v) for v in row.values())
    assert row["tau_clean"] == pytest.approx(0.5 + 0.4 * 2 / 3)  # official: one step short of the max at the end


def test_teacher_is_ema_of_parameters():
    frozen = make_josrc(ema_decay=1.0)
    start = params(frozen.teacher)
    frozen.train_epoch(ctx(0))
    assert all(torch.equal(a, b) for a, b in zip(start, params(frozen.teacher)))
    assert not all(torch.equal(a, b) for a, b in zip(start, params(frozen.nets[0])))
    copy = make_josrc(ema_decay=0.0)
    copy.train_epoch(ctx(0))
    assert all(torch.allclose(a, b) for a, b in zip(params(copy.teacher), params(copy.nets[0])))
    usual = make_josrc()
    before = params(usual.teacher)
    usual.train_epoch(ctx(0))
    moved = [(a - b).abs().max() for a, b in zip(before, params(usual.teacher))]
    gap = [(a - b).abs().max() for a, b in zip(params(usual.teacher), params(usual.nets[0]))]
    assert max(moved) > 0 and max(gap) > 0
    assert all(not p.requires_grad for p in usual.teacher.parameters())


def test_slow_ema_after_warmup_only():
    m = make_josrc(warmup=2, stab_slow_ema=0.999)
    assert ema_decay(m.config, 0) == 0.99 and ema_decay(m.config, 1) == 0.99
    assert ema_decay(m.config, 2) == 0.999 and m.train_epoch(ctx(2))["ema_decay"] == 0.999
    assert ema_decay(make_josrc(warmup=2).config, 3) == 0.99


def test_teacher_cap_and_soft_ood_change_training():
    none_clean = dict(warmup=0, tau_clean=1.0, tau_clean_max=1.0)
    models = [make_josrc(**none_clean), make_josrc(**none_clean, stab_teacher_cap=0.3),
              make_josrc(**none_clean, stab_soft_ood=True)]
    for m in models:  # a confident teacher, so that the cap binds
        last = [mod for mod in m.teacher.modules() if isinstance(mod, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(100.0)
    rows = [m.train_epoch(ctx(0)) for m in models]
    assert rows[0]["train_loss"] != rows[1]["train_loss"]
    assert rows[0]["train_loss"] != rows[2]["train_loss"]
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_no_nan_when_nothing_or_everything_is_clean():
    nothing = make_josrc(warmup=3, tau_clean=1.0, tau_clean_max=1.0)
    row = nothing.train_epoch(ctx(1))  # warm-up with tau 1/3 ... then none selected at tau 1
    row = nothing.train_epoch(ctx(3))
    assert row["frac_clean"] == 0.0 and all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    warm_empty = make_josrc(warmup=2, tau_clean=1.0, tau_clean_max=1.0, smooth_eps=0.9)
    row = warm_empty.train_epoch(ctx(1))
    assert math.isfinite(row["train_loss"])
    everything = make_josrc(warmup=1, tau_clean=0.0, tau_clean_max=0.0)
    row = everything.train_epoch(ctx(2))
    assert row["frac_clean"] == 1.0 and row["frac_ood"] == 0.0 and math.isfinite(row["train_loss"])
    assert all(torch.isfinite(p).all() for p in everything.nets[0].parameters())


def test_division_metrics_and_ood_metrics_in_the_row():
    train = make_train()
    is_ood = np.zeros(len(train), dtype=bool)
    is_ood[:6] = True
    train.is_ood = torch.as_tensor(is_ood)
    m = make_josrc(train, warmup=1)
    m.train_epoch(ctx(0))
    row = m.train_epoch(ctx(1))
    for key in ("sel_precision_net1", "sel_recall_net1", "sel_auc_net1", "ood_precision", "ood_recall",
                "frac_clean", "frac_id", "frac_ood", "lc", "lo"):
        assert key in row
    assert row["frac_clean"] + row["frac_id"] + row["frac_ood"] == pytest.approx(1.0)
    prob = m.clean_prob()
    assert prob.shape == (len(train),) and np.all((prob >= 0) & (prob <= 1))
    assert np.array_equal(prob, m.p_clean.numpy().astype(np.float64))


def test_per_class_thresholds_floor_at_class_median():
    m = make_josrc(stab_per_class_threshold=True)
    assert torch.all(m.class_thresholds(0.9) == 0.9)  # nothing seen yet
    m.p_clean = torch.linspace(0.1, 0.99, len(m.train))
    m.seen[:] = True
    t = m.class_thresholds(0.95)
    for k in range(m.num_classes):
        s = np.sort(m.p_clean[m.train.labels == k].numpy())
        assert float(t[k]) == pytest.approx(min(0.95, s[(len(s) - 1) // 2]))
        assert float((m.p_clean[m.train.labels == k] >= t[k]).float().mean()) >= 0.5


def test_swa_is_running_average_and_used_for_eval():
    m = make_josrc(stab_swa_start=1)
    swa = SWA(m.nets)
    for k in range(3):
        with torch.no_grad():
            for p in m.nets[0].parameters():
                p.fill_(float(k))
        swa.update(m.nets, m.train.images, 16, m.config)
    assert swa.count == 3
    assert all(torch.allclose(p, torch.full_like(p, 1.0)) for p in swa.nets[0].parameters())
    # BatchNorm statistics are recomputed: a cumulative average over one pass of the images.
    bn = [mod for mod in swa.nets[0].modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and all(int(mod.num_batches_tracked) == 3 for mod in bn)  # 48 images, batches of 16
    m2 = make_josrc(stab_swa_start=1, warmup=1)
    m2.train_epoch(ctx(0))
    assert m2.eval_nets() is m2.nets
    row = m2.train_epoch(ctx(1))
    assert row["swa_count"] == 1 and m2.eval_nets() is m2.swa.nets
    logits = m2.predict_logits(m2.train.images, 32)
    assert len(logits) == 1 and torch.isfinite(logits[0]).all()


def test_state_roundtrip():
    m = make_josrc(stab_swa_start=1)
    m.train_epoch(ctx(0))
    m.train_epoch(ctx(1))
    state = m.state_dict()
    other = make_josrc(stab_swa_start=1)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(params(m.teacher), params(other.teacher)))
    assert torch.equal(m.p_clean, other.p_clean) and other.swa.count == 1


def test_strong_augment_is_seeded_and_erases():
    x = torch.randn(6, 3, 16, 16)
    a = strong_augment(x, torch.Generator().manual_seed(3))
    b = strong_augment(x, torch.Generator().manual_seed(3))
    c = strong_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    erased = strong_augment(torch.full((4, 1, 8, 8), 2.0), torch.Generator().manual_seed(0), strength=0.0,
                            cutout=0.5)
    zeros = (erased == 0).flatten(1).sum(1)
    assert torch.all(zeros >= 4) and torch.all(zeros <= 16)
    assert strong_augment(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)


def test_end_to_end_josrc_with_open_set(tmp_path):
    config = Config(dataset="digits", method="josrc", epochs=4, warmup=2, out=str(tmp_path / "run"), progress=False,
                    noise_rate=0.4, open_set_rate=0.1, open_set_source="digits", width=8)
    result = cdmix.train(config)
    # It learns: 10 classes, so chance is 10%; seeds 0-4 reach 31-39%.
    assert result.test_acc_last > 20.0
    for row in result.metrics:
        for key in ("train_loss", "lc", "lo", "tau_clean", "sel_auc_net1", "test_acc"):
            assert math.isfinite(row[key]), key
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["open_set_rate"] == 0.1
    assert (result.run_dir / "label_issues.csv").is_file()
    assert (result.run_dir / "best.pt").is_file() or (result.run_dir / "checkpoint.pt").is_file()
