"""Shared test fixtures: where the real data lives, and writers of the official CIFAR layouts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _pickle_py2_style(obj: object, path: Path) -> None:
    """Pickle like the official (Python 2) files: protocol 2, ``numpy.core`` array constructor."""
    data = pickle.dumps(obj, protocol=2)
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def _rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 -> N x 3072 rows (1024 R, 1024 G, 1024 B)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar10(folder: Path, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                  test_labels: np.ndarray, label_names: list[str] | None = None) -> Path:
    """Write ``folder/cifar-10-batches-py`` in the official layout; train split in 5 batches."""
    out = Path(folder) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    names = label_names or ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"]
    for i, part in enumerate(np.array_split(np.arange(len(train_images)), 5), start=1):
        _pickle_py2_style({
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in train_labels[part]],
            b"data": _rows(train_images[part]),
            b"filenames": [f"img_{j}.png".encode() for j in part],
        }, out / f"data_batch_{i}")
    _pickle_py2_style({
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in test_labels],
        b"data": _rows(test_images),
        b"filenames": [f"test_{j}.png".encode() for j in range(len(test_images))],
    }, out / "test_batch")
    _pickle_py2_style({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000,
                       b"num_vis": 3072}, out / "batches.meta")
    return out


def write_cifar100(folder: Path, train_images: np.ndarray, train_fine: np.ndarray, train_coarse: np.ndarray,
                   test_images: np.ndarray, test_fine: np.ndarray, test_coarse: np.ndarray) -> Path:
    """Write ``folder/cifar-100-python`` (``train``, ``test``, ``meta``) in the official layout."""
    out = Path(folder) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for name, images, fine, coarse in (("train", train_images, train_fine, train_coarse),
                                       ("test", test_images, test_fine, test_coarse)):
        _pickle_py2_style({
            b"filenames": [f"{name}_{j}.png".encode() for j in range(len(images))],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) for v in coarse],
            b"data": _rows(images),
        }, out / name)
    _pickle_py2_style({b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
                       b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)]}, out / "meta")
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def _shared_file(shared: Path, relative: str) -> Path:
    path = shared / relative
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent")
    return path


@pytest.fixture(scope="session")
def cifar10_subset(shared_data: Path) -> dict[str, np.ndarray]:
    """The real CIFAR-10 subset arrays (``train_images``, ``train_index``, ``train_labels``, ...)."""
    with np.load(_shared_file(shared_data, "cifar10-subset/cifar10_subset.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def cifar100_subset(shared_data: Path) -> dict[str, np.ndarray]:
    """The real CIFAR-100 subset arrays (fine ``*_labels`` and ``*_coarse``)."""
    with np.load(_shared_file(shared_data, "cifar100-subset/cifar100_subset.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def cifar10n_file(shared_data: Path) -> Path:
    return _shared_file(shared_data, "cifar-n/CIFAR-10_human.pt")


@pytest.fixture(scope="session")
def cifar100n_file(shared_data: Path) -> Path:
    return _shared_file(shared_data, "cifar-n/CIFAR-100_human.pt")


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory, cifar10_subset: dict[str, np.ndarray]) -> Path:
    """A folder holding ``cifar-10-batches-py`` written from the real subset (read-only use)."""
    root = tmp_path_factory.mktemp("cifar10")
    d = cifar10_subset
    write_cifar10(root, d["train_images"], d["train_labels"], d["test_images"], d["test_labels"])
    return root


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory, cifar100_subset: dict[str, np.ndarray]) -> Path:
    """A folder holding ``cifar-100-python`` written from the real subset (read-only use)."""
    root = tmp_path_factory.mktemp("cifar100")
    d = cifar100_subset
    write_cifar100(root, d["train_images"], d["train_labels"], d["train_coarse"], d["test_images"],
                   d["test_labels"], d["test_coarse"])
    return root


@pytest.fixture(scope="session")
def cifar_writers() -> dict[str, object]:
    """``{"cifar10": write_cifar10, "cifar100": write_cifar100}`` for tests that build their own layout."""
    return {"cifar10": write_cifar10, "cifar100": write_cifar100}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets run far faster on one thread (and do not thrash a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Payload:
    """Unpickling this makes the folder ``mark``: the proof that loading a file ran its code."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        import os

        return (os.mkdir, (self.mark,))


@pytest.fixture
def plant_payload():
    """``plant(path, mark, content=None)``: write a pickle payload to ``path`` with ``torch.save``, by
    default shaped like a cdmix checkpoint; loading it unsafely creates the folder ``mark``."""
    import torch

    def plant(path: Path, mark: Path, content=None) -> Path:
        payload = _Payload(str(mark))
        torch.save({"epoch": 0, "method": payload} if content is None else content(payload), path)
        return path

    return plant
