import numpy as np
import torch

from cdmix.data.batches import DeviceImages, crop_padding, random_crop_flip


def _images(n=6, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_padding_scales_with_image_size():
    assert crop_padding(32) == 4 and crop_padding(8) == 1 and crop_padding(64) == 8


def test_normalise_matches_formula():
    raw = _images()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    images = DeviceImages(raw, mean, std, "cpu")
    out = images.batch(torch.tensor([2, 0]), augment=False)
    expected = (torch.from_numpy(raw[[2, 0]]).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_crop_flip_equals_per_sample_reference():
    raw = torch.from_numpy(_images(n=16, size=8)).permute(0, 3, 1, 2).contiguous()
    pad = 2
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(raw, pad, gen)
    # Same draws, applied one sample at a time the slow, obvious way.
    gen = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 2 * pad + 1, (2, 16), generator=gen)
    flips = torch.rand(16, generator=gen) < 0.5
    padded = torch.nn.functional.pad(raw, (pad,) * 4)
    for i in range(16):
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        crop = padded[i, :, dy:dy + 8, dx:dx + 8]
        if flips[i]:
            crop = crop.flip(-1)
        assert torch.equal(out[i], crop)
    assert flips.any() and (~flips).any()
    assert not torch.equal(out, raw)  # augmentation did something


def test_augment_is_seeded():
    images = DeviceImages(_images(), (0.5,) * 3, (0.25,) * 3, "cpu")
    idx = torch.arange(6)
    a = images.batch(idx, True, torch.Generator().manual_seed(1))
    b = images.batch(idx, True, torch.Generator().manual_seed(1))
    c = images.batch(idx, True, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_single_channel_images():
    images = DeviceImages(_images(channels=1)[..., 0], (0.5,), (0.5,), "cpu")
    assert images.batch(torch.arange(3), True, torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)
