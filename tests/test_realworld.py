"""Readers of Clothing1M, WebVision, Food-101N and ANIMAL-10N on tiny fake trees in the official
layouts, and the Inception-ResNet-v2 model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdmix.config import build_config
from cdmix.data.realworld import (
    ANIMAL10N_CLASSES,
    CLOTHING1M_CLASSES,
    ImageList,
    read_animal10n,
    read_clothing1m,
    read_food101n,
    read_webvision,
)
from cdmix.data.sources import CLOTHING1M_MEAN, load_source
from cdmix.errors import UserError
from cdmix.methods.epoch_subsets import DIVIDE_DRAW, WARMUP_DRAW, class_balanced_subset
from cdmix.models.inception_resnet_v2 import inception_resnet_v2


def _image(path: Path, shade: int = 0, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade % 256, 40, 90)).save(path, "JPEG" if path.suffix.lower() in
                                                               (".jpg", ".jpeg") else None)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


# ---------------------------------------------------------------------------------------- Clothing1M

CLOTHING_TRAIN = [("images/0/00/t0.jpg", 0), ("images/0/00/t1.jpg", 1), ("images/0/01/t2.jpg", 2),
                  ("images/1/10/t3.jpg", 13), ("images/1/10/t4.jpg", 5)]
CLOTHING_CLEAN = {"images/0/00/t0.jpg": 0, "images/0/00/t1.jpg": 3,  # train keys with both labels
                  "images/2/20/v0.jpg": 4, "images/2/20/v1.jpg": 7,  # val
                  "images/3/30/s0.jpg": 13, "images/3/30/s1.jpg": 0, "images/3/30/s2.jpg": 9,  # test
                  "images/4/40/c0.jpg": 6}  # clean train only
CLOTHING_EXTRA_NOISY = {"images/9/90/unused.jpg": 2}  # in the kv file, in no key list, no image


@pytest.fixture
def clothing(tmp_path: Path) -> Path:
    root = tmp_path / "clothing1m"
    noisy = dict(CLOTHING_TRAIN) | CLOTHING_EXTRA_NOISY
    _write(root / "noisy_label_kv.txt", [f"{k} {v}" for k, v in noisy.items()])
    _write(root / "clean_label_kv.txt", [f"{k} {v}" for k, v in CLOTHING_CLEAN.items()])
    _write(root / "noisy_train_key_list.txt", [k for k, _ in CLOTHING_TRAIN])
    _write(root / "clean_train_key_list.txt", ["images/4/40/c0.jpg", "images/0/00/t1.jpg"])
    _write(root / "clean_val_key_list.txt", ["images/2/20/v0.jpg", "images/2/20/v1.jpg"])
    _write(root / "clean_test_key_list.txt", ["images/3/30/s0.jpg", "images/3/30/s1.jpg", "images/3/30/s2.jpg"])
    _write(root / "category_names_eng.txt", [f"cls{i}" for i in range(14)])
    for i, key in enumerate([k for k, _ in CLOTHING_TRAIN] + list(CLOTHING_CLEAN)):
        if not (root / key).exists():
            _image(root / key, i * 20)
    return root


def _check_clothing(data: ImageList, image_root: Path, strip: bool) -> None:
    def path(key: str) -> Path:
        return image_root / (key[len("images/"):] if strip else key)

    assert data.train_paths == [path(k) for k, _ in CLOTHING_TRAIN]
    assert data.train_labels.dtype == np.int64
    assert data.train_labels.tolist() == [v for _, v in CLOTHING_TRAIN]
    assert data.train_true_labels.tolist() == [0, 3, -1, -1, -1]
    assert data.train_label_verified.tolist() == [1, 0, -1, -1, -1]
    assert data.train_ids == [k for k, _ in CLOTHING_TRAIN]
    assert data.val_paths == [path("images/2/20/v0.jpg"), path("images/2/20/v1.jpg")]
    assert data.val_labels.tolist() == [4, 7]
    assert data.test_paths == [path(f"images/3/30/s{i}.jpg") for i in range(3)]
    assert data.test_labels.tolist() == [13, 0, 9]
    assert data.extra_tests == {}
    assert all(p.is_file() for p in data.train_paths + data.val_paths + data.test_paths)


def test_clothing1m_official_layout(clothing: Path) -> None:
    data = read_clothing1m(clothing)
    _check_clothing(data, clothing, strip=False)
    assert data.class_names == [f"cls{i}" for i in range(14)]
    assert data.num_classes == 14


def test_clothing1m_dividemix_and_annotations_layouts(clothing: Path) -> None:
    # Jo-SRC keeps the lists in annotations/; DivideMix strips "images/" from the keys
    (clothing / "category_names_eng.txt").unlink()
    (clothing / "annotations").mkdir()
    for f in clothing.glob("*.txt"):
        f.rename(clothing / "annotations" / f.name)
    for d in (clothing / "images").iterdir():
        d.rename(clothing / d.name)
    (clothing / "images").rmdir()
    data = read_clothing1m(clothing)
    _check_clothing(data, clothing, strip=True)
    assert data.class_names == list(CLOTHING1M_CLASSES)


def test_clothing1m_jo_src_training_set(clothing: Path) -> None:
    data = read_clothing1m(clothing, include_clean_train=True)
    assert data.train_ids == ["images/4/40/c0.jpg", "images/0/00/t1.jpg"] + [k for k, _ in CLOTHING_TRAIN]
    # clean-train keys take their noisy label when they have one, else the clean one
    assert data.train_labels.tolist() == [6, 1] + [v for _, v in CLOTHING_TRAIN]
    assert data.train_true_labels.tolist() == [6, 3, 0, 3, -1, -1, -1]


@pytest.mark.parametrize("damage, expected", [
    (lambda r: (r / "clean_val_key_list.txt").unlink(), "clean_val_key_list.txt not found"),
    (lambda r: (r / "images/1/10/t3.jpg").unlink(), "noisy_train_key_list.txt line 4: image images/1/10/t3.jpg"),
    (lambda r: (r / "images/3/30/s2.jpg").unlink(), "clean_test_key_list.txt line 3: image images/3/30/s2.jpg"),
    (lambda r: _edit(r / "noisy_label_kv.txt", "t3.jpg 13", "t3.jpg 14"), "noisy_label_kv.txt line 4: label 14"),
    (lambda r: _edit(r / "clean_label_kv.txt", "v1.jpg 7", "v1.jpg -1"), "clean_label_kv.txt line 4: label -1"),
    (lambda r: _edit(r / "clean_label_kv.txt", "v1.jpg 7", "v1.jpg seven"),
     "clean_label_kv.txt line 4: label 'seven' is not an integer"),
    (lambda r: _edit(r / "noisy_label_kv.txt", "t2.jpg 2", "t2.jpg 2 extra"), "noisy_label_kv.txt line 3: expected"),
    (lambda r: _edit(r / "clean_val_key_list.txt", "v1.jpg", "v9.jpg"),
     "clean_val_key_list.txt line 2: key images/2/20/v9.jpg has no label in clean_label_kv.txt"),
    (lambda r: _write(r / "category_names_eng.txt", ["a", "b"]), "lists 2 class names"),
    (lambda r: shutil.rmtree(r), "Clothing1M folder"),
])
def test_clothing1m_errors(clothing: Path, damage, expected: str) -> None:
    damage(clothing)
    with pytest.raises(UserError) as info:
        read_clothing1m(clothing)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_clothing1m_skips_image_check_on_request(clothing: Path) -> None:
    (clothing / "images/1/10/t3.jpg").unlink()
    assert len(read_clothing1m(clothing, check_images=False).train_paths) == len(CLOTHING_TRAIN)


# ----------------------------------------------------------------------------------------- WebVision

SYNSETS = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus",
           "n01484850 great white shark, white shark", "n01491361 tiger shark, Galeocerdo cuvieri",
           "n01494475 hammerhead, hammerhead shark"]


@pytest.fixture
def webvision(tmp_path: Path) -> Path:
    root = tmp_path / "webvision"
    train = [("google/q0001/00000000.jpg", 0), ("google/q0001/00000001.jpg", 0), ("google/q0003/00000000.jpg", 2),
             ("google/q0007/00000000.jpg", 3), ("google/q0002/00000005.jpg", 1)]
    _write(root / "info/train_filelist_google.txt", [f"{p} {c}" for p, c in train])
    _write(root / "info/val_filelist.txt", ["val000001.jpg 2", "val000002.jpg 4", "val000003.jpg 0"])
    _write(root / "info/synsets.txt", SYNSETS)
    for i, (p, c) in enumerate(train):
        if c < 3:  # images of classes outside the mini set need not exist
            _image(root / p, i)
    _image(root / "val_images_256/val000001.jpg")
    _image(root / "val_images_256/val000003.jpg")
    for c, line in enumerate(SYNSETS):
        for j in range(c + 1):
            _image(root / "imagenet/val" / line.split()[0] / f"ILSVRC2012_val_{c * 10 + j:08d}.JPEG")
    return root


def test_webvision_mini(webvision: Path) -> None:
    data = read_webvision(webvision, num_classes=3)
    assert data.train_ids == ["google/q0001/00000000.jpg", "google/q0001/00000001.jpg", "google/q0003/00000000.jpg",
                              "google/q0002/00000005.jpg"]
    assert data.train_paths == [webvision / p for p in data.train_ids]
    assert data.train_labels.tolist() == [0, 0, 2, 1]
    assert data.test_paths == [webvision / "val_images_256/val000001.jpg", webvision / "val_images_256/val000003.jpg"]
    assert data.test_labels.tolist() == [2, 0]
    assert data.class_names == ["tench", "goldfish", "great white shark"]
    assert data.val_paths is None and data.train_true_labels is None
    paths, labels = data.extra_tests["imagenet"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert [p.parent.name for p in paths] == ["n01440764"] + ["n01443537"] * 2 + ["n01484850"] * 3
    assert paths[1].name == "ILSVRC2012_val_00000010.JPEG"


def test_webvision_without_imagenet_folder_says_so_once(webvision: Path, caplog) -> None:
    shutil.rmtree(webvision / "imagenet")
    with caplog.at_level("WARNING", logger="cdmix"):
        data = read_webvision(webvision, num_classes=3)
    assert data.extra_tests == {}
    said = [r.getMessage() for r in caplog.records if "ILSVRC2012" in r.getMessage()]
    assert len(said) == 1 and str(webvision / "imagenet") in said[0] and "--extra-data-path" in said[0]


def test_webvision_imagenet_folders_by_class_id_and_no_synsets(webvision: Path, tmp_path: Path) -> None:
    # DivideMix's own layout: ImageNet val images sorted into folders named 0, 1, 2, ...
    imagenet = tmp_path / "ilsvrc"
    for c in range(3):
        _image(imagenet / "val" / str(c) / f"img{c}.JPEG")
    (webvision / "info/synsets.txt").unlink()
    shutil.rmtree(webvision / "imagenet")
    data = read_webvision(webvision, imagenet_root=imagenet, num_classes=3)
    assert data.class_names == ["0", "1", "2"]
    paths, labels = data.extra_tests["imagenet"]
    assert labels.tolist() == [0, 1, 2] and [p.name for p in paths] == ["img0.JPEG", "img1.JPEG", "img2.JPEG"]
    assert "imagenet" not in read_webvision(webvision, num_classes=3).extra_tests


def test_webvision_sorted_wnid_folders_without_synsets(webvision: Path) -> None:
    (webvision / "info/synsets.txt").unlink()
    _, labels = read_webvision(webvision, num_classes=2).extra_tests["imagenet"]
    assert labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize("damage, expected", [
    (lambda r: _edit(r / "info/train_filelist_google.txt", "00000001.jpg 0", "00000001.jpg 1000"),
     "train_filelist_google.txt line 2: class id 1000 is outside 0..999"),
    (lambda r: (r / "google/q0003/00000000.jpg").unlink(),
     "train_filelist_google.txt line 3: image google/q0003/00000000.jpg not found"),
    (lambda r: (r / "val_images_256/val000003.jpg").unlink(), "val_filelist.txt line 3: image val000003.jpg"),
    (lambda r: (r / "info/val_filelist.txt").unlink(), "val_filelist.txt not found"),
    (lambda r: shutil.rmtree(r / "imagenet/val/n01443537"), "no ImageNet validation folder for WebVision class 1"),
    (lambda r: _write(r / "info/synsets.txt", SYNSETS[:2]), "lists 2 synsets"),
])
def test_webvision_errors(webvision: Path, damage, expected: str) -> None:
    damage(webvision)
    with pytest.raises(UserError) as info:
        read_webvision(webvision, num_classes=3)
    assert expected in str(info.value)


def test_webvision_rejects_bad_class_count(webvision: Path) -> None:
    for bad in (0, 1001):
        with pytest.raises(UserError, match="num_classes"):
            read_webvision(webvision, num_classes=bad)
    with pytest.raises(UserError, match="ImageNet folder"):
        read_webvision(webvision, imagenet_root=webvision / "nope", num_classes=3)


# ----------------------------------------------------------------------------------------- Food-101N

FOOD_CLASSES = ["caesar_salad", "apple_pie", "baby_back_ribs"]  # Food-101 lists them sorted; Jo-SRC sorts anyway


@pytest.fixture
def food(tmp_path: Path) -> Path:
    root = tmp_path / "food101n"
    train = ["apple_pie/aa01.jpg", "caesar_salad/cc01.jpg", "baby_back_ribs/bb01.jpg", "apple_pie/aa02.jpg",
             "caesar_salad/cc02.jpg"]
    _write(root / "meta/imagelist.tsv", ["class_name/key"] + train)
    _write(root / "meta/verified_train.tsv", ["class_name/key\tverification_label", "apple_pie/aa02.jpg\t1",
                                              "caesar_salad/cc01.jpg\t0", "apple_pie/zz99.jpg\t1"])
    _write(root / "meta/classes.txt", ["class_name"] + sorted(FOOD_CLASSES))
    for i, rel in enumerate(train):
        _image(root / "images" / rel, i)
    food101 = root / "food-101"
    _write(food101 / "meta/classes.txt", FOOD_CLASSES)
    _write(food101 / "meta/test.txt", ["apple_pie/1011328", "baby_back_ribs/2200", "caesar_salad/31"])
    for i, rel in enumerate(["apple_pie/1011328", "baby_back_ribs/2200", "caesar_salad/31"]):
        _image(food101 / "images" / f"{rel}.jpg", i)
    return root


def test_food101n(food: Path) -> None:
    data = read_food101n(food)
    assert data.class_names == ["apple_pie", "baby_back_ribs", "caesar_salad"]
    assert data.train_ids == ["apple_pie/aa01.jpg", "caesar_salad/cc01.jpg", "baby_back_ribs/bb01.jpg",
                              "apple_pie/aa02.jpg", "caesar_salad/cc02.jpg"]
    assert data.train_paths == [food / "images" / k for k in data.train_ids]
    assert data.train_labels.tolist() == [0, 2, 1, 0, 2]
    assert data.train_label_verified.tolist() == [-1, 0, -1, 1, -1]
    assert data.train_true_labels is None
    assert data.test_paths == [food / "food-101/images/apple_pie/1011328.jpg",
                               food / "food-101/images/baby_back_ribs/2200.jpg",
                               food / "food-101/images/caesar_salad/31.jpg"]
    assert data.test_labels.tolist() == [0, 1, 2]


def test_food101n_separate_food101_folder_and_no_verification(food: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "food-101"
    moved.parent.mkdir()
    (food / "food-101").rename(moved)
    (food / "meta/verified_train.tsv").unlink()
    data = read_food101n(food, moved)
    assert data.train_label_verified is None and data.test_paths[0].is_relative_to(moved)
    with pytest.raises(UserError, match="food101_root"):
        read_food101n(food)


@pytest.mark.parametrize("damage, expected", [
    (lambda r: _edit(r / "meta/imagelist.tsv", "apple_pie/aa02", "pizza/aa02"),
     "imagelist.tsv line 5: class 'pizza' is not one of the 3 classes"),
    (lambda r: (r / "images/baby_back_ribs/bb01.jpg").unlink(),
     "imagelist.tsv line 4: image baby_back_ribs/bb01.jpg not found"),
    (lambda r: _edit(r / "meta/imagelist.tsv", "apple_pie/aa02.jpg", "aa02.jpg"), "imagelist.tsv line 5: expected"),
    (lambda r: (r / "food-101/images/caesar_salad/31.jpg").unlink(), "test.txt line 3: image caesar_salad/31.jpg"),
    (lambda r: (r / "food-101/meta/test.txt").unlink(), "test.txt not found"),
    (lambda r: (r / "meta/imagelist.tsv").unlink(), "imagelist.tsv not found"),
    (lambda r: _edit(r / "meta/verified_train.tsv", "cc01.jpg\t0", "cc01.jpg\t2"),
     "verified_train.tsv line 3: verification label 2 is outside 0..1"),
    (lambda r: _write(r / "meta/classes.txt", ["class_name", "apple_pie"]), "list different classes"),
])
def test_food101n_errors(food: Path, damage, expected: str) -> None:
    damage(food)
    with pytest.raises(UserError) as info:
        read_food101n(food)
    assert expected in str(info.value)


# ---------------------------------------------------------------------------------------- ANIMAL-10N


@pytest.fixture
def animal(tmp_path: Path) -> Path:
    root = tmp_path / "animal10n"
    for name in ("3_00012.jpg", "0_00002.jpg", "9_00001.jpg", "0_00001.jpg"):
        _image(root / "training" / name, size=64)
    for name in ("5_00001.jpg", "1_00003.jpg"):
        _image(root / "testing" / name, size=64)
    (root / "training" / ".DS_Store").write_bytes(b"")
    return root


def test_animal10n(animal: Path) -> None:
    data = read_animal10n(animal)
    assert data.class_names == list(ANIMAL10N_CLASSES) and len(data.class_names) == 10
    assert data.class_names[5] == "jaguar" and data.class_names[9] == "guinea pig"
    assert data.train_ids == ["0_00001.jpg", "0_00002.jpg", "3_00012.jpg", "9_00001.jpg"]
    assert data.train_paths == [animal / "training" / f for f in data.train_ids]
    assert data.train_labels.tolist() == [0, 0, 3, 9]
    assert [p.name for p in data.test_paths] == ["1_00003.jpg", "5_00001.jpg"]
    assert data.test_labels.tolist() == [1, 5]


@pytest.mark.parametrize("damage, expected", [
    (lambda r: _image(r / "training" / "10_00001.jpg"), "label 10 is outside 0..9"),
    (lambda r: _image(r / "testing" / "cat.jpg"), "expected a file name '<label>_<id>.jpg'"),
    (lambda r: shutil.rmtree(r / "testing"), "testing does not exist"),
    (lambda r: shutil.rmtree(r), "ANIMAL-10N folder"),
])
def test_animal10n_errors(animal: Path, damage, expected: str) -> None:
    damage(animal)
    with pytest.raises(UserError) as info:
        read_animal10n(animal)
    assert expected in str(info.value)


# ------------------------------------------------------------------------------------ big list speed


@pytest.mark.slow
def test_million_line_list_parses_fast(tmp_path: Path) -> None:
    """Clothing1M-size lists (1M lines) read in seconds: plain string splitting, no stat per file.

    About 2 s of parsing; building the million ``Path`` objects costs most of the rest.
    """
    import time

    root = tmp_path / "big"
    n = 1_000_000
    keys = [f"images/{i % 10}/{i % 100:02d}/{i}.jpg" for i in range(n)]
    _write(root / "noisy_label_kv.txt", [f"{k} {i % 14}" for i, k in enumerate(keys)])
    _write(root / "noisy_train_key_list.txt", keys)
    _write(root / "clean_label_kv.txt", [f"{keys[0]} 3", "images/x/v.jpg 1", "images/x/t.jpg 2"])
    _write(root / "clean_val_key_list.txt", ["images/x/v.jpg"])
    _write(root / "clean_test_key_list.txt", ["images/x/t.jpg"])
    start = time.perf_counter()
    data = read_clothing1m(root, check_images=False)
    elapsed = time.perf_counter() - start
    assert len(data.train_paths) == n and data.train_labels[15] == 1 and data.train_true_labels[0] == 3
    assert elapsed < 60, f"reading a 1M-line list took {elapsed:.1f} s"


# ------------------------------------------------------------------------------- Inception-ResNet-v2


@pytest.fixture(scope="module")
def irv2() -> torch.nn.Module:
    return inception_resnet_v2(num_classes=1000).eval()


def test_inception_resnet_v2_parameter_count(irv2: torch.nn.Module) -> None:
    # Counted from DivideMix's InceptionResNetV2.py (55,843,464 at 1000 classes); WebVision-mini's
    # 50-class head has 950 x 1537 fewer.
    assert sum(p.numel() for p in irv2.parameters()) == 55_843_464
    assert 55_843_464 - 950 * 1537 == 54_383_314


def test_inception_resnet_v2_forward_smallest_input(irv2: torch.nn.Module, one_thread) -> None:
    with torch.no_grad():
        assert irv2(torch.randn(1, 3, 75, 75)).shape == (1, 1000)
    with pytest.raises(ValueError, match="at least 75x75"):
        irv2(torch.randn(1, 3, 74, 74))
    with pytest.raises(UserError, match="fixed channel widths"):
        inception_resnet_v2(num_classes=50, width=2)


@pytest.mark.slow
def test_inception_resnet_v2_forward_299_and_227(irv2: torch.nn.Module) -> None:
    with torch.no_grad():
        assert irv2.features(torch.randn(1, 3, 299, 299)).shape == (1, 1536, 8, 8)
        assert irv2(torch.randn(1, 3, 227, 227)).shape == (1, 1000)  # DivideMix's WebVision crop


# ------------------------------------------------------------- sources, engine and presets end to end
# Trees with every class present (Clothing1M's 14, WebVision-mini's 50), 8 px images; the runs shrink each
# preset with overrides (a width-4 ResNet, 64 px images, batch 4-8, 2-3 epochs) and keep the rest of it.

TINY = {"width": 4, "image_size": 64, "crop_size": 56, "device": "cpu", "progress": False}


def _clothing_tree(root: Path, per_class: int = 3) -> Path:
    """14 classes x ``per_class`` noisy training images (each class's first one mislabelled as the next
    class), one clean val and test image per class, 7 clean-train images."""
    train = [f"images/{c % 10}/{c:02d}/t{c}_{j}.jpg" for c in range(14) for j in range(per_class)]
    noisy = {k: (i // per_class + (i % per_class == 0)) % 14 for i, k in enumerate(train)}
    val = [f"images/v/{c:02d}/v{c}.jpg" for c in range(14)]
    test = [f"images/s/{c:02d}/s{c}.jpg" for c in range(14)]
    clean_train = [f"images/c/{c:02d}/c{c}.jpg" for c in range(0, 14, 2)]
    clean = {k: i % 14 for i, k in enumerate(val + test + clean_train)}
    _write(root / "noisy_label_kv.txt", [f"{k} {v}" for k, v in noisy.items()])
    _write(root / "clean_label_kv.txt", [f"{k} {v}" for k, v in clean.items()])
    _write(root / "noisy_train_key_list.txt", train)
    _write(root / "clean_train_key_list.txt", clean_train)
    _write(root / "clean_val_key_list.txt", val)
    _write(root / "clean_test_key_list.txt", test)
    for key, label in {**noisy, **clean}.items():
        _image(root / key, 18 * label, size=8)
    return root


def _webvision_tree(root: Path) -> Path:
    """WebVision-mini's 50 classes: 2 Google images each (plus a class-60 line that is left out), one
    WebVision val image each, one ILSVRC2012 val image per synset folder."""
    wnids = [f"n{1000000 + c:08d}" for c in range(50)]
    _write(root / "info/synsets.txt", [f"{w} class{c}, other name" for c, w in enumerate(wnids)])
    train = [(f"google/q{c:04d}/{j:08d}.jpg", c) for c in range(50) for j in range(2)]
    _write(root / "info/train_filelist_google.txt", [f"{p} {c}" for p, c in train] + ["google/q0060/x.jpg 60"])
    _write(root / "info/val_filelist.txt", [f"val{c:06d}.jpg {c}" for c in range(50)])
    for p, c in train:
        _image(root / p, 5 * c, size=8)
    for c, w in enumerate(wnids):
        _image(root / f"val_images_256/val{c:06d}.jpg", 5 * c, size=8)
        _image(root / f"imagenet/val/{w}/ILSVRC2012_val_{c:08d}.JPEG", 5 * c, size=8)
    return root


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_class_balanced_subset_is_the_official_walk() -> None:
    labels = np.array([0] * 30 + [1] * 3 + [2] * 20 + [3] * 11)
    for seed in range(5):
        got = class_balanced_subset(labels, 16, 4, np.random.default_rng(seed))
        walk, counts = [], np.zeros(4)  # dataloader_clothing1M.py, mode 'all', over the same permutation
        for i in np.random.default_rng(seed).permutation(len(labels)):
            if counts[labels[i]] < 16 / 4 and len(walk) < 16:
                walk.append(i)
                counts[labels[i]] += 1
        assert got.tolist() == sorted(walk)
        assert np.bincount(labels[got], minlength=4).tolist() == [4, 3, 4, 4]  # class 1 has only 3
    same = class_balanced_subset(labels, 16, 4, np.random.default_rng([0, 5, DIVIDE_DRAW, 0]))
    assert np.array_equal(same, class_balanced_subset(labels, 16, 4, np.random.default_rng([0, 5, DIVIDE_DRAW, 0])))
    assert not np.array_equal(same, class_balanced_subset(labels, 16, 4, np.random.default_rng([0, 6, DIVIDE_DRAW, 0])))


def test_realworld_sources_go_through_one_store(tmp_path: Path, one_thread) -> None:
    root = _clothing_tree(tmp_path / "c1m")
    raw = load_source("clothing1m", str(root), image_size=8, progress=False)
    assert raw.name == "clothing1m" and raw.num_classes == 14 and raw.image_size == 8
    assert len(raw.train_labels) == 42 and len(raw.val_labels) == 14 and len(raw.test_labels) == 14
    assert np.asarray(raw.val_images).shape == (14, 8, 8, 3) and raw.extra_tests == {}
    assert raw.mean == CLOTHING1M_MEAN and raw.train_ids[0] == "images/0/00/t0_0.jpg"
    assert raw.train_true_labels is None  # Clothing1M's few clean labels of noisy keys are not a true-label set
    with_clean = load_source("clothing1m", str(root), image_size=8, progress=False, clean_train=True)
    assert len(with_clean.train_labels) == 49 and with_clean.train_ids[0] == "images/c/00/c0.jpg"
    assert len(list((root / ".cdmix_cache").glob("store_clothing1m_8px_*"))) == 2  # another file list, another store
    load_source("clothing1m", str(root), image_size=8, progress=False)  # reused, not rebuilt
    assert len(list((root / ".cdmix_cache").glob("store_*"))) == 2

    web = load_source("webvision", str(_webvision_tree(tmp_path / "web")), image_size=8, progress=False)
    assert len(web.train_labels) == 100 and len(web.test_labels) == 50 and web.class_names[3] == "class3"
    images, labels = web.extra_tests["imagenet"]
    assert np.asarray(images).shape == (50, 8, 8, 3) and labels.tolist() == list(range(50))
    assert web.val_images is None

    animal = tmp_path / "animal"
    for name in ("0_1.jpg", "3_2.jpg", "0_3.jpg"):
        _image(animal / "training" / name, size=64)
    _image(animal / "testing" / "3_9.jpg", size=64)
    raw = load_source("animal10n", str(animal), progress=False)
    assert raw.image_size == 64 and raw.train_labels.tolist() == [0, 0, 3]


def test_bad_realworld_tree_is_one_cli_line(tmp_path: Path, capsys) -> None:
    from cdmix.cli import main

    root = _clothing_tree(tmp_path / "c1m", per_class=1)
    (root / "clean_val_key_list.txt").unlink()
    code = main(["train", "--dataset", "clothing1m", "--data-path", str(root), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "clean_val_key_list.txt not found" in err[0]


def test_realworld_settings_are_checked() -> None:
    with pytest.raises(UserError, match="DivideMix's Clothing1M protocol"):
        build_config(preset="josrc-clothing1m", epoch_subset_batches=10)
    with pytest.raises(UserError, match="--nesterov needs --optimizer sgd"):
        build_config(nesterov=True, optimizer="adam")
    with pytest.raises(UserError, match="--loss-history 1"):
        build_config(preset="dividemix-clothing1m", loss_history=5)


@pytest.mark.slow
def test_dividemix_clothing1m_preset_run(tmp_path: Path, one_thread) -> None:
    """Per-epoch class-balanced subsets (warm-up 2 x 2 x 4, division 2 x 4 per net), the partner trains on
    that subset only, best.pt chosen on the clean validation set."""
    from cdmix import runs
    from cdmix.engine import start_run

    root = _clothing_tree(tmp_path / "c1m")
    config = build_config(preset="dividemix-clothing1m", data_path=str(root), out=str(tmp_path / "run"),
                          model="resnet18", pretrained="none", epochs=3, lr_step=2, epoch_subset_batches=2, batch_size=4, **TINY)
    trainer = start_run(config)
    try:
        trainer.run()
    finally:
        trainer.release_lock()
    rows = _metrics(tmp_path / "run")
    assert [r["subset_net1"] for r in rows] == ["", "8", "8"] and "val_acc" in rows[0]
    summary = runs.read_summary(tmp_path / "run")
    assert summary["selected_by"] == "val_acc" and summary["num_val"] == 14 and summary["num_train"] == 42
    vals = [float(r["val_acc"]) for r in rows]
    assert summary["selected_epoch"] == 1 + vals.index(max(vals))
    assert torch.load(tmp_path / "run" / runs.BEST, weights_only=False)["epoch"] + 1 == summary["selected_epoch"]
    assert summary["test_at_selected_epoch"]["test_acc"] == float(rows[summary["selected_epoch"] - 1]["test_acc"])

    method, labels = trainer.method, np.asarray(trainer.train.labels.cpu())
    draws = {(epoch, purpose, net): method.draw(epoch, purpose, net, size)
             for epoch, purpose, size in ((0, WARMUP_DRAW, 16), (1, DIVIDE_DRAW, 8), (2, DIVIDE_DRAW, 8))
             for net in (0, 1)}
    for idx in draws.values():
        assert np.bincount(labels[idx], minlength=14).max() <= 2  # class-balanced: at most ceil(16 / 14) each
    assert len(draws[0, WARMUP_DRAW, 0]) == 16 and len(draws[1, DIVIDE_DRAW, 0]) == 8
    assert not np.array_equal(draws[1, DIVIDE_DRAW, 0], draws[2, DIVIDE_DRAW, 0])  # a fresh subset each epoch
    assert not np.array_equal(draws[2, DIVIDE_DRAW, 0], draws[2, DIVIDE_DRAW, 1])  # and one per net
    division = method.last_division  # the last epoch's: each net's GMM on its own subset, NaN elsewhere
    for net in (0, 1):
        subset = draws[2, DIVIDE_DRAW, net]
        assert np.array_equal(division[f"subset_net{net + 1}"], subset)
        prob = division[f"clean_prob_net{net + 1}"]
        assert np.flatnonzero(np.isfinite(prob)).tolist() == subset.tolist()
        labeled, unlabeled = method.labeled_split(prob, "test")
        assert sorted(labeled.tolist() + unlabeled.tolist()) == subset.tolist()
    again = start_run(config.replace(out=str(tmp_path / "run2")))
    try:
        assert np.array_equal(again.method.draw(2, DIVIDE_DRAW, 0, 8), draws[2, DIVIDE_DRAW, 0])  # same seed
    finally:
        again.release_lock()


def test_dividemix_webvision_preset_run(tmp_path: Path, one_thread) -> None:
    """Both test sets, top-1 and top-5, every epoch; the ImageNet figures at the selected epoch."""
    from cdmix import runs
    from cdmix.engine import train

    root = _webvision_tree(tmp_path / "web")
    train(build_config(preset="dividemix-webvision", data_path=str(root), out=str(tmp_path / "run"), model="resnet18",
                       epochs=2, batch_size=8, **TINY))
    rows = _metrics(tmp_path / "run")
    for row in rows:
        for name in ("", "_imagenet"):
            top1, top5 = float(row[f"test_acc{name}"]), float(row[f"test_top5{name}"])
            assert 0 <= top1 <= top5 <= 100
    summary = runs.read_summary(tmp_path / "run")
    assert summary["num_test"] == 50 and "test_top5_imagenet" in summary["test_at_selected_epoch"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["top5"] is True and config["random_resized_crop"] is True and config["crop_size"] == 56


def test_josrc_clothing1m_preset_run_with_pretrained_body(tmp_path: Path, one_thread) -> None:
    """Jo-SRC's training set (clean-train keys first), the MLP-head ResNet-18 started from an ImageNet-style
    file (its fc skipped), SGD with Nesterov momentum."""
    from cdmix import runs
    from cdmix.engine import start_run
    from cdmix.models import create_model

    weights = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", 1000, width=4).state_dict(), weights)
    root = _clothing_tree(tmp_path / "c1m")
    config = build_config(preset="josrc-clothing1m", data_path=str(root), out=str(tmp_path / "run"), epochs=2,
                          warmup=1, batch_size=7, pretrained=str(weights), **TINY)  # 49 = 7 x 7: no batch of one
    trainer = start_run(config)
    try:
        assert all(group["nesterov"] for group in trainer.method.optimizers[0].param_groups)
        body = torch.load(weights)["layer4.1.conv2.weight"]
        assert torch.equal(trainer.method.nets[0].layer4[1].conv2.weight.detach().cpu(), body)
        trainer.run()
    finally:
        trainer.release_lock()
    summary = runs.read_summary(tmp_path / "run")
    assert summary["num_train"] == 49 and summary["selected_by"] == "val_acc" and summary["pretrained_sha256"]


def test_josrc_food101n_preset_run(food: Path, tmp_path: Path, one_thread) -> None:
    from cdmix import runs
    from cdmix.engine import train

    # pretrained="none": from scratch, not the preset's torchvision weights (no network here)
    train(build_config(preset="josrc-food101n", data_path=str(food), out=str(tmp_path / "run"), pretrained="none",
                       epochs=2, warmup=1, batch_size=5, **TINY))
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and "val_acc" not in rows[0] and "test_top5" not in rows[0]
    summary = runs.read_summary(tmp_path / "run")
    assert summary["num_train"] == 5 and summary["num_test"] == 3 and summary["selected_by"] == "test_acc"
