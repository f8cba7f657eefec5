"""Issue #27, data side: the image cache, the store and the readers refuse what they should, with
one line, and never read outside the data root or wedge a rerun. Each test names its group."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdmix.cli import main as cli_main
from cdmix.data import realworld
from cdmix.data.arrays import raw_from_arrays
from cdmix.data.sources import load_source, prepare_store
from cdmix.errors import UserError


def _png(path: Path, shade: int, size: tuple[int, int] = (6, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, 80, 160)).save(path)


def _folder(root: Path, classes=("a", "b"), per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", 40 * c + 9 * i)
    return root


def _store(tmp_path: Path) -> Path:
    out = tmp_path / "store"
    prepare_store(_folder(tmp_path / "photos"), out, 6, workers=1, progress=False)
    return out


# ---------------------------------------------------------------------- 2. a private image cache


@pytest.fixture
def read_only_data(tmp_path, monkeypatch):
    """A folder whose .cdmix_cache cannot be written (tests run as root, so pretend), a private temp
    folder and a private XDG cache home."""
    data = _folder(tmp_path / "data")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(data)) and
                        mode == os.W_OK else real_access(p, mode, **kw))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return data


def test_group2_cache_of_a_read_only_folder_is_private_and_verified(tmp_path, read_only_data):
    raw = load_source("folder", str(read_only_data), image_size=6, progress=False)
    assert not (tmp_path / "tmp" / "cdmix_cache").exists()  # not the shared, predictable folder
    stores = list((tmp_path / "xdg").rglob("images.npy"))
    assert len(stores) == 1
    cache = tmp_path / "xdg" / "cdmix"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and cache.stat().st_uid == os.getuid()
    assert np.asarray(raw.train_images).max() > 0
    # Someone replaces the pixels: the next run refuses instead of training on them.
    images = np.load(stores[0], mmap_mode="r+")
    images[:] = 255
    images.flush()
    del images
    with pytest.raises(UserError, match="does not match the digest"):
        load_source("folder", str(read_only_data), image_size=6, progress=False)


def test_group2_cache_open_to_others_is_refused(tmp_path, read_only_data):
    (tmp_path / "xdg" / "cdmix").mkdir(parents=True)
    os.chmod(tmp_path / "xdg" / "cdmix", 0o777)
    with pytest.raises(UserError, match="open to other users"):
        load_source("folder", str(read_only_data), image_size=6, progress=False)


# ------------------------------------------------------------- 5. reading outside the data root


def _clothing(root: Path, train_keys: list[str], noisy_kv: list[str] | None = None) -> Path:
    keys = {"images/0/00/a.jpg": 0, "images/0/00/b.jpg": 1, "images/1/10/c.jpg": 2}
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6)).save(root / key)
    (root / "noisy_label_kv.txt").write_text("\n".join(noisy_kv or [f"{k} {v}" for k, v in keys.items()]) + "\n")
    (root / "clean_label_kv.txt").write_text("\n".join(f"{k} {v}" for k, v in keys.items()) + "\n")
    (root / "noisy_train_key_list.txt").write_text("\n".join(train_keys) + "\n")
    (root / "clean_val_key_list.txt").write_text("images/0/00/a.jpg\n")
    (root / "clean_test_key_list.txt").write_text("images/1/10/c.jpg\n")
    return root


@pytest.mark.parametrize("key", ["../outside.jpg", "ABSOLUTE"])
def test_group5_clothing1m_key_leaving_the_root_is_refused(tmp_path, key):
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (6, 6)).save(outside)
    key = str(outside) if key == "ABSOLUTE" else key
    root = _clothing(tmp_path / "c1m", ["images/0/00/a.jpg", key],
                     noisy_kv=["images/0/00/a.jpg 0", f"{key} 3"])
    with pytest.raises(UserError, match="outside the dataset folder"):
        realworld.read_clothing1m(root)


def test_group5_links_out_of_the_root_warn(tmp_path, caplog):
    elsewhere = _folder(tmp_path / "elsewhere", classes=("c",))
    root = _folder(tmp_path / "data")
    (root / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    animal = tmp_path / "animal"
    for split in ("training", "testing"):
        _png(animal / split / "0_00001.png", 1)
    _png(tmp_path / "far" / "1_00009.png", 2)
    (animal / "training" / "1_00009.png").symlink_to(tmp_path / "far" / "1_00009.png")
    with caplog.at_level(logging.WARNING, logger="cdmix"):
        load_source("folder", str(root), image_size=6, progress=False)
        assert "links to places outside it" in caplog.text
        realworld.read_animal10n(animal)
        assert "links to files outside" in caplog.text


# ---------------------------------------------------------------------- 7. resource exhaustion


def test_group7_huge_label_is_refused(tmp_path):
    images = np.zeros((20, 4, 4), np.uint8)
    labels = np.arange(20) % 2
    labels[3] = 500_000  # far above 20 samples: no name is made for every number below it
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=labels, test_images=images[:4],
             test_labels=labels[:4] % 2)
    with pytest.raises(UserError, match="far above"):
        load_source("npz", str(tmp_path / "d.npz"))
    labels[3] = 2**40
    with pytest.raises(UserError, match="far above"):
        raw_from_arrays(images, labels)


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid grey PNG of ``width x height`` zeros: a few KB that decode to width*height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_group7_image_declaring_too_many_pixels_is_skipped(tmp_path):
    root = _folder(tmp_path / "photos")
    _png_declaring(root / "a" / "bomb.png", 7000, 7000)  # 49 MP from ~50 KB
    assert (root / "a" / "bomb.png").stat().st_size < 200_000
    store = prepare_store(root, tmp_path / "store", 6, workers=1, progress=False)
    skipped = (store.path / "skipped.txt").read_text()
    assert "a/bomb.png" in skipped and "7000 x 7000" in skipped
    assert store.skipped_count() == 1


# ------------------------------------------------------------------------ 11. one class, empty classes


def test_group11_one_class_is_refused_and_empty_class_folders_skipped(tmp_path, caplog, capsys):
    one = _folder(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match="at least 2 classes"):
        load_source("folder", str(one), image_size=6, progress=False)
    assert cli_main(["train", "--dataset", "folder", "--data-path", str(one), "--epochs", "1", "--image-size", "6",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "at least 2 classes" in capsys.readouterr().err
    three = _folder(tmp_path / "three")
    (three / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="cdmix"):
        raw = load_source("folder", str(three), image_size=6, progress=False)
    assert raw.class_names == ["a", "b"] and "hold no images" in caplog.text


# ------------------------------------------------------------------- 12. labels and keys to refuse


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    _folder(tmp_path / "img")
    path = tmp_path / "labels.csv"
    path.write_text("path,label\n" + "".join(r + "\n" for r in rows))
    return path


BASE_ROWS = ["img/a/0.png,cat", "img/a/1.png,cat", "img/b/0.png,dog", "img/b/1.png,dog"]


@pytest.mark.parametrize("extra, message", [
    (["img/b/2.png,nan"], "missing value"),
    (["img/a/2.png,\"do\x00g\""], "control characters"),
    (["img/a/0.png,dog"], "listed again"),
])
def test_group12_csv_labels_and_paths_are_refused(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        load_source("csv", str(_csv(tmp_path, BASE_ROWS + extra)), image_size=6, progress=False)


def test_group12_nan_label_in_arrays_is_refused():
    with pytest.raises(UserError, match="NaN"):
        raw_from_arrays(np.zeros((4, 4, 4), np.uint8), np.array([0.0, 1.0, np.nan, 1.0]))


def test_group12_clothing1m_key_twice_is_refused(tmp_path):
    root = _clothing(tmp_path / "two_labels", ["images/0/00/a.jpg"],
                     noisy_kv=["images/0/00/a.jpg 0", "images/0/00/b.jpg 1", "images/0/00/a.jpg 5"])
    with pytest.raises(UserError, match="earlier line gave it 0"):
        realworld.read_clothing1m(root)
    root = _clothing(tmp_path / "twice", ["images/0/00/a.jpg", "images/0/00/b.jpg", "images/0/00/a.jpg"])
    with pytest.raises(UserError, match="listed again"):
        realworld.read_clothing1m(root)


def test_group12_animal10n_non_ascii_digit_is_refused(tmp_path):
    for split in ("training", "testing"):
        _png(tmp_path / split / "0_00001.png", 1)
    _png(tmp_path / "training" / "\u0663_00002.png", 2)  # ARABIC-INDIC DIGIT THREE
    with pytest.raises(UserError, match="expected a file name"):
        realworld.read_animal10n(tmp_path)


# ---------------------------------------------------------- 14. odd file names in `cdmix prepare`


def test_group14_carriage_return_and_non_utf8_names(tmp_path, caplog):
    root = _folder(tmp_path / "photos")
    _png(root / "a" / "odd\rname.png", 77)
    bad = os.path.join(os.fsencode(root / "b"), b"bad\xff.png")
    Image.new("RGB", (6, 6)).save(bad, format="PNG")
    with caplog.at_level(logging.WARNING, logger="cdmix"):
        store = prepare_store(root, tmp_path / "store", 6, workers=1, progress=False)
    assert "a/odd\rname.png" in store.samples.names and len(store) == 9
    assert "bad\\xff.png\tfile name is not valid UTF-8" in (store.path / "skipped.txt").read_text()
    again = prepare_store(root, tmp_path / "store", 6, workers=1, progress=False)  # a rerun reuses it
    assert again.reused
    raw = load_source("folder", str(root), image_size=6, progress=False)
    assert len(raw.train_labels) + len(raw.test_labels) == 9


# --------------------------------------------------- 15. output errors, half-made stores, size bound


def test_group15_huge_size_is_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "photos")
    with pytest.raises(UserError, match="1..4096"):
        prepare_store(root, tmp_path / "store", 1_000_000, workers=1, progress=False)
    with pytest.raises(UserError, match="1..4096"):
        load_source("folder", str(root), image_size=1_000_000, progress=False)
    assert cli_main(["prepare", str(root), "--out", str(tmp_path / "s2"), "--size", "1000000"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_group15_file_too_large_is_one_line(tmp_path, monkeypatch):
    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(np.lib.format, "open_memmap", too_large)
    with pytest.raises(UserError, match="cannot hold a file that large"):
        prepare_store(_folder(tmp_path / "photos"), tmp_path / "store", 6, workers=1, progress=False)


def test_group15_half_made_store_does_not_block_a_rerun(tmp_path):
    root = _folder(tmp_path / "photos")
    out = tmp_path / "store"
    out.mkdir()
    np.save(out / "images.npy", np.zeros((3, 6, 6, 3), np.uint8))  # a start cut short: no manifest yet
    store = prepare_store(root, out, 6, workers=1, progress=False)
    assert len(store) == 8 and store.complete


def test_group15_cache_messages_do_not_mention_out(tmp_path):
    from cdmix.data import sources

    root = _folder(tmp_path / "photos")
    listing = sources._scan_folder(str(root))
    name = sources._file_samples(listing[1], root, listing[2], listing[3]).files_hash()[:20]
    planted = root / ".cdmix_cache" / f"store_6px_{name}"
    planted.mkdir(parents=True)
    (planted / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as error:
        load_source("folder", str(root), image_size=6, progress=False)
    assert "--out" not in str(error.value) and str(planted) in str(error.value)


# ------------------------------------------------------ 16 (store half) and 18. a damaged store


def test_group16_store_stats_with_nan_are_refused(tmp_path):
    out = _store(tmp_path)
    stats = np.load(out / "stats.npy", mmap_mode="r+")
    stats[0, 0] = np.nan
    stats.flush()
    del stats
    with pytest.raises(UserError, match="non-finite"):
        load_source("store", str(out))


def _rewrite_samples(out: Path, edit) -> None:
    lines = (out / "samples.csv").read_text().splitlines()
    (out / "samples.csv").write_text("\n".join(edit(lines)) + "\n")


DAMAGE = {
    "truncated images": lambda out: os.truncate(out / "images.npy", (out / "images.npy").stat().st_size - 50),
    "a row missing": lambda out: _rewrite_samples(out, lambda lines: lines[:-1]),
    "a label that is not a number": lambda out: _rewrite_samples(
        out, lambda lines: lines[:1] + [lines[1].replace(",0,", ",x,", 1)] + lines[2:]),
    "a label out of range": lambda out: _rewrite_samples(
        out, lambda lines: lines[:1] + [lines[1].replace(",0,", ",7,", 1)] + lines[2:]),
    "an empty name": lambda out: _rewrite_samples(
        out, lambda lines: lines[:1] + ["," + lines[1].split(",", 1)[1]] + lines[2:]),
    "status of another length": lambda out: np.save(out / "status.npy", np.ones(3, np.int8)),
    "a manifest count that differs": lambda out: (out / "manifest.json").write_text(
        json.dumps({**json.loads((out / "manifest.json").read_text()), "count": 99})),
    "a manifest size that is text": lambda out: (out / "manifest.json").write_text(
        json.dumps({**json.loads((out / "manifest.json").read_text()), "size": "6"})),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_group18_damaged_store_is_one_line(tmp_path, damage, capsys):
    out = _store(tmp_path)
    DAMAGE[damage](out)
    with pytest.raises(UserError, match="prepare"):
        load_source("store", str(out))
