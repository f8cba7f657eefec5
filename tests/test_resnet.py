"""Tests for the torchvision-layout ResNets, load_pretrained and timm: names (fast, CPU)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from cdmix.errors import UserError
from cdmix.models import create_model, model_names
from cdmix.models.pretrained import load_pretrained, sha256_file
from cdmix.models.resnet import ResNet, resnet18, resnet50

# Facts about torchvision's resnet18/34/50 at 1000 classes (torchvision.models.resnetXX().
# state_dict() and parameter counts), written down here so no torchvision is needed.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
TORCHVISION_STATE_LEN = {"resnet18": 122, "resnet34": 218, "resnet50": 320}
TORCHVISION_SHAPES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet34": {
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.2.bn2.running_var": (512,),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "fc.weight": (1000, 512),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.bn3.weight": (1024,),
        "layer4.0.downsample.1.running_mean": (2048,),
        "layer4.2.bn3.running_var": (2048,),
        "layer4.2.bn3.num_batches_tracked": (),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    },
}
# Keys absent from torchvision's layout (first blocks of BasicBlock layer1 have no projection).
TORCHVISION_ABSENT = {"resnet18": ["layer1.0.downsample.0.weight", "layer1.1.downsample.0.weight"]}


def _resnet50_key_names() -> list[str]:
    """torchvision resnet50's state_dict keys in order, spelled out from its documented layout."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for i in range(blocks):
            p = f"layer{layer}.{i}"
            for j in (1, 2, 3):
                keys += [f"{p}.conv{j}.weight"] + [f"{p}.bn{j}.{b}" for b in bn]
            if i == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in bn]
    return keys + ["fc.weight", "fc.bias"]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trained_tiny(num_classes: int = 10, in_channels: int = 3, seed: int = 0, name: str = "resnet18") -> nn.Module:
    """A tiny model whose BN running stats have moved off their initial values."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes, in_channels=in_channels, width=8)
    with torch.no_grad():
        model.train()(torch.randn(4, in_channels, 32, 32))
    return model.eval()


def _inputs(in_channels: int = 3) -> torch.Tensor:
    return torch.randn(3, in_channels, 32, 32, generator=torch.Generator().manual_seed(7))


# --- architecture -----------------------------------------------------------------------------

def test_registered():
    assert {"resnet18", "resnet34", "resnet50"} <= set(model_names())
    assert not any(n.startswith("timm:") for n in model_names())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_matches_torchvision_keys_shapes_and_param_count(name):
    model = create_model(name, 1000)
    state = model.state_dict()
    assert _n_params(model) == TORCHVISION_PARAMS[name]
    assert len(state) == TORCHVISION_STATE_LEN[name]
    for key, shape in TORCHVISION_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key
    for key in TORCHVISION_ABSENT.get(name, []):
        assert key not in state
    assert list(state)[:2] == ["conv1.weight", "bn1.weight"]
    assert list(state)[-2:] == ["fc.weight", "fc.bias"]


def test_resnet50_key_names_in_order():
    assert list(resnet50(1000).state_dict()) == _resnet50_key_names()


def test_bottleneck_stride_on_3x3_and_stem():
    model = resnet50(10, width=8)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.MaxPool2d) and isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_init_like_torchvision():
    torch.manual_seed(0)
    model = resnet18(10)
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (out_ch * kh * kw))
    w = model.layer3[0].conv2.weight
    expected_std = (2.0 / (256 * 3 * 3)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.05
    assert torch.all(model.layer1[0].bn2.weight == 1) and torch.all(model.layer1[0].bn2.bias == 0)

    zero = ResNet(type(model.layer1[0]), (2, 2, 2, 2), num_classes=10, width=8, zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for layer in (zero.layer1, zero.layer4) for b in layer)
    assert torch.all(zero.layer1[0].bn1.weight == 1)
    zero50 = resnet50(10, width=8)
    assert torch.all(zero50.layer1[0].bn3.weight == 1)  # off by default


@pytest.mark.parametrize("name, out_features", [("resnet18", 64), ("resnet34", 64), ("resnet50", 256)])
def test_width_scales_stages(name, out_features):
    model = create_model(name, 3, width=8)
    assert model.conv1.out_channels == 8
    assert model.layer4[0].conv1.out_channels == 64
    assert model.fc.in_features == out_features == model.num_features


def test_one_channel_tiny_forward():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5, in_channels=1, width=8)
    assert model.conv1.weight.shape == (8, 1, 7, 7)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [8, 64])
def test_small_and_larger_inputs(size):
    model = create_model("resnet50", 4, width=8).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_autocast_bf16_channels_last_at_32(name):
    """At 32x32 no stride-2 conv sees a 1x1 map (see the resnet module docstring)."""
    torch.manual_seed(0)
    model = create_model(name, 10, width=8).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- load_pretrained --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_roundtrip_gives_identical_outputs(tmp_path, suffix):
    source = _trained_tiny(seed=0)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)

    fresh = _trained_tiny(seed=1)
    x = _inputs()
    assert not torch.equal(fresh(x), source(x))
    digest = load_pretrained(fresh, path)
    assert digest == sha256_file(path) and len(digest) == 64
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("wrap", ["state_dict", "model", "ddp"])
def test_wrapped_and_ddp_keys(tmp_path, wrap):
    source = _trained_tiny(seed=0)
    state = source.state_dict()
    if wrap == "ddp":
        payload: dict = {f"module.{k}": v for k, v in state.items()}
    else:
        payload = {wrap: state, "epoch": 90, "arch": "resnet18"}
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    fresh = _trained_tiny(seed=1)
    load_pretrained(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(_inputs()), source(_inputs()))


def test_file_without_num_batches_tracked_loads(tmp_path):
    """Published torchvision files predate BN's num_batches_tracked buffer."""
    source = _trained_tiny(seed=0, name="resnet50")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    fresh = _trained_tiny(seed=1, name="resnet50")
    load_pretrained(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(_inputs()), source(_inputs()))


