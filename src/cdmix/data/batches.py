"""Images kept as one uint8 tensor on the device; batches built by index, augmented as a batch.

No per-sample Python: an augmented batch is ONE gather from a strided view of every crop window
of a zero-padded copy of the images and of its mirror image (built once), indexed by
(row, row offset, column offset), then one fused uint8->float normalisation kernel.
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

    def subset(self, idx: torch.Tensor) -> "DeviceImages":
        """The images at ``idx`` (a copy on the same device), with the same normalisation."""
        sub = object.__new__(DeviceImages)
        sub.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_window_cache"})
        sub.images = self.images[idx.to(self.device)]
        return sub

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        # uint8 * float32 promotes inside one kernel (no separate .float() copy); the result is written
        # straight into the requested memory format. Bit-identical to ``x.float() * scale - shift``.
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(images_uint8.shape, dtype=torch.float32, device=images_uint8.device,
                          memory_format=memory_format)
        torch.mul(images_uint8, self.scale, out=out)
        return out.sub_(self.shift)

    def batch(self, idx: torch.Tensor, augment: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if augment:
            raw = self._crop_flip_rows(idx, generator)
        else:
            raw = self.images[idx]
        return self.normalise(raw)

    def _windows(self) -> torch.Tensor:
        """Every crop window of every image and of its mirror image, as one strided view.

        Built once (lazily, on the first augmented batch) from a zero-padded copy of the images and
        a flipped copy of that: ``2N x C x (2p+1) x (2p+1) x H x W`` (a view, 2 x N x C x (H+2p) x
        (W+2p) bytes of storage). Rebuilt if ``self.images`` is replaced.
        """
        cache = self.__dict__.get("_window_cache")
        if cache is None or cache[0] is not self.images:
            windows = _crop_windows(self.images, self.pad)
            self._window_cache = (self.images, windows)
            return windows
        return cache[1]

    def _crop_flip_rows(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``random_crop_flip(self.images[idx], ...)`` as a single gather from the window view.

        Same random draws in the same order, so the same generator state gives the same pixels.
        """
        windows = self._windows()
        offsets, flip = _draw_crop_flip(idx.shape[0], self.pad, idx.device, generator)
        sel, dy, dx = _window_index(idx, offsets, flip, len(self.images), self.pad)
        return windows[sel, :, dy, dx]


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding and a random horizontal flip, per sample.

    images: uint8 (or float) B x C x H x W on any device. Offsets and flips are drawn from
    ``generator`` (on the images' device), so the same generator state gives the same batch.
    Draw order: ``randint(0, 2*pad+1, (2, B))`` (row, column offsets), then ``rand(B) < 0.5`` (flip).
    """
    batch = images.shape[0]
    offsets, flip = _draw_crop_flip(batch, pad, images.device, generator)
    sel, dy, dx = _window_index(torch.arange(batch, device=images.device), offsets, flip, batch, pad)
    return _crop_windows(images, pad)[sel, :, dy, dx]


def _draw_crop_flip(batch: int, pad: int, device: torch.device,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), device=device, generator=generator)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    return offsets, flip


def _crop_windows(images: torch.Tensor, pad: int) -> torch.Tensor:
    """``2B x C x (2p+1) x (2p+1) x H x W`` view: rows 0..B-1 crop the zero-padded images, rows
    B..2B-1 their mirror images. Indexing ``[row, :, dy, dx]`` gives one crop per row."""
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    both = torch.cat([padded, padded.flip(-1)])
    return both.unfold(2, height, 1).unfold(3, width, 1)


def _window_index(rows: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, n: int,
                  pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices into ``_crop_windows`` of ``n`` images: a flipped crop at column offset ``dx`` is the
    crop of the mirrored padded image at ``2*pad - dx``."""
    sel = rows + n * flip.to(rows.dtype)
    dx = torch.where(flip, 2 * pad - offsets[1], offsets[1])
    return sel, offsets[0], dx

