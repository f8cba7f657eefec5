"""A small CNN for 8x8 single-channel digits that also runs on 32x32 images.

conv3x3(in, w) -> BN -> ReLU -> conv3x3(w, w) -> BN -> ReLU -> maxpool 2
-> conv3x3(w, 2w) -> BN -> ReLU -> conv3x3(2w, 2w) -> BN -> ReLU
-> adaptive average pool 1x1 -> linear. ``width`` is ``w``, default 32.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * w, num_classes)
        self.num_features = 2 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def small_cnn(num_classes: int, in_channels: int = 3, width: int | None = None) -> SmallCNN:
    """Small 4-conv CNN; ``width`` is the first-stage channel count, default 32."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width or 32)
