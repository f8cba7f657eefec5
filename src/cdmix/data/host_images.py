"""Images that stay on the host (in memory, or in an image store on disk), batches built on the device.

``HostImages`` has ``DeviceImages``' interface (``batch``, ``subset``, ``prefetch``, ``len``,
``shape``, ``device``). A batch's rows are gathered on the host (into pinned memory on CUDA),
copied with ``non_blocking=True``, and cropped, flipped and normalised on the device with the
same functions and random draws as ``DeviceImages``, so a run gives the same pixels whichever
placement holds its images.

``prefetch(index_batches)`` gathers the rows of the next batches on background threads while the
current step runs; ``batch(idx)`` then takes the rows gathered for ``idx`` (the very tensor object
that was announced). Calling ``batch`` again with the same ``idx`` (two augmented views) reuses the
rows already on the device.

Placement (``--data-placement``): ``device`` keeps today's device-resident uint8 tensor; ``host``
reads the images into memory; ``disk`` reads rows from the store file as needed; ``auto`` is
``device`` when the uint8 images take < 25% of the free device memory, else ``disk`` (``host``
for a source without a store).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from cdmix.data.batches import (DeviceImages, crop_batch, crop_padding, normalisation, normalise,
                                random_crop_flip)
from cdmix.data.store import StoreView, available_memory

PREFETCH_DEPTH = 3  # batches gathered ahead per announced sequence
DEVICE_SHARE = 0.25  # auto: the images may take this part of the free device memory

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cdmix-prefetch")
        return _executor


class _Ahead:
    """Gathers of one announced sequence of index batches, at most ``depth`` ahead of the consumer."""

    def __init__(self, images: "HostImages", batches: Sequence[torch.Tensor], depth: int):
        self.images, self.depth = images, depth
        sizes = [len(b) for b in batches]
        flat = torch.cat(list(batches)).cpu().numpy() if batches else np.zeros(0, np.int64)  # one sync
        self.todo = deque(zip(batches, np.split(flat, np.cumsum(sizes)[:-1]) if batches else []))
        self.pending: deque[tuple[torch.Tensor, Future]] = deque()
        self.fill()

    def fill(self) -> None:
        while self.todo and len(self.pending) < self.depth:
            key, host_idx = self.todo.popleft()
            self.pending.append((key, _pool().submit(self.images.gather, host_idx)))

    def take(self, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.pending or self.pending[0][0] is not idx:
            return None
        rows = self.pending.popleft()[1].result()
        self.fill()
        return rows

    def close(self) -> None:
        self.todo.clear()
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()


class HostImages:
    """uint8 N x H x W x C images on the host (an array, or a ``StoreView`` of a store on disk).

    ``batch(idx, augment, generator)`` returns float32 B x C x h x w normalised images on ``device``
    (h = w = ``crop`` when the images are cropped), the same values ``DeviceImages`` would give.
    """

    def __init__(self, images: np.ndarray | StoreView, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str, channels_last: bool = False, crop: int | None = None,
                 resized_crop: bool = False):
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[..., None]
        self.source = images
        self.rows = np.arange(len(images))
        self.device = torch.device(device)
        height, width, channels = images.shape[1:4]
        self.image_shape = (height, width, channels)
        self.scale, self.shift = normalisation(mean, std, self.device)
        self.channels_last = channels_last
        self.pad = crop_padding(width)
        self.crop = crop if crop is not None and (crop < min(height, width) or resized_crop) else None
        self.resized_crop = resized_crop
        self.pin = self.device.type == "cuda"
        self._ahead: list[_Ahead] = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (idx, its rows on the device)
        self.waited = 0.0  # seconds ``batch`` waited for rows from the host (prefetch not ready, or none)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        height, width, channels = self.image_shape
        return torch.Size((len(self.rows), channels, height, width))

    def subset(self, idx: torch.Tensor) -> "HostImages":
        """The images at ``idx`` (no copy: the same host images, other rows)."""
        sub = object.__new__(HostImages)
        sub.__dict__.update(self.__dict__)
        sub.rows = self.rows[idx.cpu().numpy()]
        sub._ahead, sub._last, sub.waited = [], None, 0.0
        return sub

    # ----- host side
    def gather(self, idx: np.ndarray) -> torch.Tensor:
        """uint8 B x H x W x C rows at positions ``idx`` (host, pinned on CUDA). Thread-safe."""
        rows = self.rows[idx]
        out = torch.empty((len(rows), *self.image_shape), dtype=torch.uint8, pin_memory=self.pin)
        if isinstance(self.source, StoreView):
            self.source.reader.read_into(self.source.rows[rows], out.numpy())
        else:  # in memory: one multi-threaded index_select that releases the GIL
            torch.index_select(torch.from_numpy(self.source), 0, torch.from_numpy(rows), out=out)
        return out

    @contextlib.contextmanager
    def prefetch(self, batches: Sequence[torch.Tensor], depth: int = PREFETCH_DEPTH):
        """Within the ``with`` block, gather the rows of ``batches`` (index tensors, in the order they
        will be asked for) ahead of time."""
        ahead = _Ahead(self, list(batches), depth)
        self._ahead.append(ahead)
        try:
            yield
        finally:
            ahead.close()
            self._ahead.remove(ahead)

    def _device_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 B x C x H x W (a channels-last view) of the rows at ``idx``, on the device."""
        if self._last is not None and self._last[0] is idx:
            return self._last[1]
        t0 = time.perf_counter()
        host = None
        for ahead in self._ahead:
            host = ahead.take(idx)
            if host is not None:
                break
        if host is None:
            host = self.gather(idx.cpu().numpy())
        self.waited += time.perf_counter() - t0
        rows = host.to(self.device, non_blocking=self.pin).permute(0, 3, 1, 2)
        self._last = (idx, rows)
        return rows

    # ----- device side
    def raw_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``idx`` as stored, uncropped: B x C x H x W on the device."""
        return self._device_rows(idx)

    def batch(self, idx: torch.Tensor, augment: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        images = self._device_rows(idx)
        if self.crop is not None:
            images = crop_batch(images, self.crop, augment, self.resized_crop, generator)
        elif augment:
            images = random_crop_flip(images, self.pad, generator)
        return normalise(images, self.scale, self.shift, self.channels_last)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def reuse_freed_host_memory(limit: int = 1 << 30) -> bool:
    """Let glibc's malloc keep and reuse freed blocks of up to ``limit`` bytes.

    By default glibc hands every block over 32 MB straight back to the kernel, so each 224 px batch
    (64 x 3 x 224 x 224 floats = 38 MB) and each large activation is fresh memory whose pages fault
    in on first touch: on a 2-core VM that made normalising a batch of 64 at 224 px 40% slower and a
    training step of a width-8 ResNet-18 (batch 32, 224 px) 15% slower. Raising the thresholds keeps
    those blocks for the next batch; peak resident memory of that step did not change (537 vs 549 MB).
    A no-op off glibc; returns whether it applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * limit))


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: available memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


def choose_placement(requested: str, train_images, test_images, device: str | torch.device) -> str:
    """The placement a run uses: ``requested`` unless it is ``auto`` (see the module docstring)."""
    if requested != "auto":
        return requested
    nbytes = int(train_images.nbytes) + int(test_images.nbytes)
    if nbytes < DEVICE_SHARE * free_memory(torch.device(device)):
        return "device"
    return "disk" if isinstance(train_images, StoreView) else "host"


def place_images(images, placement: str, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool, crop: int | None, resized_crop: bool) -> DeviceImages | HostImages:
    """``DeviceImages`` (placement device) or ``HostImages`` (host: read into memory; disk: rows
    read from the store as needed) of ``images`` (an array or a ``StoreView``)."""
    if placement == "device":
        return DeviceImages(np.asarray(images), mean, std, device, channels_last, crop, resized_crop)
    if placement == "host":
        images = np.asarray(images)
    return HostImages(images, mean, std, device, channels_last, crop, resized_crop)
