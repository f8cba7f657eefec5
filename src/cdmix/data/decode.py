"""Decoding image files for a store: any PIL image to 8-bit RGB, the short-side resize with a center
square crop, a cap on the pixels a file may decode to, and per-image channel statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# An image file may decode to at most this many pixels, or (32 x size)^2 when that is more: a small
# file declaring a huge image (a decompression bomb) is skipped instead of costing gigabytes per worker.
MIN_PIXEL_CAP = 40_000_000


def to_rgb(img):
    """A PIL image as 8-bit RGB: 16/32-bit and float images scaled to 8 bits (not clipped white),
    palette / alpha images composited on white, CMYK / YCbCr / L converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        img = Image.fromarray(np.rint(np.clip(values / top, 0, 1) * 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_square(img, size: int):
    """Resize the short side to ``size`` and keep the center ``size x size`` (one resampling step:
    the center square of the source is resized, bilinear with antialiasing)."""
    from PIL import Image

    width, height = img.size
    if (width, height) == (size, size):
        return img
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """``size x size x 3`` uint8 RGB of the image file ``path`` (raises on an unreadable file)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at the smallest scale that is still >= size
        cap = max_decoded_pixels(size)
        if img.width * img.height > cap:
            raise ValueError(f"declares {img.width} x {img.height} pixels, more than the {cap} decoded for "
                             f"{size} px images")
        img = ImageOps.exif_transpose(img)
        return np.asarray(fit_square(to_rgb(img), size), dtype=np.uint8)


def max_decoded_pixels(size: int) -> int:
    """How many pixels an image file may decode to when the store holds ``size`` px images."""
    return max(MIN_PIXEL_CAP, (32 * size) ** 2)


def image_stats(images: np.ndarray) -> np.ndarray:
    """k x 2C float64: per image, channel means of x and x^2 with x = pixel / 255."""
    flat = images.reshape(len(images), -1, images.shape[-1]).astype(np.float32) / 255.0
    return np.concatenate([flat.mean(1), (flat * flat).mean(1)], axis=1).astype(np.float64)


def array_chunks(images_of: Callable[[], Iterator[np.ndarray]], size: int, chunks: list[np.ndarray]):
    """``produce`` for an already decoded source (an npz): ``images_of()`` yields the source's
    images in row order, in blocks; the pending chunks' rows are resized to ``size`` (short side,
    center crop) when the source has another size."""
    from PIL import Image

    wanted = {int(r): k for k, rows in enumerate(chunks) for r in rows}
    parts: dict[int, dict[int, np.ndarray]] = {k: {} for k in range(len(chunks))}
    row = 0
    for block in images_of():
        for image in block:
            k = wanted.get(row)
            if k is not None:
                if image.shape[:2] != (size, size):
                    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
                    image = np.asarray(fit_square(pil, size), dtype=np.uint8).reshape(size, size, -1)
                parts[k][row] = image
                if len(parts[k]) == len(chunks[k]):
                    rows = chunks[k]
                    images = np.stack([parts[k].pop(int(r)) for r in rows])
                    yield rows, images, image_stats(images), []
            row += 1
