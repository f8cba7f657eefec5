"""ImageNet ResNets with Jo-SRC's MLP classifier head, the network of its real-world runs.

Jo-SRC's ``utils/model.py`` (``Model(arch, num_classes, mlp_hidden=2)``): the torchvision ResNet
without its ``fc`` (``Encoder``: every child but the last, i.e. up to the average pool), then
``MLPHead``: ``Linear(d, 2d) -> BatchNorm1d(2d) -> ReLU -> Linear(2d, C)`` with ``d`` the feature
size (512 for ResNet-18 -> 1024 hidden, 2048 for ResNet-50 -> 4096 hidden), both linear layers
He-initialised (``kaiming_normal_`` with its defaults, bias 0).

The body keeps torchvision's parameter names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so an
ImageNet ResNet state dict loads into it with ``--pretrained``; the file's ``fc`` is skipped and the
head (``head.*``) stays freshly initialised (``cdmix.models.pretrained``, ``fresh_head``).
"""

from __future__ import annotations

import torch

from cdmix.models.josrc_cnn import mlp_head
from cdmix.models.resnet import BasicBlock, Bottleneck, ResNet


class ResNetMLP(ResNet):
    """``ResNet`` whose ``fc`` is replaced by Jo-SRC's two-layer MLP ``head``."""

    fresh_head = "head"  # the module --pretrained leaves initialised (ImageNet files have an fc instead)

    def __init__(self, block: type[BasicBlock | Bottleneck], num_blocks: tuple[int, int, int, int],
                 num_classes: int, in_channels: int = 3, width: int = 64, mlp_hidden: int = 2) -> None:
        super().__init__(block, num_blocks, num_classes=num_classes, in_channels=in_channels, width=width)
        del self.fc
        features = self.num_features
        hidden = round(mlp_hidden * features)
        self.head = mlp_head(features, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x in_channels x H x W`` -> ``N x num_classes`` logits (N >= 2 in training: BatchNorm1d)."""
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.head(torch.flatten(self.avgpool(out), 1))


def resnet18_mlp(num_classes: int, in_channels: int = 3, width: int | None = None) -> ResNetMLP:
    """ResNet-18 body + MLP head 512 -> 1024 -> C (Jo-SRC Clothing1M); ``width``: the body's base width."""
    return ResNetMLP(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width or 64)


def resnet50_mlp(num_classes: int, in_channels: int = 3, width: int | None = None) -> ResNetMLP:
    """ResNet-50 body + MLP head 2048 -> 4096 -> C (Jo-SRC Food-101N); ``width``: the body's base width."""
    return ResNetMLP(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width or 64)
