"""The network of the official Jo-SRC CIFAR run (utils/cnn.py + utils/model.py of its code).

Encoder: three blocks of [conv3x3-BN-ReLU, conv3x3-BN-ReLU, max-pool 2] with widths (64, 64),
(128, 128), (196, 16), convs with bias, BN momentum 0.1; a 32x32 input leaves 16 x 4 x 4 = 256
features. Head: Linear(256, 512) -> BatchNorm1d(512) -> ReLU -> Linear(512, C), He-initialised
(kaiming_normal_, zero biases); the encoder keeps PyTorch's default init, as the official code does.
Parameter names follow the official model (``encoder.encoder.<block>.<layer>``,
``classifier.mlp_head.<layer>``), so its checkpoints load.

``width`` scales the first three widths (64 -> w, 128 -> 2w, 196 -> round(196 w / 64)); the last
block keeps 16 channels so the head always sees 256 features. The adaptive 4x4 pool before the
flatten is the identity at 32x32 and lets other image sizes through.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, mid_ch, kernel_size=3, padding=1), nn.BatchNorm2d(mid_ch, momentum=0.1), nn.ReLU(),
        nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch, momentum=0.1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, width: int):
        super().__init__()
        w1, w2, w3 = width, 2 * width, round(196 * width / 64)
        self.encoder = nn.Sequential(_block(in_channels, w1, w1), _block(w1, w2, w2), _block(w2, w3, 16))
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.encoder(x)), 1)


def mlp_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Jo-SRC's classifier: Linear -> BatchNorm1d -> ReLU -> Linear, He-initialised linears, zero biases
    (its CIFAR CNN and its real-world ResNets alike)."""
    head = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, num_classes))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return head


class _MLPHead(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.mlp_head = mlp_head(in_features, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x)


class JoSRCCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.encoder = _Encoder(in_channels, width)
        self.classifier = _MLPHead(256, 512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def josrc_cnn(num_classes: int, in_channels: int = 3, width: int | None = None) -> JoSRCCNN:
    """The official Jo-SRC CIFAR CNN with its MLP head; ``width`` default 64."""
    return JoSRCCNN(num_classes=num_classes, in_channels=in_channels, width=width or 64)
