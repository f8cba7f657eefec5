"""The image store (decode, build, restart, refusal), host-held images, placements, --pretrained."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import cdmix
from cdmix import runs
from cdmix.cli import main as cli_main
from cdmix.config import Config
from cdmix.data import sources
from cdmix.data import store as image_store
from cdmix.data.batches import DeviceImages
from cdmix.data.host_images import HostImages, choose_placement
from cdmix.data.sources import load_source, prepare_store
from cdmix.data.store import StoreView, decode_image, fit_square, open_store
from cdmix.data.types import channel_stats
from cdmix.errors import UserError


def _picture(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth gradient with a few filled shapes: compresses and decodes like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([(xs * rng.uniform(50, 250) + ys * rng.uniform(0, 200)) % 256 for _ in range(3)], -1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        draw.ellipse([x0, y0, x0 + rng.integers(3, width), y0 + rng.integers(3, height)],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.asarray(img)


def _photo_folder(root: Path, per_class: int = 8) -> dict[str, Path]:
    """Two classes of JPEG/PNG files of different sizes and modes, plus the odd ones out."""
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (30 + 7 * i, 20 + 5 * ((i + c) % 4))
            pixels = _picture(100 * c + i, size)
            if i % 2:
                Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg", quality=90)
            else:
                Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    odd = {
        "gray16": root / "cat" / "g16.png",  # 16-bit grayscale: must not come out white
        "rgba": root / "dog" / "rgba.png",
        "palette": root / "dog" / "pal.png",
        "cmyk": root / "cat" / "cmyk.jpg",
        "truncated": root / "cat" / "cut.jpg",
        "fake": root / "dog" / "fake.png",
    }
    Image.fromarray(np.full((20, 24), 30000, np.uint16)).save(odd["gray16"])
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3] = 200, 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(odd["rgba"])
    Image.fromarray(_picture(7, (18, 18))).convert("P", palette=Image.Palette.ADAPTIVE).save(odd["palette"])
    Image.fromarray(_picture(8, (18, 22))).convert("CMYK").save(odd["cmyk"])
    buffer = odd["truncated"].with_suffix(".tmp")
    Image.fromarray(_picture(9, (40, 40))).save(buffer, format="JPEG")
    odd["truncated"].write_bytes(buffer.read_bytes()[:300])
    buffer.unlink()
    odd["fake"].write_text("not an image at all")
    return odd


# ------------------------------------------------------------------------------------------ decoding


def test_fit_square_keeps_the_center_of_the_short_side():
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, 20:40] = 255  # the middle third is white
    out = np.asarray(fit_square(Image.fromarray(pixels), 10))
    # only the center 20 x 20 survives (its border columns blend a little with their neighbours,
    # as a resize of the whole image followed by a center crop would)
    assert out.shape == (10, 10, 3) and out[:, 1:-1].min() == 255 and out.min() > 200
    tall = np.asarray(fit_square(Image.fromarray(pixels.transpose(1, 0, 2)), 10))
    assert tall[1:-1].min() == 255 and tall.min() > 200
    same = Image.fromarray(pixels[:, :20])
    assert np.array_equal(np.asarray(fit_square(same, 20)), pixels[:, :20])  # right size: untouched


def test_decode_modes(tmp_path):
    odd = _photo_folder(tmp_path)
    gray = decode_image(odd["gray16"], 8)
    assert gray.shape == (8, 8, 3) and np.all(np.abs(gray.astype(int) - round(30000 / 65535 * 255)) <= 1)
    rgba = decode_image(odd["rgba"], 16)
    assert np.array_equal(rgba[2, 5], [200, 0, 0]) and np.array_equal(rgba[13, 5], [255, 255, 255])
    assert decode_image(odd["palette"], 9).std() > 10 and decode_image(odd["cmyk"], 9).std() > 10
    for bad in ("truncated", "fake"):
        with pytest.raises(Exception):
            decode_image(odd[bad], 8)


# ------------------------------------------------------------------------------------------- building


def test_store_build_skips_bad_images_and_reads_back(tmp_path):
    _photo_folder(tmp_path / "photos")
    store = prepare_store(tmp_path / "photos", tmp_path / "store", 12, workers=1, progress=False)
    assert store.complete and len(store) == 16 + 6 and store.size == 12
    assert store.skipped_count() == 2
    listed = (tmp_path / "store" / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == ["cat/cut.jpg", "dog/fake.png"]
    images = np.load(tmp_path / "store" / "images.npy", mmap_mode="r")
    assert images.shape == (22, 12, 12, 3) and images.dtype == np.uint8
    names = store.samples.names
    for i, name in enumerate(names):
        if store.decoded[i]:
            assert np.array_equal(images[i], decode_image(tmp_path / "photos" / name, 12)), name
    assert store.samples.labels.tolist() == [0] * 11 + [1] * 11 and store.class_names == ["cat", "dog"]
    raw = load_source("store", str(tmp_path / "store"), seed=0)
    assert isinstance(raw.train_images, StoreView) and len(raw.train_labels) + len(raw.test_labels) == 20
    both = np.asarray(raw.train_images)
    assert both.shape == (len(raw.train_labels), 12, 12, 3)
    np.testing.assert_allclose(raw.mean, channel_stats(both)[0], atol=1e-6)
    np.testing.assert_allclose(raw.std, channel_stats(both)[1], atol=1e-5)
    rows = np.array([3, 0, 3])
    assert np.array_equal(raw.train_images.take(rows), both[rows])
    assert np.array_equal(np.asarray(raw.train_images[1:4]), both[1:4])
    assert open_store(tmp_path / "store").manifest["skipped"] == 2


def test_killed_build_resumes_and_equals_one_shot(tmp_path, monkeypatch):
    _photo_folder(tmp_path / "photos")
    one_shot = prepare_store(tmp_path / "photos", tmp_path / "one", 10, workers=1, progress=False, chunk_size=4)
    decoded = []
    real = image_store.decode_image
    monkeypatch.setattr(image_store, "decode_image", lambda path, size: decoded.append(path) or real(path, size))

    class Killed(Exception):
        pass

    def kill_after_two(done):
        if done >= 8:
            raise Killed

    with pytest.raises(Killed):
        image_store.build_store(tmp_path / "two", sources._file_samples(*_listing(tmp_path / "photos")),
                                ["cat", "dog"], 10, _decoder(tmp_path / "photos", 10), chunk_size=4,
                                progress=False, commit_every=0, after_commit=kill_after_two,
                                source=str(tmp_path / "photos"))
    assert len(decoded) == 8
    with pytest.raises(UserError, match="unfinished .*8 of 22"):
        open_store(tmp_path / "two")
    decoded.clear()
    finished = prepare_store(tmp_path / "photos", tmp_path / "two", 10, workers=1, progress=False, chunk_size=4)
    assert len(decoded) == 22 - 8  # only what was left
    for name in ("images.npy", "stats.npy", "status.npy", "skipped.txt", "samples.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert finished.skipped_count() == one_shot.skipped_count() == 2
    decoded.clear()
    prepare_store(tmp_path / "photos", tmp_path / "two", 10, workers=1, progress=False)
    assert decoded == []  # complete: reused, never rebuilt


def _listing(root: Path):
    root, paths, labels, is_test, _ = sources._scan_folder(str(root))
    return paths, root, labels, is_test


def _decoder(root: Path, size: int):
    _, paths, _, _, _ = sources._scan_folder(str(root))
    return sources._file_decoder(paths, size, 1)


def test_parallel_build_equals_serial(tmp_path):
    _photo_folder(tmp_path / "photos", per_class=12)
    prepare_store(tmp_path / "photos", tmp_path / "serial", 10, workers=1, progress=False, chunk_size=5)
    prepare_store(tmp_path / "photos", tmp_path / "parallel", 10, workers=2, progress=False, chunk_size=5)
    for name in ("images.npy", "status.npy", "skipped.txt"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


def test_store_of_other_files_or_size_is_refused(tmp_path):
    _photo_folder(tmp_path / "photos")
    prepare_store(tmp_path / "photos", tmp_path / "store", 10, workers=1, progress=False)
    with pytest.raises(UserError, match="holds 10 px images, 12 px were asked"):
        prepare_store(tmp_path / "photos", tmp_path / "store", 12, workers=1, progress=False)
    Image.fromarray(_picture(50, (20, 20))).save(tmp_path / "photos" / "dog" / "new.png")
    with pytest.raises(UserError, match=r"built from other files .*\(1 added \(e\.g\. dog/new\.png\)\); use --out"):
        prepare_store(tmp_path / "photos", tmp_path / "store", 10, workers=1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not an image store"):
        prepare_store(tmp_path / "photos", tmp_path / "other", 10, workers=1, progress=False)
    with pytest.raises(UserError, match="not an image store"):
        load_source("store", str(tmp_path / "other"))
    with pytest.raises(UserError, match="holds 10 px images, not 16"):
        load_source("store", str(tmp_path / "store"), image_size=16)


def test_prepare_cli(tmp_path, capsys):
    _photo_folder(tmp_path / "photos")
    assert cli_main(["prepare", str(tmp_path / "photos"), "--out", str(tmp_path / "s"), "--size", "16",
                     "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "20 images at 16px, 2 classes, 2 unreadable skipped" in out and "--dataset store" in out
    assert cli_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_npz_through_a_store(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = dict(train_images=rng.integers(0, 256, (30, 9, 9, 3), dtype=np.uint8), train_labels=np.arange(30) % 3,
                  test_images=rng.integers(0, 256, (6, 9, 9, 3), dtype=np.uint8), test_labels=np.arange(6) % 3,
                  train_true_labels=np.arange(30) % 3)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **arrays)
    small = load_source("npz", str(path))
    assert isinstance(small.train_images, np.ndarray)  # fits in memory: as before
    monkeypatch.setattr(sources, "available_memory", lambda: 10)  # pretend it does not
    large = load_source("npz", str(path), progress=False)
    assert isinstance(large.train_images, StoreView)
    assert np.array_equal(np.asarray(large.train_images), arrays["train_images"])
    assert np.array_equal(np.asarray(large.test_images), arrays["test_images"])
    assert np.array_equal(large.train_labels, arrays["train_labels"]) and large.train_true_labels is not None
    resized = prepare_store(path, tmp_path / "s", 6, progress=False, chunk_size=7)
    assert np.load(tmp_path / "s" / "images.npy").shape == (36, 6, 6, 3)
    assert resized.samples.names[30] == "test/0"


# ------------------------------------------------------------------------------- host-held images


@pytest.mark.parametrize("size, crop, resized", [(8, None, False), (8, 8, True), (20, 16, False), (20, 16, True)])
def test_host_images_give_the_device_images_pixels(tmp_path, size, crop, resized):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (30, size, size, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    view = StoreView(image_store.RowReader(tmp_path / "images.npy"), np.arange(30)[::-1])
    device = DeviceImages(pixels[::-1].copy(), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "cpu", crop=crop,
                          resized_crop=resized)
    for host in (HostImages(view, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "cpu", crop=crop, resized_crop=resized),
                 HostImages(pixels[::-1].copy(), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "cpu", crop=crop,
                            resized_crop=resized)):
        assert host.shape == device.shape and len(host) == 30
        batches = [torch.tensor([3, 1, 7, 7, 29]), torch.tensor([0, 2])]
        with host.prefetch(batches):
            for idx in batches:
                for augment in (True, False):
                    a = device.batch(idx, augment, torch.Generator().manual_seed(5))
                    b = host.batch(idx, augment, torch.Generator().manual_seed(5))
                    assert torch.equal(a, b)
        sub = torch.tensor([4, 2, 9])
        a = device.subset(sub).batch(torch.tensor([2, 0]), True, torch.Generator().manual_seed(1))
        b = host.subset(sub).batch(torch.tensor([2, 0]), True, torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape[-1] == (crop or size)


def test_prefetch_gathers_each_batch_once(monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    host = HostImages(pixels, (0.5,) * 3, (0.25,) * 3, "cpu")
    gathered = []
    real = HostImages.gather
    monkeypatch.setattr(HostImages, "gather", lambda self, idx: gathered.append(idx.tolist()) or real(self, idx))
    batches = list(torch.randperm(40).split(8))
    with host.prefetch(batches):
        for idx in batches:
            views = [host.batch(idx, True, torch.Generator().manual_seed(0)) for _ in range(2)]  # two views
            assert not torch.equal(views[0], host.batch(idx, False))
    assert sorted(gathered) == sorted(b.tolist() for b in batches)  # once each, ahead of time
    assert host._ahead == []


_FREED_RSS = """
import sys, torch
from cdmix.data.host_images import reuse_freed_host_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_host_memory()
def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
before = rss_mb()
block = torch.ones(200 << 20, dtype=torch.uint8)
del block
print(rss_mb() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_batches_stay_with_the_process_for_reuse():
    """Without the tuning a freed 200 MB block goes back to the kernel (and the next batch faults its
    pages in again); with it the block stays for the next allocation."""
    kept = {mode: float(subprocess.run([sys.executable, "-c", _FREED_RSS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    assert kept["default"] < 50 and kept["reuse"] > 150


def test_auto_placement():
    small = np.zeros((10, 4, 4, 3), np.uint8)
    assert choose_placement("auto", small, small, "cpu") == "device"
    assert choose_placement("disk", small, small, "cpu") == "disk"


# ------------------------------------------------------------------------------------ training runs


def _digit_folder(root: Path, size: int, count: int = 240) -> Path:
    """Digits as a folder of ``size`` px PNGs (real, learnable images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        pixels = np.rint(digits.images[i] * 255 / 16).astype(np.uint8)
        path = root / str(digits.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(path)
    return root


def _metrics(run_dir: Path):
    """metrics.csv as text rows without the timing columns."""
    import csv

    with (run_dir / "metrics.csv").open() as fh:
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in csv.DictReader(fh)]


@pytest.mark.parametrize("method", ["standard", "dividemix", "josrc", "hybrid"])
def test_every_method_trains_from_disk_as_from_device(tmp_path, method, one_thread):
    """Same store, same crops and flips: the disk placement gives the device placement's run, bit for bit."""
    folder = _digit_folder(tmp_path / "digits", 20)
    common = dict(dataset="folder", data_path=str(folder), image_size=20, crop_size=16, method=method, epochs=2,
                  warmup=1, model="small_cnn", width=8, batch_size=16, noise_rate=0.2, progress=False,
                  eval_batch_size=32)
    runs_ = {p: cdmix.train(Config(**common, data_placement=p, out=str(tmp_path / p))) for p in ("device", "disk")}
    device, disk = runs_["device"], runs_["disk"]
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["data_placement"] == "disk"
    assert np.isfinite(disk.test_acc_last)
    assert _metrics(tmp_path / "disk") == _metrics(tmp_path / "device")
    issues = [(tmp_path / p / "label_issues.csv").read_text() for p in ("disk", "device")]
    assert issues[0] == issues[1]
    assert device.test_acc_best == disk.test_acc_best


def test_random_resized_crop_trains(tmp_path, one_thread):
    folder = _digit_folder(tmp_path / "digits", 20, count=120)
    result = cdmix.train(Config(dataset="folder", data_path=str(folder), image_size=20, random_resized_crop=True,
                                method="standard", epochs=1, model="small_cnn", width=8, batch_size=16,
                                progress=False, data_placement="host", out=str(tmp_path / "run")))
    assert np.isfinite(result.test_acc_last)


def test_pretrained_weights_are_loaded_and_recorded(tmp_path, one_thread):
    from cdmix.models import create_model

    net = create_model("resnet18", num_classes=1000, width=8)
    torch.nn.init.normal_(net.conv1.weight)  # something no fresh init gives
    weights = tmp_path / "r18.pt"
    torch.save(net.state_dict(), weights)
    folder = _digit_folder(tmp_path / "digits", 32, count=128)  # no last batch of 1 (BatchNorm at 1x1)
    result = cdmix.train(Config(dataset="folder", data_path=str(folder), image_size=32, method="standard",
                                epochs=1, model="resnet18", width=8, pretrained=str(weights), lr=1e-9,
                                batch_size=16, progress=False, out=str(tmp_path / "run")))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "run" / "pretrained.json").read_text())["pretrained_sha256"] == digest
    assert result.summary["pretrained_sha256"] == digest
    assert json.loads((tmp_path / "run" / "config.json").read_text())["normalization"] == "imagenet"
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["method"]["nets"][0]
    # a tiny lr: still the file's weights (a fresh init would be ~1 away)
    torch.testing.assert_close(trained["conv1.weight"], net.state_dict()["conv1.weight"], atol=1e-5, rtol=0)
    assert trained["fc.weight"].shape == (10, 64)  # a new head for the 10 classes


@pytest.mark.slow
def test_two_processes_train_from_a_store(tmp_path):
    folder = _digit_folder(tmp_path / "digits", 20)
    store = tmp_path / "store"
    assert cli_main(["prepare", str(folder), "--out", str(store), "--size", "20", "--no-progress"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cdmix",
           "train", "--dataset", "store", "--data-path", str(store), "--data-placement", "disk", "--crop-size",
           "16", "--epochs", "3", "--warmup", "1", "--model", "small_cnn", "--width", "8", "--batch-size", "16",
           "--no-progress", "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out
    assert "(2 processes)" in out and "images on disk" in out
    rows = runs.read_metrics(tmp_path / "run")
    assert len(rows) == 3 and all(r["division_ranks_agree"] == 1 for r in rows[1:])


def test_a_rewritten_image_with_its_old_size_and_mtime_is_decoded_again(tmp_path):
    """The cache key is not fooled by new pixels behind the old size and modification time."""
    photos = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (photos / cls).mkdir(parents=True)
        for i in range(6):  # BMP: the file size depends only on the image size
            Image.fromarray(_picture(i + (10 if cls == "dog" else 0), (20, 20))).save(photos / cls / f"{i}.bmp")
    path = photos / "cat" / "0.bmp"
    first = load_source("folder", str(photos), image_size=16, progress=False)
    before = os.stat(path)
    Image.fromarray(255 - _picture(0, (20, 20))).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = load_source("folder", str(photos), image_size=16, progress=False)
    both = [np.concatenate([np.asarray(d.train_images), np.asarray(d.test_images)]) for d in (first, second)]
    assert not np.array_equal(*both)
