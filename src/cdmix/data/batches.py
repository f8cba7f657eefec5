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

    def raw_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``idx`` as stored, uncropped: B x C x H x W on the device."""
        return self.images[idx]

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


RESIZED_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params draws up to 10 boxes


def resized_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                       device: torch.device | str, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes ``(top, left, box_height, box_width)``, int64 (B,) each, sampled as
    torchvision's ``RandomResizedCrop.get_params``, for a whole batch at once.

    Per sample, up to 10 tries of area ``~ U(scale) x H x W`` and aspect ratio ``exp(U(log ratio))``,
    sides ``round(sqrt(area x ratio))`` wide and ``round(sqrt(area / ratio))`` high; the first try
    whose box fits in the image is used, its position uniform among the positions that fit. When
    none of the 10 fits: the centre crop of the whole image, its ratio clamped to ``ratio``.
    All 10 tries are drawn for every sample (then the first that fits is picked), so the number of
    random draws never depends on the data.

    Draw order: ``rand(2, 10, B)`` (area, log ratio of the 10 tries), then ``rand(2, B)`` (row,
    column position; ignored for the centre-crop fallback).
    """
    u = torch.rand(2, RESIZED_CROP_TRIES, batch, device=device, generator=generator).double()
    position = torch.rand(2, batch, device=device, generator=generator).double()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u[1])
    box_w = torch.round(torch.sqrt(area * aspect))
    box_h = torch.round(torch.sqrt(area / aspect))
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)  # 10 x B
    first = fits.to(torch.int32).argmax(dim=0, keepdim=True)  # the first try that fits (0 if none)
    found = fits.any(dim=0)
    box_w, box_h = box_w.gather(0, first)[0].long(), box_h.gather(0, first)[0].long()
    top = (position[0] * (height - box_h + 1)).floor().long()
    left = (position[1] * (width - box_w + 1)).floor().long()
    # torchvision's fallback: the whole image, cut to the nearest allowed ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    box_h = torch.where(found, box_h, fallback_h)
    box_w = torch.where(found, box_w, fallback_w)
    top = torch.where(found, top, (height - fallback_h) // 2)
    left = torch.where(found, left, (width - fallback_w) // 2)
    return top, left, box_h, box_w


def resized_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, box_h: torch.Tensor,
                 box_w: torch.Tensor, flip: torch.Tensor, crop: int) -> torch.Tensor:
    """Each sample's box ``[top, top + box_h) x [left, left + box_w)`` resized to ``crop x crop``
    (bilinear, half-pixel centres) and mirrored where ``flip``, as one ``grid_sample``.

    The same pixels as cutting the box out and ``F.interpolate(mode="bilinear",
    align_corners=False, antialias=False)``: sample positions are clamped to the box's own pixel
    centres, so nothing outside the box leaks in at its edges. Returns float 0..255 (for uint8
    input), B x C x crop x crop.
    """
    batch, _, height, width = images.shape
    steps = torch.arange(crop, device=images.device, dtype=torch.float32) + 0.5  # output pixel centres

    def source(start: torch.Tensor, size: torch.Tensor, extent: int) -> torch.Tensor:
        start, size = start.float().view(-1, 1), size.float().view(-1, 1)
        pixel = (start + steps * size / crop - 0.5).clamp(min=start, max=start + size - 1)
        return (pixel + 0.5) * (2.0 / extent) - 1.0  # grid_sample's coordinates (align_corners=False)

    gy = source(top, box_h, height)
    gx = source(left, box_w, width)
    gx = torch.where(flip.view(-1, 1), gx.flip(1), gx)
    grid = torch.stack([gx.view(batch, 1, crop).expand(batch, crop, crop),
                        gy.view(batch, crop, 1).expand(batch, crop, crop)], dim=-1)
    return torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


def random_resized_crop_flip(images: torch.Tensor, crop: int, generator: torch.Generator | None,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip of a whole batch with one ``grid_sample`` (bilinear).

    The boxes are torchvision's (:func:`resized_crop_boxes`: up to 10 tries, then the centre
    crop). The one remaining difference is the resampling: bilinear without antialiasing
    (:func:`resized_crop`). torchvision resizes tensors with ``antialias=True`` and PIL images with
    PIL's filters; when a box is larger than ``crop`` (e.g. 256 px images to 224 crops) those
    average over more source pixels than our 2x2 taps. When the box is at most ``crop`` (CIFAR's
    32 px to 32, always the case there) it is an upscale, where antialiasing changes nothing.

    Draw order: :func:`resized_crop_boxes`' ``rand(2, 10, B)`` and ``rand(2, B)``, then
    ``rand(B) < 0.5`` (flip). Returns float pixel values 0..255, B x C x crop x crop.
    """
    batch, _, height, width = images.shape
    top, left, box_h, box_w = resized_crop_boxes(batch, height, width, scale, ratio, images.device, generator)
    flip = torch.rand(batch, device=images.device, generator=generator) < 0.5
    return resized_crop(images, top, left, box_h, box_w, flip, crop)


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



# ----------------------------------------------------------------------------------------------
# SimCLR views (SupContrast's augmentation, batched)
# ----------------------------------------------------------------------------------------------

SIMCLR_SCALE = (0.2, 1.0)  # RandomResizedCrop area range
SIMCLR_JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter brightness, contrast, saturation, hue
SIMCLR_JITTER_P = 0.8
SIMCLR_GRAYSCALE_P = 0.2
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W luma of B x C x H x W (1 channel: itself)."""
    if x.shape[1] != 3:
        return x[:, :1]
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor, top: float) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0, top)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor, top: float = 255.0) -> torch.Tensor:
    """``clamp(factor * x)`` per sample (torchvision's adjust_brightness); pixel range 0..``top``."""
    return _blend(x, torch.zeros_like(x), factor, top)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor, top: float = 255.0) -> torch.Tensor:
    """Blend with the image's mean grey level (torchvision's adjust_contrast)."""
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor, top)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor, top: float = 255.0) -> torch.Tensor:
    """Blend with the image's greyscale version (torchvision's adjust_saturation); 1 channel: as is."""
    return x if x.shape[1] != 3 else _blend(x, _grayscale(x), factor, top)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) per sample, keeping HSV saturation and value
    (torchvision's adjust_hue, the same RGB -> HSV -> RGB maps in closed form); 1 channel: as is."""
    if x.shape[1] != 3:
        return x
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # Hue in sixths of a turn, red first, then green, then blue where several channels are the max.
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (hue + 6 * shift.view(-1, 1, 1)) % 6
    out = []
    for n in (5, 3, 1):  # R, G, B = v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6
        k = (n + hue) % 6
        out.append(value - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, dim=1)


def _where_rows(x: torch.Tensor, chosen: torch.Tensor, op, factor: torch.Tensor) -> torch.Tensor:
    """``op(x, factor)`` on the rows where ``chosen``, the others unchanged (on a CPU in place)."""
    if x.device.type == "cpu":  # compute only the chosen rows (an index costs no device sync here)
        rows = chosen.nonzero().squeeze(1)
        if len(rows):
            x[rows] = op(x[rows], factor[rows])
        return x
    return torch.where(chosen.view(-1, 1, 1, 1), op(x, factor), x)  # no host sync on an accelerator


def color_distort(x: torch.Tensor, generator: torch.Generator | None,
                  jitter: tuple[float, float, float, float] = SIMCLR_JITTER, jitter_p: float = SIMCLR_JITTER_P,
                  grayscale_p: float = SIMCLR_GRAYSCALE_P) -> torch.Tensor:
    """SupContrast's colour augmentation on a float B x C x H x W batch of pixel values 0..255:
    ``RandomApply([ColorJitter(*jitter)], p=jitter_p)`` then ``RandomGrayscale(grayscale_p)``.

    ColorJitter per sample, as torchvision: brightness, contrast and saturation factors ~
    ``U(1 - j, 1 + j)``, hue shift ~ ``U(-j_hue, j_hue)``, the four applied in a random order,
    each result clamped to 0..255. Grayscale: every channel set to the luma (0.2989 R + 0.587 G +
    0.114 B). One-channel images take brightness and contrast only. Computed in float on the
    batch's device (torchvision on PIL images rounds to uint8 after each step; we do not).

    Draw order: ``rand(B)`` (jitter applied where < jitter_p), ``rand(4, B)`` (brightness,
    contrast, saturation, hue factors), ``rand(B, 4)`` (argsort: each sample's order of the four),
    ``rand(B)`` (grayscale where < grayscale_p). Returns a new float tensor.
    """
    batch = x.shape[0]
    device = x.device
    apply = torch.rand(batch, device=device, generator=generator) < jitter_p
    u = torch.rand(4, batch, device=device, generator=generator)
    order = torch.rand(batch, 4, device=device, generator=generator).argsort(dim=1)
    gray = torch.rand(batch, device=device, generator=generator) < grayscale_p
    factors = [1 + (2 * u[i] - 1) * jitter[i] for i in range(3)] + [(2 * u[3] - 1) * jitter[3]]
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    x = x.to(torch.float32, copy=True)  # ours to change in place
    for slot in range(4):
        for op_index, (op, factor) in enumerate(zip(ops, factors)):
            if jitter[op_index] > 0:
                x = _where_rows(x, apply & (order[:, slot] == op_index), op, factor)
    if x.shape[1] == 3:
        x = _where_rows(x, gray, lambda rows, _: _grayscale(rows).expand_as(rows), u[0])
    return x


def simclr_views(images, idx: torch.Tensor, crop: int, generator: torch.Generator | None,
                 scale: tuple[float, float] = SIMCLR_SCALE) -> torch.Tensor:
    """Two SimCLR views of each image at ``idx``, normalised: a 2B x C x crop x crop float32 batch,
    rows ``0..B-1`` the first view of each image, ``B..2B-1`` the second.

    Each view (SupContrast's SimCLR augmentation): RandomResizedCrop(crop, scale) from the whole
    stored image (:func:`random_resized_crop_flip`, torchvision's box sampling), horizontal flip,
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 and RandomGrayscale(0.2) (:func:`color_distort`),
    then the images' normalisation and memory format. ``images``: ``DeviceImages`` or
    ``HostImages`` (anything with ``raw_rows(idx)``, ``scale``, ``shift``, ``channels_last``). All
    random numbers come from ``generator``: the crop draws of the 2B views, then the colour draws
    of the 2B views, so the same generator state gives the same views.
    """
    raw = images.raw_rows(idx)
    both = torch.cat([raw, raw])
    x = random_resized_crop_flip(both, crop, generator, scale=scale)
    x = color_distort(x, generator)
    return normalise(x, images.scale, images.shift, images.channels_last)
