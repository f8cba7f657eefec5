"""Model registry (timm-style).

``create_model(name, num_classes, in_channels=3, width=None)`` builds a fresh
``nn.Module`` whose ``forward(x)`` maps an ``N x C x H x W`` float tensor to
``N x num_classes`` logits. ``width`` means, per model:

* ``preact_resnet18``: base width (default 64 -> stages 64, 128, 256, 512);
* ``wrn28``: widen factor k (default 2 -> WRN-28-2);
* ``small_cnn``: first-stage channels (default 32);
* ``josrc_cnn``: first-block channels (default 64; the official Jo-SRC CIFAR network);
* ``resnet18``, ``resnet34``, ``resnet50``: ImageNet-style (torchvision layout and key
  names), base width (default 64 -> stages 64, 128, 256, 512; other widths don't fit
  pretrained weights).
* ``resnet18_cifar``: ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool), C2D's and
  SupContrast's CIFAR network, torchvision names (``fc``); base width (default 64).
* ``resnet18_mlp``, ``resnet50_mlp``: the same bodies with Jo-SRC's MLP head (feature size
  d -> 2d -> classes) instead of ``fc``; ``--pretrained`` loads an ImageNet ResNet's body.
* ``inception_resnet_v2``: DivideMix's WebVision network (fixed widths: ``width`` must be
  None; inputs of at least 75x75).

``timm:NAME`` builds timm's ``NAME`` (its weights only with ``--pretrained timm:NAME``) when the optional timm is
installed; :func:`model_names` lists only cdmix's own names.

All models end in adaptive average pooling, so any input of at least 8x8 works (75x75 for
``inception_resnet_v2``).
Importing this package builds nothing.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from cdmix.errors import UserError
from cdmix.models.inception_resnet_v2 import inception_resnet_v2
from cdmix.models.josrc_cnn import josrc_cnn
from cdmix.models.preact_resnet import preact_resnet18
from cdmix.models.resnet import resnet18, resnet18_cifar, resnet34, resnet50
from cdmix.models.resnet_mlp import resnet18_mlp, resnet50_mlp
from cdmix.models.small import small_cnn
from cdmix.models.timm_models import PREFIX as _TIMM_PREFIX
from cdmix.models.timm_models import create_timm_model
from cdmix.models.wide_resnet import wrn28

__all__ = ["create_model", "model_names"]

_Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, _Builder] = {
    "preact_resnet18": preact_resnet18,
    "wrn28": wrn28,
    "small_cnn": small_cnn,
    "josrc_cnn": josrc_cnn,
    "resnet18": resnet18,
    "resnet18_cifar": resnet18_cifar,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet18_mlp": resnet18_mlp,
    "resnet50_mlp": resnet50_mlp,
    "inception_resnet_v2": inception_resnet_v2,
}


def model_names() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def create_model(name: str, num_classes: int, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """Build the registered model ``name``; raises :class:`UserError` for an unknown name or bad sizes."""
    builder = _REGISTRY.get(name)
    if builder is None and isinstance(name, str) and name.startswith(_TIMM_PREFIX):
        builder = functools.partial(create_timm_model, name[len(_TIMM_PREFIX):])
    if builder is None:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    num_classes = _positive_int(num_classes, "num_classes")
    in_channels = _positive_int(in_channels, "in_channels")
    if width is not None:
        width = _positive_int(width, "width")
    return builder(num_classes=num_classes, in_channels=in_channels, width=width)
