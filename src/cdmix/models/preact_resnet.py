"""CIFAR-style pre-activation ResNet-18, as in the official DivideMix code.

The layout follows ``PreResNet.py`` of LiJunnan1992/DivideMix (its ``ResNet18``),
including two details that differ from textbook pre-activation ResNets:

* the stem is ``conv3x3 -> BN -> ReLU`` and there is no BN/ReLU after the last
  stage (the head pools the raw output of ``layer4``);
* inside a block the shortcut, identity or 1x1 projection alike, is taken from
  the pre-activated input ``relu(bn1(x))``, not from ``x``.

The only change is the head: adaptive average pooling to 1x1 instead of a fixed
4x4 average pool (identical at 32x32, and it also accepts smaller inputs such
as 8x8 digits). ``width`` is the base width: stages are ``w, 2w, 4w, 8w``
(default 64 -> 64, 128, 256, 512).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """bn1 -> relu -> conv1(3x3, stride) -> bn2 -> relu -> conv2(3x3), plus shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Stem conv3x3 (stride 1) -> BN -> ReLU, four stages of PreActBlocks, pool, linear."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        widths = [width * (2**i) for i in range(len(num_blocks))]
        strides = [1] + [2] * (len(num_blocks) - 1)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        stages = []
        for n, out_ch, stride in zip(num_blocks, widths, strides):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(in_ch, out_ch, s))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = torch.flatten(self.pool(out), 1)
        return self.linear(out)


def preact_resnet18(num_classes: int, in_channels: int = 3, width: int | None = None) -> PreActResNet:
    """PreAct ResNet-18 (DivideMix); ``width`` is the base width, default 64."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width or 64)
