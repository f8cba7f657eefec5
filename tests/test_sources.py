"""Data sources: digits, CIFAR / CIFAR-N readers on real images, folder, csv, npz, errors."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmix.data import sources
from cdmix.data import store as image_store
from cdmix.data.sources import extract_tar, file_md5, load_source, verify_md5
from cdmix.data.types import channel_stats
from cdmix.errors import UserError

# ------------------------------------------------------------------------------------------ digits


def test_digits_shapes_split_and_seed() -> None:
    raw = load_source("digits", "unused")
    assert raw.name == "digits" and raw.class_names == [str(i) for i in range(10)]
    assert raw.train_images.shape == (1347, 8, 8, 1) and raw.test_images.shape == (450, 8, 8, 1)
    assert raw.train_images.dtype == np.uint8 and raw.train_labels.dtype == np.int64
    assert raw.train_images.max() == 255 and raw.train_images.min() == 0
    assert raw.train_true_labels is None
    assert (raw.mean, raw.std) == channel_stats(raw.train_images)
    # stratified: every class is ~25% test
    train_counts = np.bincount(raw.train_labels, minlength=10)
    test_counts = np.bincount(raw.test_labels, minlength=10)
    assert np.all(np.abs(test_counts / (train_counts + test_counts) - 0.25) < 0.02)
    same = load_source("digits", "unused", seed=0)
    other = load_source("digits", "unused", seed=1)
    assert np.array_equal(same.train_images, raw.train_images)
    assert not np.array_equal(other.train_labels, raw.train_labels)


def test_digits_pixel_scaling() -> None:
    from sklearn.datasets import load_digits

    raw = load_source("digits", "unused")
    expected = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    all_images = np.concatenate([raw.train_images, raw.test_images])[..., 0]
    assert sorted(map(bytes, all_images)) == sorted(map(bytes, expected))


# ------------------------------------------------------------------------------ CIFAR (real images)


def test_cifar10_reader_real_subset(cifar10_root: Path, cifar10_subset) -> None:
    raw = load_source("cifar10", str(cifar10_root))
    d = cifar10_subset
    assert raw.name == "cifar10"
    assert raw.train_images.shape == (5551, 32, 32, 3) and raw.train_images.dtype == np.uint8
    assert np.array_equal(raw.train_images, d["train_images"])
    assert np.array_equal(raw.train_labels, d["train_labels"]) and raw.train_labels.dtype == np.int64
    assert np.array_equal(raw.test_images, d["test_images"])
    assert np.array_equal(raw.test_labels, d["test_labels"])
    assert raw.class_names[:3] == ["airplane", "automobile", "bird"] and len(raw.class_names) == 10
    assert raw.mean == (0.4914, 0.4822, 0.4465) and raw.std == (0.2023, 0.1994, 0.2010)
    assert raw.train_true_labels is None
    # data_path may also be the batches folder itself
    direct = load_source("cifar10", str(cifar10_root / "cifar-10-batches-py"))
    assert np.array_equal(direct.test_labels, raw.test_labels)


def _subset_label_file(path: Path, source: Path, index: np.ndarray, as_tensor: bool = False) -> Path:
    content = torch.load(source, weights_only=False)
    picked = {k: np.asarray(v)[index] for k, v in content.items()}
    if as_tensor:
        picked = {k: torch.from_numpy(v) for k, v in picked.items()}
    torch.save(picked, path)
    return path


def test_cifar10n_human_labels(tmp_path: Path, cifar10_root: Path, cifar10_subset, cifar10n_file: Path) -> None:
    index = cifar10_subset["train_index"]
    label_file = _subset_label_file(tmp_path / "CIFAR-10_human.pt", cifar10n_file, index)
    full = torch.load(cifar10n_file, weights_only=False)
    raw = load_source("cifar10n", str(cifar10_root), label_file=str(label_file))  # default: worst
    assert raw.name == "cifar10n"
    assert np.array_equal(raw.train_labels, full["worse_label"][index])
    assert np.array_equal(raw.train_true_labels, cifar10_subset["train_labels"])  # real clean labels agree
    assert np.array_equal(raw.train_images, cifar10_subset["train_images"])
    rate = np.mean(raw.train_labels != raw.train_true_labels)
    assert 0.35 < rate < 0.45  # CIFAR-10N worst is ~40% noisy
    tensor_file = _subset_label_file(tmp_path / "t.pt", cifar10n_file, index, as_tensor=True)
    aggre = load_source("cifar10n", str(cifar10_root), labels="aggre", label_file=str(tensor_file))
    assert np.array_equal(aggre.train_labels, full["aggre_label"][index])
    assert aggre.train_labels.dtype == np.int64
    random2 = load_source("cifar10n", str(cifar10_root), labels="random2", label_file=str(label_file))
    assert np.array_equal(random2.train_labels, full["random_label2"][index])


def test_cifar10n_default_label_path(tmp_path: Path, cifar10_subset, cifar10n_file: Path, cifar_writers) -> None:
    d = cifar10_subset
    root = tmp_path / "data"
    cifar_writers["cifar10"](root, d["train_images"][:300], d["train_labels"][:300], d["test_images"][:20],
                             d["test_labels"][:20])
    _subset_label_file(root / "CIFAR-10_human.pt", cifar10n_file, d["train_index"][:300])
    raw = load_source("cifar10n", str(root), labels="worst")
    assert len(raw.train_labels) == 300


def test_cifar10n_errors(tmp_path: Path, cifar10_root: Path, cifar10_subset, cifar10n_file: Path) -> None:
    with pytest.raises(UserError, match="unknown cifar10n label set 'bogus'; choose one of worst, aggre"):
        load_source("cifar10n", str(cifar10_root), labels="bogus", label_file=str(cifar10n_file))
    # the full 50,000-label file against the 5,551-image subset
    with pytest.raises(UserError, match="label file .* has 50000 labels but dataset has 5551 images"):
        load_source("cifar10n", str(cifar10_root), label_file=str(cifar10n_file))
    with pytest.raises(UserError, match="--download"):
        load_source("cifar10n", str(cifar10_root), label_file=str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(cifar10n_file.read_bytes()[:1000])
    with pytest.raises(UserError, match="bad.pt could not be read"):
        load_source("cifar10n", str(cifar10_root), label_file=str(bad))


def test_cifar_n_label_file_with_a_payload_does_not_run(tmp_path: Path, cifar10_root: Path, cifar10_subset,
                                                        plant_payload) -> None:
    """CIFAR-N label files are read before any check (and CIFAR-100N has no md5): never unpickled freely."""
    n = len(cifar10_subset["train_labels"])
    mark = tmp_path / "payload-ran"
    planted = plant_payload(tmp_path / "CIFAR-10_human.pt", mark,
                            lambda payload: {"worse_label": np.zeros(n, np.int64), "clean_label": payload})
    with pytest.raises(UserError, match="could run code"):
        load_source("cifar10n", str(cifar10_root), label_file=str(planted))
    assert not mark.exists()


def test_cifar100_and_cifar100n(tmp_path: Path, cifar100_root: Path, cifar100_subset, cifar100n_file: Path) -> None:
    d = cifar100_subset
    raw = load_source("cifar100", str(cifar100_root))
    assert np.array_equal(raw.train_images, d["train_images"])
    assert np.array_equal(raw.train_labels, d["train_labels"])
    assert np.array_equal(raw.test_images, d["test_images"])
    assert np.array_equal(raw.test_labels, d["test_labels"])
    assert len(raw.class_names) == 100 and raw.class_names[0] == "fine_00"
    assert raw.mean == (0.507, 0.487, 0.441) and raw.std == (0.267, 0.256, 0.276)
    label_file = _subset_label_file(tmp_path / "CIFAR-100_human.pt", cifar100n_file, d["train_index"])
    full = torch.load(cifar100n_file, weights_only=False)
    n = load_source("cifar100n", str(cifar100_root), label_file=str(label_file))
    assert np.array_equal(n.train_labels, full["noisy_label"][d["train_index"]])
    assert np.array_equal(n.train_true_labels, d["train_labels"])
    with pytest.raises(UserError, match="choose one of noisy"):
        load_source("cifar100n", str(cifar100_root), labels="worst", label_file=str(label_file))


def test_missing_cifar_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_source("cifar10", str(tmp_path / "nowhere"))
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "--download" in message and "--data-path" in message and "\n" not in message
    with pytest.raises(UserError, match="cifar-100-python.*--download"):
        load_source("cifar100", str(tmp_path))


def test_truncated_and_damaged_pickles(tmp_path: Path, cifar10_root: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(cifar10_root, root)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    full = batch.read_bytes()
    batch.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match="data_batch_3 is corrupt or truncated"):
        load_source("cifar10", str(root))
    batch.write_bytes(b"")
    with pytest.raises(UserError, match="data_batch_3 is corrupt or truncated"):
        load_source("cifar10", str(root))
    import pickle

    batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3: data has shape"):
        load_source("cifar10", str(root))
    batch.write_bytes(pickle.dumps({b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3 lacks key"):
        load_source("cifar10", str(root))
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="1 labels for 2 images"):
        load_source("cifar10", str(root))
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 is missing"):
        load_source("cifar10", str(root))


def test_pickle_with_foreign_objects_is_refused(tmp_path: Path, cifar10_root: Path) -> None:
    import pickle

    root = tmp_path / "copy"
    shutil.copytree(cifar10_root, root)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Path("x")}, protocol=2))
    with pytest.raises(UserError, match="test_batch is corrupt.*unexpected object"):
        load_source("cifar10", str(root))


# ------------------------------------------------------------------------------------- downloads


def test_verify_md5_mismatch_deletes_file(tmp_path: Path) -> None:
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(b"not the real archive")
    verify_md5(path, file_md5(path))  # matching: fine
    with pytest.raises(UserError, match="md5 mismatch for .*archive.tar.gz"):
        verify_md5(path, "c58f30108f718f92721af3b95e74349a")
    assert not path.exists()


def _tiny_cifar10_archive(tmp_path: Path, write_cifar10) -> bytes:
    rng = np.random.default_rng(0)
    staging = tmp_path / "staging"
    write_cifar10(staging, rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.arange(10),
                  rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue()


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_flow_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cifar_writers) -> None:
    import hashlib

    payload = _tiny_cifar10_archive(tmp_path, cifar_writers["cifar10"])
    spec = dict(sources.CIFAR_ARCHIVES["cifar10"], md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(sources.CIFAR_ARCHIVES, "cifar10", spec)
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(sources.urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "data"
    raw = load_source("cifar10", str(root), download=True, progress=False)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert raw.train_images.shape == (10, 32, 32, 3) and raw.test_labels.tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    # a corrupted transfer is caught by the md5 check and leaves nothing behind
    shutil.rmtree(root)
    spec["md5"] = "0" * 32
    with pytest.raises(UserError, match="md5 mismatch"):
        load_source("cifar10", str(root), download=True, progress=False)
    assert list(root.iterdir()) == []


def test_download_network_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(url, timeout=None):
        raise sources.urllib.error.URLError("no route to host")

    monkeypatch.setattr(sources.urllib.request, "urlopen", failing)
    with pytest.raises(UserError, match="could not download .*no route to host"):
        sources.download_file("https://example.invalid/x", tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_extract_tar_refuses_unsafe_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UserError, match="unsafe entry"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


# ---------------------------------------------------------------------------------- folder / csv


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _make_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 10) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext = ".PNG" if i % 3 == 0 else ".png"
            _png(root / name / f"{i:03d}{ext}", seed=100 * c + i)
    (root / "cat" / "notes.txt").write_text("not an image")


def test_folder_loader_split_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _make_folder(root)
    raw = load_source("folder", str(root), image_size=8, seed=3, progress=False)
    assert raw.name == "folder" and raw.class_names == ["cat", "dog", "emu"]
    assert raw.train_images.shape == (27, 8, 8, 3) and raw.test_images.shape == (3, 8, 8, 3)
    assert sorted(raw.test_labels.tolist()) == [0, 1, 2]  # stratified 10%
    assert raw.train_images.dtype == np.uint8 and raw.train_true_labels is None
    stores = [p.name for p in (root / ".cdmix_cache").iterdir()]
    assert len(stores) == 1 and stores[0].startswith("store_8px_")  # the decoded images: an image store

    def no_decoding(path, size):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(image_store, "decode_image", no_decoding)
    again = load_source("folder", str(root), image_size=8, seed=3, progress=False)
    assert np.array_equal(np.asarray(again.train_images), np.asarray(raw.train_images))
    assert np.array_equal(again.test_labels, raw.test_labels)
    assert again.class_names == raw.class_names  # the cache folder is not a class
    with pytest.raises(UserError, match="none of the 30 images could be decoded .*cache should have been used"):
        load_source("folder", str(root), image_size=16, progress=False)  # another size: decoded afresh


def test_cache_invalidated_by_changed_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _make_folder(root, per_class=3)
    cache = tmp_path / "cache"

    def everything():
        raw = load_source("folder", str(root), image_size=6, seed=0, cache_dir=str(cache), progress=False)
        return np.concatenate([np.asarray(raw.train_images), np.asarray(raw.test_images)])

    first, second = everything(), everything()
    assert np.array_equal(first, second) and len(list(cache.iterdir())) == 1  # reused
    _png(root / "cat" / "001.png", seed=999, size=(20, 20))
    third = everything()
    assert len(list(cache.iterdir())) == 2 and not np.array_equal(third, first)  # another store


def test_folder_resize_is_bilinear_rgb(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    _make_folder(root, per_class=4)
    gray = root / "dog" / "gray.jpg"
    Image.fromarray(np.full((5, 7), 200, np.uint8), mode="L").save(gray)
    cache = tmp_path / "elsewhere"
    raw = load_source("folder", str(root), seed=0, cache_dir=str(cache), progress=False)
    assert raw.image_size == 32 and raw.train_images.shape[1:] == (32, 32, 3)
    assert cache.is_dir() and not (root / ".cdmix_cache").exists()
    # short side to 32, center square: the 12 x 10 image's middle 10 x 10 resized (bilinear)
    expected = np.asarray(Image.open(root / "cat" / "000.PNG").convert("RGB").resize((32, 32), Image.BILINEAR,
                                                                                     box=(1, 0, 11, 10)))
    images = np.concatenate([np.asarray(raw.train_images), np.asarray(raw.test_images)])
    assert any(np.array_equal(img, expected) for img in images)
    assert any(np.all(np.abs(img.astype(int) - 200) <= 2) for img in images)  # gray jpeg -> RGB


def test_folder_with_train_test_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _make_folder(root / "train", per_class=4)
    _make_folder(root / "test", classes=("cat", "emu"), per_class=2)
    raw = load_source("folder", str(root), image_size=4, progress=False)
    assert raw.class_names == ["cat", "dog", "emu"]
    assert len(raw.train_labels) == 12 and raw.test_labels.tolist() == [0, 0, 2, 2]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_source("folder", str(tmp_path / "missing"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        load_source("folder", str(tmp_path / "empty"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        load_source("folder", str(tmp_path / "flat"))
    broken = tmp_path / "broken"
    _make_folder(broken, per_class=2)
    (broken / "dog" / "bad.png").write_bytes(b"\x89PNG garbage")
    raw = load_source("folder", str(broken), progress=False)  # an unreadable image is skipped and listed
    assert len(raw.train_labels) + len(raw.test_labels) == 6
    listed = next((broken / ".cdmix_cache").iterdir()) / "skipped.txt"
    assert listed.read_text().startswith("dog/bad.png\t")


def test_folder_tiny_class_falls_back_to_random_split(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _png(root / "a" / "1.png", 1)
    for i in range(5):
        _png(root / "b" / f"{i}.png", 10 + i)
    raw = load_source("folder", str(root), image_size=4, progress=False)
    assert len(raw.test_labels) == 1 and len(raw.train_labels) == 5


def _make_csv(tmp_path: Path, rows: list[str]) -> Path:
    for i in range(6):
        _png(tmp_path / "pics" / f"{i}.png", seed=i)
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_loader_with_split(tmp_path: Path) -> None:
    path = _make_csv(tmp_path, ["path,label,split", "pics/0.png,10,train", "pics/1.png,2,train",
                                "pics/2.png,10,test", "pics/3.png,2,train", "pics/4.png,2,TEST",
                                "pics/5.png,10,train"])
    raw = load_source("csv", str(path), image_size=5, progress=False)
    assert raw.class_names == ["2", "10"]  # numeric order
    assert raw.train_labels.tolist() == [1, 0, 0, 1] and raw.test_labels.tolist() == [1, 0]
    assert raw.train_images.shape == (4, 5, 5, 3)
    assert (tmp_path / ".cdmix_cache").is_dir()


def test_csv_loader_without_split(tmp_path: Path) -> None:
    rows = ["path,label"] + [f"pics/{i}.png,{'cat' if i % 2 else 'bird'}" for i in range(6)]
    raw = load_source("csv", str(_make_csv(tmp_path, rows)), image_size=4, progress=False)
    assert raw.class_names == ["bird", "cat"]
    assert len(raw.train_labels) == 5 and len(raw.test_labels) == 1


def test_csv_with_a_repeated_header_column_is_refused(tmp_path: Path) -> None:
    rows = ["path,label,Label"] + [f"pics/{i}.png,{i % 2},{1 - i % 2}" for i in range(4)]
    with pytest.raises(UserError, match="column\\(s\\) label appear more than once"):
        load_source("csv", str(_make_csv(tmp_path, rows)), image_size=4, progress=False)


def test_csv_errors(tmp_path: Path) -> None:
    missing = _make_csv(tmp_path, ["path,label", "pics/0.png,a", "pics/nope.png,b"])
    with pytest.raises(UserError, match="line 3: image pics/nope.png not found"):
        load_source("csv", str(missing))
    empty = _make_csv(tmp_path, ["path,label", "pics/0.png,a", "pics/1.png,", "pics/2.png,b"])
    with pytest.raises(UserError, match="line 3: empty label"):
        load_source("csv", str(empty))
    header = _make_csv(tmp_path, ["file,class", "pics/0.png,a"])
    with pytest.raises(UserError, match="columns path,label"):
        load_source("csv", str(header))
    split = _make_csv(tmp_path, ["path,label,split", "pics/0.png,a,train", "pics/1.png,b,val"])
    with pytest.raises(UserError, match="line 3: split must be train or test"):
        load_source("csv", str(split))
    with pytest.raises(UserError, match="does not exist"):
        load_source("csv", str(tmp_path / "none.csv"))


# -------------------------------------------------------------------------------------------- npz


def test_npz_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, train_images=rng.integers(0, 256, (20, 6, 6), dtype=np.uint8),
             train_labels=np.arange(20) % 3, test_images=rng.integers(0, 256, (5, 6, 6), dtype=np.uint8),
             test_labels=np.arange(5) % 3, train_true_labels=np.zeros(20, np.int64),
             class_names=np.array(["x", "y", "z"]))
    raw = load_source("npz", str(path))
    assert raw.train_images.shape == (20, 6, 6, 1) and raw.test_images.shape == (5, 6, 6, 1)
    assert raw.class_names == ["x", "y", "z"] and raw.train_true_labels.tolist() == [0] * 20
    assert raw.mean == channel_stats(raw.train_images)[0]


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4, 3), np.uint8), train_labels=np.zeros(2, np.int64),
             test_images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="lacks key.*test_labels"):
        load_source("npz", str(path))
    np.savez(path, train_images=np.zeros((2, 3, 4, 4), np.uint8), train_labels=np.zeros(2, np.int64),
             test_images=np.zeros((1, 3, 4, 4), np.uint8), test_labels=np.zeros(1, np.int64))
    with pytest.raises(UserError, match="channels first"):
        load_source("npz", str(path))
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(3, np.int64),
             test_images=np.zeros((1, 4, 4), np.uint8), test_labels=np.zeros(1, np.int64))
    with pytest.raises(UserError, match="3 labels but there are 2 images"):
        load_source("npz", str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_source("npz", str(tmp_path / "none.npz"))


def test_unknown_dataset() -> None:
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        load_source("mnist", "x")


def _py2_batch_bytes(rows: np.ndarray, labels: list[int]) -> bytes:
    """A data batch pickled opcode by opcode the way Python 2's cPickle wrote the official files."""
    import struct

    def s(text: bytes) -> bytes:  # Python 2 str: SHORT_BINSTRING / BINSTRING
        return (b"U" + bytes([len(text)]) if len(text) < 256 else b"T" + struct.pack("<i", len(text))) + text

    def i1(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i1(0) + i1(1) + b"\x87R" + b"(" + i1(3) + s(b"|") + b"NNN" \
        + i1(-1) + i1(-1) + i1(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i1(0) + b"\x85" + s(b"b") \
        + b"\x87R" + b"(" + i1(1) + i1(rows.shape[0]) + b"M" + struct.pack("<H", rows.shape[1]) + b"\x86" \
        + dtype + b"\x89" + s(rows.tobytes()) + b"tb"
    label_list = b"](" + b"".join(i1(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5") + s(b"labels") + label_list \
        + s(b"data") + array + b"u."


def test_python2_style_pickle_is_read(tmp_path: Path, cifar_writers) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    cifar_writers["cifar10"](tmp_path, images, np.arange(10), images[:2], np.array([3, 4]))
    rows = np.ascontiguousarray(images[:2].transpose(0, 3, 1, 2).reshape(2, 3072))
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(_py2_batch_bytes(rows, [7, 8]))
    raw = load_source("cifar10", str(tmp_path))
    assert np.array_equal(raw.train_images[:2], images[:2])
    assert raw.train_labels[:2].tolist() == [7, 8] and len(raw.train_labels) == 10
