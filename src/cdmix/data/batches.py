"""Images kept as one uint8 tensor on the device; batches built by index, augmented as a batch.

No per-sample Python: an augmented batch is ONE gather from a strided view of every crop window
of a zero-padded copy of the images and of its mirror image (built once), indexed by
(row, row offset, column offset), then one fused uint8->float normalisation kernel.

Images larger than the training crop (e.g. 256 px store images, 224 px crops) take a random
crop without padding and a flip (one gather), or RandomResizedCrop (one ``grid_sample``); the
evaluation batches take the center crop. :func:`crop_batch` does either for any uint8 batch, so
images read from the host (``cdmix.data.host_images``) get the very same pixels.
"""

from __future__ import annotations

import contextlib
import math
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
                 device: torch.device | str, channels_last: bool = False, crop: int | None = None,
                 resized_crop: bool = False):
        device = torch.device(device)
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(-1)
        self.device = device
        height, width = tensor.shape[1], tensor.shape[2]
        self.scale, self.shift = normalisation(mean, std, device)
        self.channels_last = channels_last
        self.pad = crop_padding(width)
        # Crop smaller than the images, or RandomResizedCrop: crop_batch; else the padded window path.
        self.crop = crop if crop is not None and (crop < min(height, width) or resized_crop) else None
        self.resized_crop = resized_crop
        # Cropped images stay stored H x W x C (a channels-last view): crop_batch then gathers whole
        # window rows, 2x faster than from N x C x H x W (benchmarks/store.py); same pixels either way.
        images_nchw = tensor.permute(0, 3, 1, 2)
        self.images = (images_nchw if self.crop is not None else images_nchw.contiguous()).to(device)

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
        return normalise(images_uint8, self.scale, self.shift, self.channels_last)

    def prefetch(self, batches: Sequence[torch.Tensor]):
        """Nothing to fetch ahead: the images are on the device already (see ``HostImages``)."""
        return contextlib.nullcontext()

    def batch(self, idx: torch.Tensor, augment: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.crop is not None:
            return self.normalise(crop_batch(self.images[idx], self.crop, augment, self.resized_crop, generator))
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


def normalisation(mean: Sequence[float], std: Sequence[float],
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each 1 x C x 1 x 1 on ``device``, so that ``uint8 * scale - shift`` is
    ``(x / 255 - mean) / std``."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
    shift = (torch.tensor(mean, dtype=torch.float32, device=device) / std_t).view(1, -1, 1, 1)
    return scale, shift


def normalise(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``images * scale - shift`` as float32 in the requested memory format (uint8 or float input)."""
    # The uint8 -> float32 cast written straight into the requested memory format, then two in-place
    # ops: bit-identical to ``x.float() * scale - shift``, and on CPUs twice as fast as a mixed-dtype
    # ``torch.mul(x_uint8, scale, out=...)`` (measured, 224 px batches).
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    out.copy_(images)
    return out.mul_(scale).sub_(shift)


def crop_batch(images: torch.Tensor, crop: int, augment: bool, resized: bool,
               generator: torch.Generator | None) -> torch.Tensor:
    """``crop x crop`` views of a B x C x H x W batch: evaluation (``augment`` False) the center
    crop; training a random crop and flip, or with ``resized`` RandomResizedCrop and flip (float)."""
    if not augment:
        top, left = (images.shape[-2] - crop) // 2, (images.shape[-1] - crop) // 2
        return images[..., top:top + crop, left:left + crop]
    if resized:
        return random_resized_crop_flip(images, crop, generator)
    return random_window_flip(images, crop, generator)


def random_window_flip(images: torch.Tensor, crop: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random ``crop x crop`` window (no padding) and a random horizontal flip per sample, as one
    gather. Draw order: ``randint(0, H-crop+1, (B,))``, ``randint(0, W-crop+1, (B,))`` (offsets),
    then ``rand(B) < 0.5`` (flip)."""
    batch, _, height, width = images.shape
    device = images.device
    dy = torch.randint(0, height - crop + 1, (batch,), device=device, generator=generator)
    dx = torch.randint(0, width - crop + 1, (batch,), device=device, generator=generator)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    if images.permute(0, 2, 3, 1).is_contiguous():  # rows stored B x H x W x C (host-read batches)
        return _nhwc_window_flip(images.permute(0, 2, 3, 1), dy, dx, flip, crop)
    steps = torch.arange(crop, device=device)
    rows = (dy[:, None] + steps).view(batch, crop, 1)
    cols = (dx[:, None] + torch.where(flip[:, None], crop - 1 - steps, steps)).view(batch, 1, crop)
    picked = images[torch.arange(batch, device=device).view(batch, 1, 1), :, rows, cols]  # B x crop x crop x C
    return picked.permute(0, 3, 1, 2)


def _nhwc_window_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                      crop: int) -> torch.Tensor:
    """``random_window_flip``'s pixels from a contiguous B x H x W x C batch, 2.5x faster on CPUs: one
    gather of each window's rows (crop x C contiguous bytes each) from a strided view of every
    window, then the flipped samples mirrored. Returns a B x C x crop x crop (channels-last) tensor."""
    batch, height, width, channels = images.shape
    windows = images.as_strided((batch, height - crop + 1, width - crop + 1, crop, crop * channels),
                                (height * width * channels, width * channels, channels, width * channels, 1),
                                images.storage_offset())
    out = windows[torch.arange(batch, device=images.device), dy, dx].view(batch, crop, crop, channels)
    if images.device.type == "cpu":  # mirror only the flipped half, in place (the index is free on a CPU)
        chosen = flip.nonzero().squeeze(1)
        out[chosen] = out[chosen].flip(2)
    else:  # no host sync on an accelerator
        out = torch.where(flip.view(batch, 1, 1, 1), out.flip(2), out)
    return out.permute(0, 3, 1, 2)


def random_resized_crop_flip(images: torch.Tensor, crop: int, generator: torch.Generator | None,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip of a whole batch with one ``grid_sample`` (bilinear).

    Per sample: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), the box's sides capped
    at the image's (instead of torchvision's re-draws), its position uniform inside the image.
    Draw order: ``rand(4, B)`` (area, ratio, x, y), then ``rand(B) < 0.5`` (flip). Returns float
    pixel values 0..255, B x C x crop x crop.
    """
    batch = images.shape[0]
    device = images.device
    u = torch.rand(4, batch, device=device, generator=generator)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # box sides as fractions of the image's
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = (1 - w) * (2 * u[2] - 1)
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (1 - h) * (2 * u[3] - 1)
    grid = torch.nn.functional.affine_grid(theta, [batch, images.shape[1], crop, crop], align_corners=False)
    return torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


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

