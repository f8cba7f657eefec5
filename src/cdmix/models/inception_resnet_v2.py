"""Inception-ResNet-v2 (Szegedy et al., 2016), the network of DivideMix's WebVision experiment.

The structure follows DivideMix's ``InceptionResNetV2.py`` (itself the widely used PyTorch port
of the TensorFlow-slim model), layer for layer:

* stem: 3x3/2 conv (32) -> 3x3 conv (32) -> 3x3 conv pad 1 (64) -> 3x3/2 max-pool -> 1x1 conv (80)
  -> 3x3 conv (192) -> 3x3/2 max-pool;
* ``mixed_5b`` (-> 320 channels), 10 x ``Block35`` (residual scale 0.17);
* ``mixed_6a`` (-> 1088, stride 2), 20 x ``Block17`` (scale 0.10);
* ``mixed_7a`` (-> 2080, stride 2), 9 x ``Block8`` (scale 0.20), one ``Block8`` without the final ReLU;
* 1x1 conv (1536), average pool, linear classifier.

Every ``BasicConv2d`` is conv (no bias) -> BatchNorm (eps 0.001, momentum 0.1) -> ReLU; the 1x1
"up" convolutions of the residual blocks have a bias and no BatchNorm. Weights keep PyTorch's
default initialisation, as in the official code (DivideMix trains it from scratch).
55,843,464 parameters at 1000 classes, 54,383,314 at WebVision-mini's 50.

One deliberate change: the official head pools with ``AvgPool2d(8)``, which only fits the 8x8 map
of a 299x299 input; DivideMix's WebVision pipeline fed 227x227 crops (a 5x5 map) before its current
dataloader's 299 (the ``dividemix-webvision`` preset's), and that layer rejects them in current PyTorch. We pool globally (``AdaptiveAvgPool2d(1)``): identical at 299,
and any input from 75x75 up works. Importing this module builds nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from cdmix.errors import UserError

MIN_INPUT_SIZE = 75  # smallest H = W that survives the four unpadded stride-2 reductions


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's value) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Mixed5b(nn.Module):
    """192 -> 320 channels (96 + 64 + 96 + 64), same spatial size."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(192, 96, 1)
        self.branch1 = nn.Sequential(BasicConv2d(192, 48, 1), BasicConv2d(48, 64, 5, padding=2))
        self.branch2 = nn.Sequential(BasicConv2d(192, 64, 1), BasicConv2d(64, 96, 3, padding=1),
                                     BasicConv2d(96, 96, 3, padding=1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                                     BasicConv2d(192, 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class Block35(nn.Module):
    """Inception-ResNet-A on 320 channels: x + scale * up(concat(branches)), then ReLU."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(320, 32, 1)
        self.branch1 = nn.Sequential(BasicConv2d(320, 32, 1), BasicConv2d(32, 32, 3, padding=1))
        self.branch2 = nn.Sequential(BasicConv2d(320, 32, 1), BasicConv2d(32, 48, 3, padding=1),
                                     BasicConv2d(48, 64, 3, padding=1))
        self.conv2d = nn.Conv2d(128, 320, kernel_size=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Mixed6a(nn.Module):
    """320 -> 1088 channels (384 + 384 + 320), stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(320, 384, 3, stride=2)
        self.branch1 = nn.Sequential(BasicConv2d(320, 256, 1), BasicConv2d(256, 256, 3, padding=1),
                                     BasicConv2d(256, 384, 3, stride=2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Block17(nn.Module):
    """Inception-ResNet-B on 1088 channels (1x7 / 7x1 factorised branch)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(1088, 192, 1)
        self.branch1 = nn.Sequential(BasicConv2d(1088, 128, 1), BasicConv2d(128, 160, (1, 7), padding=(0, 3)),
                                     BasicConv2d(160, 192, (7, 1), padding=(3, 0)))
        self.conv2d = nn.Conv2d(384, 1088, kernel_size=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Mixed7a(nn.Module):
    """1088 -> 2080 channels (384 + 288 + 320 + 1088), stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(1088, 256, 1), BasicConv2d(256, 384, 3, stride=2))
        self.branch1 = nn.Sequential(BasicConv2d(1088, 256, 1), BasicConv2d(256, 288, 3, stride=2))
        self.branch2 = nn.Sequential(BasicConv2d(1088, 256, 1), BasicConv2d(256, 288, 3, padding=1),
                                     BasicConv2d(288, 320, 3, stride=2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class Block8(nn.Module):
    """Inception-ResNet-C on 2080 channels (1x3 / 3x1 branch); the last one skips the ReLU."""

    def __init__(self, scale: float = 1.0, no_relu: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(2080, 192, 1)
        self.branch1 = nn.Sequential(BasicConv2d(2080, 192, 1), BasicConv2d(192, 224, (1, 3), padding=(0, 1)),
                                     BasicConv2d(224, 256, (3, 1), padding=(1, 0)))
        self.conv2d = nn.Conv2d(448, 2080, kernel_size=1)
        self.relu = None if no_relu else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        out = self.conv2d(out) * self.scale + x
        return out if self.relu is None else self.relu(out)


class InceptionResNetV2(nn.Module):
    """``forward``: ``N x in_channels x H x W`` (H, W >= 75; 299 native) -> ``N x num_classes`` logits.

    Sub-module names match the official code (``conv2d_1a`` ... ``last_linear``), so its
    checkpoints load with ``load_state_dict`` (the ``noReLU`` block keeps no parameters either way).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv2d_1a = BasicConv2d(in_channels, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.maxpool_5a = nn.MaxPool2d(3, stride=2)
        self.mixed_5b = Mixed5b()
        self.repeat = nn.Sequential(*[Block35(scale=0.17) for _ in range(10)])
        self.mixed_6a = Mixed6a()
        self.repeat_1 = nn.Sequential(*[Block17(scale=0.10) for _ in range(20)])
        self.mixed_7a = Mixed7a()
        self.repeat_2 = nn.Sequential(*[Block8(scale=0.20) for _ in range(9)])
        self.block8 = Block8(no_relu=True)
        self.conv2d_7b = BasicConv2d(2080, 1536, 1)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.last_linear = nn.Linear(1536, num_classes)
        self.num_features = 1536

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` -> ``N x 1536 x h x w`` (8 x 8 at 299, 5 x 5 at 227)."""
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"inception_resnet_v2 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.maxpool_3a(self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x))))
        x = self.maxpool_5a(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat(self.mixed_5b(x))
        x = self.repeat_1(self.mixed_6a(x))
        x = self.block8(self.repeat_2(self.mixed_7a(x)))
        return self.conv2d_7b(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.avgpool_1a(self.features(x)), 1)
        return self.last_linear(out)


def inception_resnet_v2(num_classes: int, in_channels: int = 3, width: int | None = None) -> InceptionResNetV2:
    """Build Inception-ResNet-v2; ``width`` exists for the registry's signature and must stay ``None``
    (the architecture's channel counts are fixed)."""
    if width is not None:
        raise UserError(f"inception_resnet_v2 has fixed channel widths; drop the width setting (got {width})")
    return InceptionResNetV2(num_classes=num_classes, in_channels=in_channels)
