"""Model registry (timm-style) and a FLOP counter.

``create_model(name, num_classes, in_channels=3, width=None)`` builds a fresh
``nn.Module`` whose ``forward(x)`` maps an ``N x C x H x W`` float tensor to
``N x num_classes`` logits. ``width`` means, per model:

* ``preact_resnet18``: base width (default 64 -> stages 64, 128, 256, 512);
* ``wrn28``: widen factor k (default 2 -> WRN-28-2);
* ``small_cnn``: first-stage channels (default 32).

All models end in adaptive average pooling, so any input of at least 8x8 works.
Importing this package builds nothing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cdmix.errors import UserError
from cdmix.models.preact_resnet import preact_resnet18
from cdmix.models.small import small_cnn
from cdmix.models.wide_resnet import wrn28

__all__ = ["create_model", "model_names", "count_flops"]

_Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, _Builder] = {
    "preact_resnet18": preact_resnet18,
    "wrn28": wrn28,
    "small_cnn": small_cnn,
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
    if builder is None:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    num_classes = _positive_int(num_classes, "num_classes")
    in_channels = _positive_int(in_channels, "in_channels")
    if width is not None:
        width = _positive_int(width, "width")
    return builder(num_classes=num_classes, in_channels=in_channels, width=width)


def count_flops(model: nn.Module, input_shape: tuple[int, ...] | list[int] | torch.Size) -> int:
    """Forward FLOPs of ``model`` for ONE example, counted as 2 x multiply-accumulates.

    Only ``nn.Conv2d`` and ``nn.Linear`` layers count (biases, BN, activations and
    pooling are ignored). ``input_shape`` is ``(C, H, W)`` or ``(N, C, H, W)``; a
    leading batch size is ignored, a single example of the given ``C x H x W`` is
    run through the model (in eval mode, without grad; its train/eval mode is
    restored). Example: preact_resnet18 at 32x32 -> about 0.557e9 MACs -> about
    1.11e9 FLOPs.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")

    macs = 0

    def conv_hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(mod, nn.Conv2d)
        kh, kw = mod.kernel_size
        macs += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(mod, nn.Linear)
        macs += out.numel() * mod.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs
