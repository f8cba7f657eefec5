"""Images kept as one uint8 tensor on the device; batches built by index, augmented as a batch.

No per-sample Python: a batch is a gather of rows, a random crop done as one gather with
per-sample offsets into a zero-padded copy, a flip done with ``torch.where``, then normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def crop_padding(image_size: int) -> int:
    """Zero padding for the random crop: 4 pixels at 32x32 (official), scaled to the image size."""
    return max(1, round(4 * image_size / 32))


class DeviceImages:
    """A set of uint8 images living on ``device`` as N x C x H x W.

    ``batch(idx, augment, generator)`` returns float32 N x C x H x W normalised images.
    """

    def __init__(self, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str, channels_last: bool = False):
        device = torch.device(device)
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(-1)
        self.images = tensor.permute(0, 3, 1, 2).contiguous().to(device)
        self.device = device
        channels = self.images.shape[1]
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32, device=device))).view(1, channels, 1, 1)
        self.shift = (torch.tensor(mean, dtype=torch.float32, device=device)
                      / torch.tensor(std, dtype=torch.float32, device=device)).view(1, channels, 1, 1)
        self.channels_last = channels_last
        self.pad = crop_padding(self.images.shape[-1])

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        out = images_uint8.float() * self.scale - self.shift
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def batch(self, idx: torch.Tensor, augment: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        raw = self.images[idx]
        if augment:
            raw = random_crop_flip(raw, self.pad, generator)
        return self.normalise(raw)


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding and a random horizontal flip, per sample.

    images: uint8 (or float) B x C x H x W on any device. Offsets and flips are drawn from
    ``generator`` (on the images' device), so the same generator state gives the same batch.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), device=device, generator=generator)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    rows = offsets[0].view(batch, 1) + torch.arange(height, device=device).view(1, height)
    cols = offsets[1].view(batch, 1) + torch.arange(width, device=device).view(1, width)
    # A flip is a reversed column order, folded into the same gather.
    cols = torch.where(flip.view(batch, 1), cols.flip(1), cols)
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    c = torch.arange(channels, device=device).view(1, channels, 1, 1)
    return padded[b, c, rows.view(batch, 1, height, 1), cols.view(batch, 1, 1, width)]


def iterate_batches(n: int, batch_size: int, device: torch.device | str,
                    generator: torch.Generator | None = None, shuffle: bool = True,
                    indices: torch.Tensor | None = None):
    """Yield index tensors covering ``indices`` (or 0..n-1) once, shuffled with ``generator``.

    The last batch may be smaller (like a DataLoader with drop_last=False).
    """
    if indices is None:
        indices = torch.arange(n, device=device)
    if shuffle:
        indices = indices[torch.randperm(len(indices), device=indices.device, generator=generator)]
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]