def test_other_class_count_keeps_fresh_fc(tmp_path):
    source = _trained_tiny(num_classes=10, seed=0)
    path = tmp_path / "ten.pt"
    torch.save(source.state_dict(), path)
    target = _trained_tiny(num_classes=5, seed=1)
    fc_before = {k: v.clone() for k, v in target.fc.state_dict().items()}
    load_pretrained(target, path)
    assert torch.equal(target.fc.weight, fc_before["weight"]) and torch.equal(target.fc.bias, fc_before["bias"])
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(target.state_dict()[key], value), key
    assert target(_inputs()).shape == (3, 5)


def _expect_unfit(tmp_path, state: dict, target: nn.Module, *fragments: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert "\n" not in message and "does not fit" in message and str(path) in message
    for fragment in fragments:
        assert fragment in message
    for key, value in target.state_dict().items():  # untouched on error
        assert torch.equal(value, before[key]), key


def test_missing_keys_named(tmp_path):
    state = _trained_tiny(seed=0).state_dict()
    del state["layer4.1.bn2.weight"], state["layer4.1.bn2.bias"]
    _expect_unfit(tmp_path, state, _trained_tiny(seed=1), "missing layer4.1.bn2.weight, layer4.1.bn2.bias")


def test_unexpected_keys_named(tmp_path):
    state = _trained_tiny(seed=0).state_dict()
    state["head.extra.weight"] = torch.zeros(3)
    _expect_unfit(tmp_path, state, _trained_tiny(seed=1), "unexpected head.extra.weight")


def test_shape_mismatch_named(tmp_path):
    state = _trained_tiny(seed=0, in_channels=3).state_dict()
    target = _trained_tiny(seed=1, in_channels=1)
    _expect_unfit(tmp_path, state, target, "shape differs", "conv1.weight (8, 3, 7, 7) vs (8, 1, 7, 7)")


def test_other_architecture_lists_first_few(tmp_path):
    # resnet18's keys are a subset of resnet50's: the bottleneck parts are missing, shapes differ.
    state = _trained_tiny(seed=0, name="resnet18").state_dict()
    _expect_unfit(tmp_path, state, _trained_tiny(seed=1, name="resnet50"), "missing layer1.0.conv3.weight, ",
                  "shape differs", "more)")


def test_missing_and_corrupt_files(tmp_path):
    net = _trained_tiny()
    with pytest.raises(UserError, match="not found"):
        load_pretrained(net, tmp_path / "nope.pth")
    with pytest.raises(UserError, match="not found"):
        load_pretrained(net, tmp_path)  # a folder
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(UserError, match="cannot read weights file") as info:
        load_pretrained(net, junk)
    assert "\n" not in str(info.value)
    good = tmp_path / "good.pth"
    torch.save(net.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UserError, match="cannot read weights file"):
        load_pretrained(net, truncated)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(UserError, match="no state dict"):
        load_pretrained(net, empty)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"conv1.weight": 3}, not_tensors)
    with pytest.raises(UserError, match="non-tensor values for conv1.weight"):
        load_pretrained(net, not_tensors)


def test_corrupt_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(UserError, match="cannot read weights file") as info:
        load_pretrained(_trained_tiny(), bad)
    assert "\n" not in str(info.value)


def test_safetensors_absent_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"whatever")
    with pytest.raises(UserError, match="pip install safetensors"):
        load_pretrained(_trained_tiny(), path)


class _RunsShell:
    """Unpickling this calls os.system(command): what weights_only loading must refuse."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    net = _trained_tiny()
    state = dict(net.state_dict())
    state["conv1.weight"] = _RunsShell(f"touch {marker}")
    torch.save({"state_dict": state}, path)
    with pytest.raises(UserError, match="weights_only") as info:
        load_pretrained(net, path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


# --- timm: names ------------------------------------------------------------------------------

def test_timm_absent_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match="pip install timm"):
        create_model("timm:resnet18", 5)


def test_timm_model_and_keys_match_ours():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", 5, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    ours = create_model("resnet18", 5, in_channels=1)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    with pytest.raises(UserError):
        create_model("timm:no_such_model_xyz", 5)
    with pytest.raises(UserError, match="width"):
        create_model("timm:resnet18", 5, width=8)


def test_resnet18_cifar_is_the_c2d_supcontrast_cifar_network():
    """C2D's / SupContrast's CIFAR ResNet-18 (models/resnet.py there): 3x3 stride-1 conv1, no max-pool,
    BasicBlocks 2-2-2-2, global pool, then ``fc``; torchvision's names. 11,173,962 parameters at 10
    classes: the well-known CIFAR ResNet-18 count (torchvision's 11,689,512 minus the 7x7 stem's extra
    7,680 weights and the 1000-class fc's 513,000, plus a 10-class fc's 5,130)."""
    assert "resnet18_cifar" in model_names()
    model = create_model("resnet18_cifar", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    conv1 = model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.Identity)
    # The same names as torchvision's resnet18 (fc included), conv1 the only shape that differs.
    imagenet = create_model("resnet18", num_classes=10).state_dict()
    ours = model.state_dict()
    assert list(ours) == list(imagenet)
    assert [k for k in ours if ours[k].shape != imagenet[k].shape] == ["conv1.weight"]
    # Total stride 8: a 32 px image reaches layer4 as a 4x4 map.
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, out: seen.update(shape=tuple(out.shape)))
    logits = model.eval()(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10) and seen["shape"] == (2, 512, 4, 4)
