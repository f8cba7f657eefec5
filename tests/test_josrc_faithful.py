"""Jo-SRC as the official code runs its CIFAR experiment (issue: CIFAR-80N, CNN, Adam plan, fp32)."""

import pytest
import torch
from torch import nn

from cdmix.models import create_model


def official_structure(num_classes: int) -> nn.Module:
    """The official utils/cnn.py encoder + utils/model.py MLP head, written out flat and independently."""
    layers = []
    for cin, mid, cout in ((3, 64, 64), (64, 128, 128), (128, 196, 16)):
        layers += [nn.Conv2d(cin, mid, 3, 1, 1), nn.BatchNorm2d(mid), nn.ReLU(),
                   nn.Conv2d(mid, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2, 2)]
    layers += [nn.Flatten(), nn.Linear(256, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def test_josrc_cnn_matches_the_official_structure_forward_for_forward():
    ours = create_model("josrc_cnn", num_classes=80)
    ref = official_structure(80)
    ours_params = sum(p.numel() for p in ours.parameters())
    # by hand: blocks 38,976 + 221,952 + 254,652; head 131,584 + 1,024 + 41,040 (512 x 80 + 80)
    assert ours_params == sum(p.numel() for p in ref.parameters()) == 689_228
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in ref_state.values()]
    assert "encoder.encoder.0.0.weight" in ours_state and "classifier.mlp_head.3.weight" in ours_state
    ref.load_state_dict(dict(zip(ref_state, ours_state.values())))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        with torch.no_grad():
            out = ours(x)
        assert out.shape == (4, 80)
        torch.testing.assert_close(out, ref(x))


def test_josrc_cnn_head_is_he_initialised_with_zero_bias():
    net = create_model("josrc_cnn", num_classes=10)
    first = net.classifier.mlp_head[0]
    assert torch.count_nonzero(first.bias) == 0
    # kaiming_normal_ (fan_in, gain sqrt(2)): std = sqrt(2 / 256)
    assert abs(float(first.weight.detach().std()) - (2 / 256) ** 0.5) < 0.01


def _cifar100_shaped(per_class=40, seed=0):
    import numpy as np

    from cdmix.data.types import RawData

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(100), per_class)
    images = rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    test_labels = np.repeat(np.arange(100), 3)
    return RawData(train_images=images, train_labels=labels, test_images=np.zeros((300, 8, 8, 3), np.uint8),
                   test_labels=test_labels, class_names=[f"c{i}" for i in range(100)], mean=(0.5,) * 3,
                   std=(0.25,) * 3, name="cifar100")


def test_cifar80n_construction_matches_the_official_noise_model():
    import numpy as np

    from cdmix.data.openset import held_out_classes, open_set_transition_matrix

    raw = _cifar100_shaped()
    new, info = held_out_classes(raw, open_classes=20, closed_rate=0.2, mode="sym", seed=0)
    # 80 classes; every image kept, in order; the open set is the real images of classes 80-99
    assert new.num_classes == 80 and new.class_names == raw.class_names[:80]
    assert np.array_equal(new.train_images, raw.train_images)
    assert np.array_equal(new.train_is_ood, raw.train_labels >= 80) and info["open_set_count"] == 20 * 40
    assert new.train_labels.min() >= 0 and new.train_labels.max() <= 79
    assert np.all(new.train_true_labels[new.train_is_ood] == -1)
    assert np.array_equal(new.train_true_labels[~new.train_is_ood], raw.train_labels[raw.train_labels < 80])
    # test: only the closed classes' images
    assert len(new.test_labels) == 80 * 3 and new.test_labels.max() == 79
    # empirical transition rates: 80% kept, flips spread over the other closed classes, open set uniform
    closed = ~new.train_is_ood
    kept = (new.train_labels[closed] == raw.train_labels[closed]).mean()
    assert abs(kept - 0.8) < 0.03  # 3,200 draws: std 0.007
    open_labels = new.train_labels[new.train_is_ood]
    assert len(np.unique(open_labels)) > 60 and np.bincount(open_labels, minlength=80).max() <= 40
    matrix = open_set_transition_matrix(100, 20, 0.2)
    assert np.allclose(matrix.sum(1), 1.0) and matrix[0, 0] == 0.8 and np.isclose(matrix[0, 1], 0.2 / 79)
    assert np.all(matrix[:, 80:] == 0) and np.allclose(matrix[80:, :80], 1 / 80)
    # the same seed gives the same labels; another seed other labels
    again, _ = held_out_classes(raw, 20, 0.2, "sym", seed=0)
    other, _ = held_out_classes(raw, 20, 0.2, "sym", seed=1)
    assert np.array_equal(again.train_labels, new.train_labels)
    assert not np.array_equal(other.train_labels, new.train_labels)


def test_cifar100_images_as_open_set_of_cifar100_are_refused():
    import pytest

    from cdmix.data.openset import apply_open_set
    from cdmix.errors import UserError

    with pytest.raises(UserError, match="--open-set-classes 20"):
        apply_open_set(_cifar100_shaped(per_class=2), 0.2, "cifar100:/some/folder", seed=0)


def test_official_adam_plan_lr_and_beta1():
    from cdmix.config import build_config, resolve
    from cdmix.engine import beta1_at, lr_at

    config = resolve(build_config(preset="josrc-cifar100"), num_classes=80, image_size=32)
    assert config.optimizer == "adam" and config.weight_decay == 0.0 and config.epochs == 200
    official_lr = {0: 1e-3, 79: 1e-3, 80: 1e-3 * 120 / 120, 150: 1e-3 * 50 / 120, 199: 1e-3 * 1 / 120}
    for epoch, lr in official_lr.items():
        assert lr_at(config, epoch) == pytest.approx(lr, rel=1e-12), epoch
    assert [beta1_at(config, e) for e in (0, 79, 80, 150, 199)] == [0.9, 0.9, 0.1, 0.1, 0.1]


def test_adam_plan_reaches_the_optimizer(tmp_path):
    """A tiny run with the plan: the optimizer's betas and lr follow it epoch by epoch."""
    from cdmix.config import build_config
    from cdmix.engine import start_run

    config = build_config(dataset="digits", method="josrc", optimizer="adam", schedule="josrc", lr=0.002,
                          lr_step=1, epochs=3, warmup=1, out=str(tmp_path / "run"), progress=False)
    result = start_run(config).run()
    rows = result.metrics
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.002, 0.002 * 2 / 2, 0.002 * 1 / 2])
    assert [float(r["beta1"]) for r in rows] == [0.9, 0.1, 0.1]


def test_josrc_preset_states_its_official_values():
    from cdmix.config import build_config

    config = build_config(preset="josrc-cifar100")
    assert (config.open_set_classes, config.noise_rate, config.noise_mode) == (20, 0.2, "sym")
    assert (config.model, config.normalization, config.schedule, config.lr_step) == ("josrc_cnn", "imagenet",
                                                                                        "josrc", 80)
    assert config.amp is False and config.open_set_rate == 0.0
