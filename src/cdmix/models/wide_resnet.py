"""Wide ResNet-28-k for CIFAR-sized inputs.

Pre-activation WRN (Zagoruyko & Komodakis, 2016): depth 28 gives 4 blocks per
stage; stages have ``16k, 32k, 64k`` channels with strides 1, 2, 2 after a
16-channel 3x3 stem. Each block is ``BN -> act -> conv3x3 -> BN -> act ->
conv3x3``; when the shape changes, a 1x1 convolution of the pre-activated input
forms the shortcut, otherwise the shortcut is the raw input. After the last
stage: BN -> act -> adaptive average pool to 1x1 -> linear.

Choices, stated: the activation is LeakyReLU with slope 0.1 and convolutions
use Kaiming-normal (fan_out) init, as in the common FixMatch PyTorch WRN;
BatchNorm keeps PyTorch's default momentum (0.1); no dropout. ``width`` is the
widen factor k (default 2, i.e. WRN-28-2, about 1.47M parameters at 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_SLOPE = 0.1


class WideBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        self.project = stride != 1 or in_ch != out_ch
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False) if self.project else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.leaky_relu(self.bn1(x), _SLOPE)
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.leaky_relu(self.bn2(out), _SLOPE))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 2, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("WRN depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_ch = widths[0]
        stages = []
        for out_ch, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_ch)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=_SLOPE)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.leaky_relu(self.bn(out), _SLOPE)
        out = torch.flatten(self.pool(out), 1)
        return self.fc(out)


def wrn28(num_classes: int, in_channels: int = 3, width: int | None = None) -> WideResNet:
    """WRN-28-k; ``width`` is the widen factor k, default 2."""
    return WideResNet(28, width or 2, num_classes=num_classes, in_channels=in_channels)
