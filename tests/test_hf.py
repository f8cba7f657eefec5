"""``--dataset hf``: Hugging Face datasets saved with ``save_to_disk`` or as parquet / imagefolder files,
built here with ``datasets`` itself (skipped without it: ``pip install -e '.[test]'`` brings it)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from cdmix.cli import main
from cdmix.data.sources import load_source
from cdmix.errors import UserError

datasets = pytest.importorskip("datasets", reason="--dataset hf needs the datasets extra (pip install datasets)")

CLASSES = ["cat", "dog", "fox"]
N_TRAIN, N_TEST = 8, 2  # per class


def _image(label: int, k: int):
    """A 20 x 24 picture whose colour says its class and number (pixel value ``colour(label, k)``)."""
    from PIL import Image

    return Image.fromarray(np.full((20, 24, 3), _colour(label, k), dtype=np.uint8))


def _colour(label: int, k: int) -> int:
    return 80 * label + 3 * k


def _split(per_class: int, prefix: str, with_id: bool = True, image: str = "image", label: str = "label"):
    from datasets import ClassLabel, Dataset, Features, Image, Value

    rows = [(c, k) for k in range(per_class) for c in range(len(CLASSES))]  # classes interleaved
    columns = {image: [_image(c, k) for c, k in rows], label: [c for c, _ in rows]}
    features = {image: Image(), label: ClassLabel(names=CLASSES)}
    if with_id:
        columns["id"] = [f"{prefix}-{CLASSES[c]}-{k}" for c, k in rows]
        features["id"] = Value("string")
    return Dataset.from_dict(columns, features=Features(features))


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    """A DatasetDict (train/test, with an id column) saved with save_to_disk, the same as parquet files
    (no id column), and a plain Dataset without a test split."""
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf")
    saved = datasets.DatasetDict(train=_split(N_TRAIN, "tr"), test=_split(N_TEST, "te"))
    saved.save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    _split(N_TRAIN, "tr", with_id=False).to_parquet(str(root / "parquet" / "train-00000-of-00001.parquet"))
    _split(N_TEST, "te", with_id=False).to_parquet(str(root / "parquet" / "test-00000-of-00001.parquet"))
    _split(N_TRAIN, "tr", image="img", label="y").save_to_disk(str(root / "plain"))
    return root


def _expected(ids_or_rows, with_id: bool) -> tuple[np.ndarray, np.ndarray]:
    """(labels, pixel values) the training rows named ``ids_or_rows`` were built with."""
    labels, colours = [], []
    for name in ids_or_rows:
        if with_id:
            _, cls, k = name.split("-")
            c, k = CLASSES.index(cls), int(k)
        else:
            row = int(name)
            c, k = row % len(CLASSES), row // len(CLASSES)
        labels.append(c)
        colours.append(_colour(c, k))
    return np.asarray(labels), np.asarray(colours)


def test_save_to_disk_dataset_dict_splits_names_ids_and_pixels(hf_data):
    raw = load_source("hf", str(hf_data / "saved"), image_size=8, progress=False)
    assert raw.class_names == CLASSES
    assert len(raw.train_labels) == N_TRAIN * 3 and len(raw.test_labels) == N_TEST * 3  # its own test split
    assert sorted(raw.train_ids) == sorted(f"tr-{c}-{k}" for c in CLASSES for k in range(N_TRAIN))
    labels, colours = _expected(raw.train_ids, with_id=True)
    np.testing.assert_array_equal(raw.train_labels, labels)
    images = np.asarray(raw.train_images)
    assert images.shape == (N_TRAIN * 3, 8, 8, 3)
    np.testing.assert_array_equal(images.reshape(len(images), -1).min(1), colours)  # each row its own picture
    np.testing.assert_array_equal(images.reshape(len(images), -1).max(1), colours)
    np.testing.assert_array_equal(np.sort(np.asarray(raw.test_images).reshape(N_TEST * 3, -1)[:, 0]),
                                  np.sort([_colour(c, k) for c in range(3) for k in range(N_TEST)]))
    # decoded into an image store under the data folder, reused the next time
    stores = sorted((hf_data / "saved" / ".cdmix_cache").glob("store_hf_8px_*"))
    again = load_source("hf", str(hf_data / "saved"), image_size=8, progress=False)
    assert sorted((hf_data / "saved" / ".cdmix_cache").glob("store_hf_8px_*")) == stores and len(stores) == 1
    assert again.train_ids == raw.train_ids


def test_parquet_files_without_id_column_are_named_by_row_number(hf_data):
    raw = load_source("hf", str(hf_data / "parquet"), image_size=8, progress=False)
    assert raw.class_names == CLASSES  # the ClassLabel survives the parquet round trip
    assert len(raw.test_labels) == N_TEST * 3
    assert raw.train_ids == [str(i) for i in range(N_TRAIN * 3)]  # the row number in the train split
    labels, colours = _expected(raw.train_ids, with_id=False)
    np.testing.assert_array_equal(raw.train_labels, labels)
    np.testing.assert_array_equal(np.asarray(raw.train_images)[:, 0, 0, 0], colours)
    # one .parquet file is a dataset with one split: a seeded 10% test split, as a folder without test/
    single = load_source("hf", str(hf_data / "parquet" / "train-00000-of-00001.parquet"), image_size=8,
                         progress=False, seed=3)
    assert len(single.train_labels) + len(single.test_labels) == N_TRAIN * 3 and len(single.test_labels) == 3


def test_imagefolder_files_take_class_names_from_their_folders(tmp_path):
    for split, per_class in (("train", 4), ("test", 1)):
        for c, name in enumerate(CLASSES[:2]):
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(per_class):
                _image(c, k).save(tmp_path / split / name / f"{k}.png")
    raw = load_source("hf", str(tmp_path), image_size=8, progress=False)
    assert raw.class_names == CLASSES[:2] and len(raw.train_labels) == 8 and len(raw.test_labels) == 2
    colours = np.asarray(raw.train_images)[:, 0, 0, 0]
    for c in range(2):
        assert set(colours[raw.train_labels == c].tolist()) == {_colour(c, k) for k in range(4)}


def test_columns_by_flag_and_no_test_split(hf_data):
    path = str(hf_data / "plain")
    with pytest.raises(UserError, match="no column 'image'.*--hf-image-column"):
        load_source("hf", path, progress=False)
    raw = load_source("hf", path, image_size=8, progress=False, seed=0, hf_image_column="img", hf_label_column="y")
    # a plain Dataset: no test split, so a seeded stratified 10% of it is (as the folder source does)
    assert len(raw.train_labels) == 21 and len(raw.test_labels) == 3 and set(raw.test_labels) == {0, 1, 2}
    assert raw.class_names == CLASSES and len(set(raw.train_ids)) == 21
    same = load_source("hf", path, image_size=8, progress=False, seed=0, hf_image_column="img", hf_label_column="y")
    assert same.train_ids == raw.train_ids
    with pytest.raises(UserError, match="not images.*--hf-image-column"):
        load_source("hf", path, progress=False, hf_image_column="y", hf_label_column="y")
    with pytest.raises(UserError, match="does not exist"):
        load_source("hf", str(hf_data / "missing"), progress=False)


def test_train_on_hf_dataset_names_rows_by_id_and_class(capsys, hf_data, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--dataset", "hf", "--data-path", str(hf_data / "saved"), "--epochs", "1", "--width", "2",
                 "--method", "standard", "--image-size", "16", "--out", str(run), "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    with (run / "label_issues.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_ids = {f"tr-{c}-{k}" for c in CLASSES for k in range(N_TRAIN)}
    assert {r["id"] for r in rows} == train_ids  # every training row, named by the dataset's id column
    for r in rows:
        assert r["given_class"] == r["id"].split("-")[1] == CLASSES[int(r["given_label"])]
        assert r["predicted_class"] in CLASSES
    # the review page finds the same images again (thumbnails), and the cleaned labels name rows by id
    code = main(["issues", str(run), "--html", "--clean-csv", str(tmp_path / "clean.csv"), "--fix", "relabel"])
    assert code == 0, capsys.readouterr().err
    page = (run / "issues.html").read_text()
    assert page.count("data:image/png;base64,") == len(rows) and "no-thumbnails" not in page
    lines = (tmp_path / "clean.csv").read_text().splitlines()
    assert lines[0] == "id,label" and {line.split(",")[0] for line in lines[1:]} == train_ids


def test_without_the_datasets_package_one_line_says_how_to_install(hf_data):
    # The package made unimportable in a fresh interpreter (what a plain `pip install cdmix` has).
    code = ("import sys; sys.modules['datasets'] = None; from cdmix.cli import main; "
            f"sys.exit(main(['train', '--dataset', 'hf', '--data-path', {str(hf_data / 'saved')!r}, '--epochs', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "datasets" in lines[0], done.stderr
