"""Tests for the model registry and the architectures (fast, CPU); count_flops: tests/test_bench.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdmix.errors import UserError
from cdmix.models import create_model, model_names

# Small widths keep the shape matrix fast; default widths are checked separately.
_FAST_WIDTH = {"preact_resnet18": 16, "wrn28": 1, "small_cnn": 8, "josrc_cnn": 16, "resnet18": 8, "resnet18_cifar": 8,
               "resnet34": 8, "resnet50": 8, "resnet18_mlp": 8, "resnet50_mlp": 8, "inception_resnet_v2": None}
# Inception-ResNet-v2 has fixed widths (55M parameters) and needs inputs of at least 75 px: it runs once per
# test at that size (its own tests: tests/test_realworld.py); every other model at the sizes the tests name.
_MIN_SIZE = {"inception_resnet_v2": 75}


def _sizes(name: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
    return (_MIN_SIZE[name],) if name in _MIN_SIZE else sizes


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_models():
    names = model_names()
    assert names == sorted(names)
    assert {"preact_resnet18", "wrn28", "small_cnn"} <= set(names)


def test_unknown_name_raises_user_error():
    with pytest.raises(UserError, match="unknown model 'nope'; choose one of .*preact_resnet18"):
        create_model("nope", 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_sizes_raise_user_error(bad):
    with pytest.raises(UserError):
        create_model("small_cnn", bad)
    with pytest.raises(UserError):
        create_model("small_cnn", 10, in_channels=bad)
    with pytest.raises(UserError):
        create_model("small_cnn", 10, width=bad)


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shapes(name, num_classes, in_channels):
    torch.manual_seed(0)
    if name in _MIN_SIZE and (num_classes, in_channels) != (10, 3):
        pytest.skip("one class count and channel count is enough for the 55M-parameter model")
    model = create_model(name, num_classes, in_channels=in_channels, width=_FAST_WIDTH[name])
    for size in _sizes(name, (8, 32)):
        out = model(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, num_classes)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", model_names())
def test_default_width_builds_and_runs(name):
    model = create_model(name, 10)
    size = _sizes(name, (8,))[0]
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_preact_resnet18_param_count():
    n = _n_params(create_model("preact_resnet18", 10))
    assert abs(n - 11.17e6) / 11.17e6 < 0.01
    assert _n_params(create_model("preact_resnet18", 10, width=64)) == n


def test_wrn28_param_count():
    n = _n_params(create_model("wrn28", 10))
    assert abs(n - 1.47e6) / 1.47e6 < 0.01
    assert _n_params(create_model("wrn28", 10, width=2)) == n


@pytest.mark.parametrize("name", model_names())
def test_width_scales_params(name):
    base = _FAST_WIDTH[name]
    if base is None:
        pytest.skip(f"{name} has fixed widths")
    small = _n_params(create_model(name, 10, width=base))
    big = _n_params(create_model(name, 10, width=2 * base))
    if name == "josrc_cnn":  # the official 256-feature MLP head does not scale with width
        assert small < big
        return
    # Conv weights dominate and grow quadratically with width: roughly 4x, well over 3x.
    assert 3.0 * small < big < 4.5 * small


def test_preact_width_16_stages():
    model = create_model("preact_resnet18", 10, width=16)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == [16, 32, 64, 128]
    assert model.linear.in_features == 128


@pytest.mark.parametrize("name", model_names())
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = create_model(name, 10, in_channels=3, width=_FAST_WIDTH[name]).eval()
    size = _sizes(name, (16,))[0]
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", model_names())
def test_autocast_bf16(name):
    torch.manual_seed(0)
    model = create_model(name, 10, in_channels=3, width=_FAST_WIDTH[name])
    # 32 px: torch 2.13 CPU bf16 gives NaN grads for a stride-2 conv on a 1x1 map (ImageNet ResNets at 16 px)
    size = _sizes(name, (32,))[0]
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", model_names())
def test_backward_finite_grads(name):
    torch.manual_seed(0)
    model = create_model(name, 10, in_channels=1, width=_FAST_WIDTH[name])
    size = _sizes(name, (8,))[0]
    x = torch.randn(4, 1, size, size)
    y = torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_small_cnn_learns_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    model = create_model("small_cnn", 10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        model.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9
