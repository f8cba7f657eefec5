"""ImageNet-style ResNet-18/34/50, laid out exactly like torchvision's ``resnet.py``.

Parameter and buffer names, shapes and module order match torchvision (and timm's
``resnet18/34/50``, which use the same names), so their published ImageNet state
dicts load with ``strict=True`` apart from ``fc`` when the class count differs
(see :func:`cdmix.models.pretrained.load_pretrained`):

* stem ``conv1`` (7x7, stride 2, no bias) -> ``bn1`` -> ``relu`` -> ``maxpool`` (3x3, stride 2);
  ``resnet18_cifar``: the CIFAR stem of C2D / SupContrast instead, ``conv1`` 3x3 stride 1 and
  ``maxpool`` an ``nn.Identity`` (no parameters, so the names are the same);
* ``layer1``..``layer4`` of ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50),
  the first block of layers 2-4 with stride 2; a block whose shape changes has a
  projection shortcut ``downsample`` = ``Sequential(conv1x1 (stride), BN)``;
* ``Bottleneck`` puts the stride on its 3x3 conv (torchvision's "ResNet v1.5");
* ``avgpool`` (adaptive 1x1) -> flatten -> ``fc``.

Initialisation as torchvision: convs ``kaiming_normal_(mode="fan_out",
nonlinearity="relu")``, BN weight 1 and bias 0, ``fc`` PyTorch's default;
``zero_init_residual=True`` (off by default) zeroes the last BN weight of each block.

``width`` is the base width (default 64 -> stage widths 64, 128, 256, 512; the
Bottleneck's outputs are 4x those). Any other width is for small, fast models:
pretrained ImageNet weights then no longer fit. ``in_channels`` sets the input
channels of ``conv1`` (3-channel ImageNet weights then no longer fit ``conv1``).
The total stride is 32; smaller inputs still work (down to 1x1 feature maps), but
on CPU with bf16 autocast (torch 2.13) the weight gradient of a stride-2 3x3 conv
whose input map is 1x1 sometimes comes out NaN/inf (a torch CPU kernel bug, float32
is fine). Inputs below 32x32 get there (16x16: layer4's first conv sees a 1x1 map;
8x8: layer3's), so train these models on such small inputs in float32 on CPU.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv1(3x3, stride) -> bn1 -> relu -> conv2(3x3) -> bn2, + shortcut, -> relu."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + skip)


class Bottleneck(nn.Module):
    """conv1(1x1) -> bn1 -> relu -> conv2(3x3, stride) -> bn2 -> relu -> conv3(1x1, 4x) -> bn3,
    + shortcut, -> relu."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + skip)


class ResNet(nn.Module):
    """torchvision's ResNet (no groups/dilation options): stem, four stages, pool, ``fc``."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
        cifar_stem: bool = False,
    ) -> None:
        super().__init__()
        if cifar_stem:  # SupContrast's / C2D's CIFAR ResNet: 3x3 stride-1 conv1, no max-pool (total stride 8)
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = width
        stages = []
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            out_ch = planes * block.expansion
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
            blocks = [block(in_ch, planes, stride, downsample)]
            blocks += [block(out_ch, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch then starts as zero, so every block starts as the identity.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x in_channels x H x W`` -> ``N x num_classes`` logits."""
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


def resnet18(num_classes: int, in_channels: int = 3, width: int | None = None) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); ``width`` is the base width, default 64."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width or 64)


def resnet18_cifar(num_classes: int, in_channels: int = 3, width: int | None = None) -> ResNet:
    """ResNet-18 with the CIFAR stem: the network of C2D's CIFAR runs and of SupContrast's SimCLR
    (``models/resnet.py`` there: conv1 3x3 stride 1 padding 1, no max-pool, BasicBlocks 2-2-2-2, global
    average pool), with torchvision's parameter names (``downsample`` where theirs say ``shortcut``;
    ``fc`` the classifier, as their ``SupCEResNet``). ``width``: base width, default 64."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width or 64,
                  cifar_stem=True)


def resnet34(num_classes: int, in_channels: int = 3, width: int | None = None) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); ``width`` is the base width, default 64."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=width or 64)


def resnet50(num_classes: int, in_channels: int = 3, width: int | None = None) -> ResNet:
    """ResNet-50 (Bottleneck v1.5, 3-4-6-3); ``width`` is the base width, default 64."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=width or 64)
