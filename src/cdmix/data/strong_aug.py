"""Strong augmentation for a student network: batched tensor ops on normalised images.

Applied on top of the usual crop/flip batch (``DeviceImages.batch``), to the student's inputs only
(teachers and pseudo-label forwards keep the weak views). Everything is one batched operation per
step, every random number comes from the ``torch.Generator`` passed in (on the images' device), so
the same generator state gives the same batch.

Operations, per sample:

* brightness: add ``b ~ U(-strength, strength)`` (in normalised units, i.e. about std units);
* contrast: scale the deviation from the image's own mean by ``c ~ U(1 - strength, 1 + strength)``;
* cutout (random erasing): a square of side ``round(cutout * size)`` centred at a random pixel
  (clipped at the border) is set to 0, which is the dataset mean after normalisation.
"""

from __future__ import annotations

import torch


def strong_augment(images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 0.4,
                   cutout: float = 0.5) -> torch.Tensor:
    """Brightness/contrast jitter and cutout on a float ``B x C x H x W`` batch (returns a new tensor).

    Args:
        images: normalised float images (any float dtype; computed in float32, returned in the
            input dtype and memory format).
        generator: random source on the images' device (None: the global one).
        strength: jitter range of brightness (additive) and contrast (multiplicative).
        cutout: side of the erased square as a fraction of the image side (0 disables cutout).
    """
    if images.ndim != 4:
        raise ValueError(f"expected a B x C x H x W batch, got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    device = images.device
    if batch == 0:
        return images.clone()
    x = images.float()
    u = torch.rand(batch, 4, device=device, generator=generator)
    brightness = ((u[:, 0] * 2 - 1) * strength).view(batch, 1, 1, 1)
    contrast = (1 + (u[:, 1] * 2 - 1) * strength).view(batch, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    side = int(round(cutout * min(height, width)))
    if side > 0:
        cy = (u[:, 2] * height).long().clamp_max(height - 1).view(batch, 1, 1)
        cx = (u[:, 3] * width).long().clamp_max(width - 1).view(batch, 1, 1)
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        half = side // 2
        inside = ((rows >= cy - half) & (rows < cy - half + side)
                  & (cols >= cx - half) & (cols < cx - half + side))
        x = x.masked_fill(inside.unsqueeze(1), 0.0)
    out = x.to(images.dtype)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
