"""Readers of the four real-world noisy-label benchmarks, in their official layouts.

Each reader returns an :class:`ImageList`: image paths and ``int64`` labels for the train, test
(and, where the dataset has one, clean validation) splits, plus the class names. No image is
decoded here; the disk-backed image store does that.

- :func:`read_clothing1m`: Clothing1M (14 classes), as DivideMix's ``dataloader_clothing1M.py``.
- :func:`read_webvision`: WebVision 1.0 "mini" (the first 50 classes, Google images), with the
  WebVision and the ILSVRC2012 validation sets as test sets, as DivideMix's
  ``dataloader_webvision.py``.
- :func:`read_food101n`: Food-101N for training, the Food-101 test set for testing, as Jo-SRC's
  ``data/food101n.py`` and ``data/food101.py``.
- :func:`read_animal10n`: ANIMAL-10N (64x64 images, label in the file name).

Image existence: every listed image is checked, but with one ``os.scandir`` per folder that the
lists name (Clothing1M's million images sit in 1,000 folders), never one ``stat`` per file; pass
``check_images=False`` to skip even that (a missing file then fails when the store decodes it).

Every problem a user can cause (missing folder or list file, malformed line, label outside the
class range, a listed image that is absent) raises one :class:`cdmix.errors.UserError` that names
the file, the line and what to do.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdmix.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

CLOTHING1M_CLASSES = ("T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
                      "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear")
# Label ids 0..9 from the dataset's page (dm.kaist.ac.kr/datasets/animal-10n), lower-cased.
ANIMAL10N_CLASSES = ("cat", "lynx", "wolf", "coyote", "cheetah", "jaguar", "chimpanzee", "orangutan", "hamster",
                     "guinea pig")
WEBVISION_TOTAL_CLASSES = 1000

_WNID = re.compile(r"n\d{8}")
log = logging.getLogger("cdmix")


@dataclass
class ImageList:
    """What a real-world dataset reader returns: file paths and labels, no pixels.

    ``train_labels`` are the (noisy) training labels, ``test_labels`` / ``val_labels`` clean ones;
    all label arrays are ``int64`` of the length of their path list, values in
    ``0 .. len(class_names) - 1``.

    - ``val_paths`` / ``val_labels``: a clean validation set for model selection (Clothing1M).
    - ``extra_tests``: further test sets by name, e.g. ``{"imagenet": (paths, labels)}`` (WebVision).
    - ``train_true_labels``: a clean label per training sample where the dataset ships one, ``-1``
      where it does not (Clothing1M's ``clean_label_kv.txt``).
    - ``train_label_verified``: ``int8`` per training sample, 1 where a human checked that the
      training label is right, 0 where it is wrong, -1 unchecked (Food-101N's verification labels;
      for Clothing1M, whether the clean label equals the noisy one).
    - ``train_ids``: the dataset's own key of each training sample (list-file key or file name).
    """

    train_paths: list[Path]
    train_labels: np.ndarray
    test_paths: list[Path]
    test_labels: np.ndarray
    class_names: list[str]
    val_paths: list[Path] | None = None
    val_labels: np.ndarray | None = None
    extra_tests: dict[str, tuple[list[Path], np.ndarray]] = field(default_factory=dict)
    train_true_labels: np.ndarray | None = None
    train_ids: list[str] | None = None
    train_label_verified: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------ shared helpers


def _existing_dir(path: str | Path, what: str, hint: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist; {hint}")
    return folder


def _find_file(folders: Sequence[Path], name: str, what: str) -> Path:
    """The first ``folder / name`` that is a file; a UserError naming every place looked at."""
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    places = " or ".join(str(f / name) for f in folders)
    raise UserError(f"{what} list file {name} not found (looked at {places}); it comes with the official "
                    f"download, put it there")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not a UTF-8 text file ({exc}); restore it from the official download") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None


def _show(line: str) -> str:
    return repr(line if len(line) <= 80 else line[:77] + "...")


def _split_lines(path: Path, lines: list[str], fields: int, form: str, *, sep: str | None = None,
                 header: str | None = None) -> tuple[list[list[str]], list[int]]:
    """Each non-blank line split into exactly ``fields`` parts, with its 1-based line number.

    A first line starting with ``header`` is skipped (Food-101N's tsv files have one).
    """
    rows: list[list[str]] = []
    numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        if number == 1 and header is not None and line.startswith(header):
            continue
        parts = line.split(sep) if sep is None else line.strip().split(sep)
        if len(parts) != fields:
            if not line.strip():
                continue
            raise UserError(f"{path} line {number}: expected {form}, got {_show(line)}; fix or remove that line")
        rows.append(parts)
        numbers.append(number)
    return rows, numbers


def _labels(path: Path, values: Sequence[str], numbers: Sequence[int], low: int, high: int,
            what: str = "label") -> np.ndarray:
    """``values`` as int64, each in ``low .. high - 1``; a UserError names the first bad line."""
    try:
        labels = np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except ValueError:
        for value, number in zip(values, numbers):
            try:
                int(value)
            except ValueError:
                raise UserError(f"{path} line {number}: {what} {value!r} is not an integer") from None
        raise  # unreachable: some value failed above
    bad = np.flatnonzero((labels < low) | (labels >= high))
    if bad.size:
        i = int(bad[0])
        raise UserError(f"{path} line {numbers[i]}: {what} {labels[i]} is outside {low}..{high - 1}; "
                        f"this list does not belong to this dataset, or the line is damaged")
    return labels


def _check_keys(path: Path, keys: Sequence[str], numbers: Sequence[int], *, unique: bool = True) -> None:
    """Refuse a key that leaves the dataset folder (absolute, ``..``, a drive or a backslash path) and,
    with ``unique``, a key listed twice (its image would be trained on twice)."""
    seen: dict[str, int] = {}
    for key, number in zip(keys, numbers):
        parts = key.split("/")
        if key.startswith(("/", "\\")) or ".." in parts or "\\" in key or ":" in parts[0]:
            raise UserError(f"{path} line {number}: key {key!r} points outside the dataset folder; keys are paths "
                            f"relative to it (restore the official file)")
        if unique:
            if key in seen:
                raise UserError(f"{path} line {number}: key {key} is listed again (first on line {seen[key]}); "
                                f"list each image once")
            seen[key] = number


def _first_missing(base: Path, relative: Sequence[str]) -> int | None:
    """Index of the first ``base / relative[i]`` that is not a file, else None.

    One ``os.scandir`` per distinct parent folder (a set lookup per file), so a million-file list
    costs about as many directory reads as it has folders.
    """
    listings: dict[str, frozenset[str]] = {}
    for i, rel in enumerate(relative):
        parent, _, name = rel.rpartition("/")
        names = listings.get(parent)
        if names is None:
            try:
                with os.scandir(base / parent if parent else base) as entries:
                    names = frozenset(e.name for e in entries if e.is_file())
            except OSError:
                names = frozenset()
            listings[parent] = names
        if name not in names:
            return i
    return None


def _check_images(base: Path, relative: Sequence[str], list_file: Path, numbers: Sequence[int],
                  hint: str) -> None:
    missing = _first_missing(base, relative)
    if missing is not None:
        raise UserError(f"{list_file} line {numbers[missing]}: image {relative[missing]} not found under {base}; "
                        f"{hint}")


def _nonempty(list_file: Path, items: Sequence[object]) -> None:
    if not items:
        raise UserError(f"{list_file} lists no images; restore it from the official download")


def _join(base: Path, relative: Sequence[str]) -> list[Path]:
    return [base / rel for rel in relative]


def _scan_images(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder``, sorted; hidden files skipped."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file()
                      and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------- Clothing1M


def read_clothing1m(root: str | Path, *, include_clean_train: bool = False, check_images: bool = True) -> ImageList:
    """Read Clothing1M (Xiao et al., 2015) from its official lists.

    ``root`` holds the list files (directly or in ``annotations/``, Jo-SRC's layout) and the
    images under ``images/`` as the keys name them (``images/0/00/123.jpg``); DivideMix's layout,
    where the key's ``images/`` prefix is dropped and the folders ``0`` .. ``9`` sit in ``root``,
    is read too.

    Files read (as DivideMix's ``dataloader_clothing1M.py``): ``noisy_label_kv.txt`` and
    ``clean_label_kv.txt`` ("key label" per line, labels 0..13), ``noisy_train_key_list.txt`` (the
    training keys; labels from ``noisy_label_kv``), ``clean_val_key_list.txt`` and
    ``clean_test_key_list.txt`` (labels from ``clean_label_kv``). Class names come from
    ``category_names_eng.txt`` when present, else the 14 standard names.

    Returns an :class:`ImageList`: the 1,000,000 noisy training images in list order (DivideMix
    then samples a class-balanced subset of ``num_batches x batch_size`` each epoch; that is the
    training loop's business), the 14,313 clean validation images (``val_*``) for model selection,
    the 10,526 clean test images; ``train_true_labels`` from ``clean_label_kv`` where a training
    key has one, else -1 (``train_label_verified``: 1 where it equals the noisy label, 0 where it
    differs, -1 where there is none); ``train_ids`` the keys.

    ``include_clean_train=True`` gives Jo-SRC's training set instead: the keys of
    ``clean_train_key_list.txt`` first (with their noisy label where they have one, else their
    clean label), then the noisy training keys, concatenated as Jo-SRC does.
    """
    root = _existing_dir(root, "Clothing1M", "pass the folder that holds noisy_label_kv.txt and images/")
    folders = [root, root / "annotations"]

    def listed(name: str) -> Path:
        return _find_file(folders, name, "Clothing1M")

    def key_labels(name: str) -> tuple[Path, dict[str, int]]:
        path = listed(name)
        rows, numbers = _split_lines(path, _read_lines(path), 2, "'<image key> <label>'")
        labels = _labels(path, [r[1] for r in rows], numbers, 0, len(CLOTHING1M_CLASSES))
        _check_keys(path, [r[0] for r in rows], numbers, unique=False)
        table: dict[str, int] = {}
        for (key, _), label, number in zip(rows, labels.tolist(), numbers):
            if table.setdefault(key, label) != label:
                raise UserError(f"{path} line {number}: key {key} is given label {label}, but an earlier line gave "
                                f"it {table[key]}; keep one label per key")
        return path, table

    def keys(name: str) -> tuple[Path, list[str], list[int]]:
        path = listed(name)
        rows, numbers = _split_lines(path, _read_lines(path), 1, "one image key")
        _check_keys(path, [r[0] for r in rows], numbers)
        return path, [r[0] for r in rows], numbers

    noisy_kv, noisy = key_labels("noisy_label_kv.txt")
    clean_kv, clean = key_labels("clean_label_kv.txt")

    def labelled(path: Path, names: list[str], numbers: list[int], table: dict[str, int], table_path: Path,
                 fallback: dict[str, int] | None = None) -> np.ndarray:
        got = [table.get(k, fallback.get(k, -1) if fallback is not None else -1) for k in names]
        if -1 in got:
            i = got.index(-1)
            raise UserError(f"{path} line {numbers[i]}: key {names[i]} has no label in {table_path.name}; use the "
                            f"list files of one Clothing1M release")
        return np.asarray(got, dtype=np.int64)

    train_list, train_keys, train_numbers = keys("noisy_train_key_list.txt")
    _nonempty(train_list, train_keys)
    train_labels = labelled(train_list, train_keys, train_numbers, noisy, noisy_kv)
    checks = [(train_list, train_keys, train_numbers)]
    if include_clean_train:
        extra_list, extra_keys, extra_numbers = keys("clean_train_key_list.txt")
        extra_labels = labelled(extra_list, extra_keys, extra_numbers, noisy, noisy_kv, fallback=clean)
        train_keys = extra_keys + train_keys
        train_labels = np.concatenate([extra_labels, train_labels])
        checks.append((extra_list, extra_keys, extra_numbers))
    true_labels = np.fromiter((clean.get(k, -1) for k in train_keys), dtype=np.int64, count=len(train_keys))
    verified = np.where(true_labels < 0, -1, true_labels == train_labels).astype(np.int8)

    val_list, val_keys, val_numbers = keys("clean_val_key_list.txt")
    val_labels = labelled(val_list, val_keys, val_numbers, clean, clean_kv)
    test_list, test_keys, test_numbers = keys("clean_test_key_list.txt")
    _nonempty(test_list, test_keys)
    test_labels = labelled(test_list, test_keys, test_numbers, clean, clean_kv)
    checks += [(val_list, val_keys, val_numbers), (test_list, test_keys, test_numbers)]

    # Official layout: root/images/0/00/x.jpg. DivideMix's: the "images/" prefix dropped (key[7:]).
    strip = not (root / "images").is_dir() and any((root / str(d)).is_dir() for d in range(10))

    def relative(key_list: list[str]) -> list[str]:
        return [k.removeprefix("images/") for k in key_list] if strip else key_list

    if check_images:
        for path, key_list, numbers in checks:
            _check_images(root, relative(key_list), path, numbers,
                          f"extract the Clothing1M image archives into {root / 'images'}")
    return ImageList(
        train_paths=_join(root, relative(train_keys)), train_labels=train_labels,
        test_paths=_join(root, relative(test_keys)), test_labels=test_labels,
        class_names=_clothing1m_names(folders),
        val_paths=_join(root, relative(val_keys)), val_labels=val_labels,
        train_true_labels=true_labels, train_ids=train_keys, train_label_verified=verified,
    )


def _clothing1m_names(folders: Sequence[Path]) -> list[str]:
    for folder in folders:
        path = folder / "category_names_eng.txt"
        if path.is_file():
            names = [line.strip() for line in _read_lines(path) if line.strip()]
            if len(names) != len(CLOTHING1M_CLASSES):
                raise UserError(f"{path} lists {len(names)} class names, Clothing1M has "
                                f"{len(CLOTHING1M_CLASSES)}; restore the official file or delete it")
            return names
    return list(CLOTHING1M_CLASSES)


# ----------------------------------------------------------------------------------------- WebVision


def read_webvision(root: str | Path, imagenet_root: str | Path | None = None, num_classes: int = 50, *,
                   check_images: bool = True) -> ImageList:
    """Read WebVision 1.0 with the first ``num_classes`` classes, as DivideMix's "mini" WebVision.

    ``root`` holds ``info/train_filelist_google.txt`` ("google/q0001/00000001.jpg 0": path relative
    to ``root``, class id 0..999), ``info/val_filelist.txt`` (file name and class id; images under
    ``val_images_256/``) and, optionally, ``info/synsets.txt`` (one "wnid name, synonyms" line per
    class id). As in DivideMix's ``dataloader_webvision.py``, the training set is the Google images
    whose class id is below ``num_classes`` (Flickr images are not used) and the test set the
    WebVision validation images of those classes. Class names are the first synonym of each
    ``synsets.txt`` line, or the class id when that file is absent.

    ``extra_tests["imagenet"]``: the ILSVRC2012 validation images of the same classes, read from
    ``imagenet_root/val/<folder>/`` (or ``imagenet_root/<folder>/``); ``imagenet_root=None`` means
    ``root/imagenet`` (DivideMix's place), and the set is left out when that folder is absent.
    DivideMix itself reads folders named by the WebVision class id (``val/0`` .. ``val/49``), so the
    user must have sorted the images into them; here class ``c`` reads the folder named after the
    ``c``-th wnid of ``info/synsets.txt`` (the standard one-folder-per-synset ILSVRC2012 layout),
    falling back to a folder named ``c`` (DivideMix's layout). Without ``synsets.txt``, class ``c``
    is the ``c``-th of the sorted wnid folders: WebVision's class ids follow ILSVRC2012's synset
    order, which is sorted by wnid. Images in a class folder are taken in file-name order.

    ``train_ids`` are the list paths ("google/q0001/00000001.jpg").
    """
    root = _existing_dir(root, "WebVision", "pass the folder that holds info/ and the google/ image folders")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or \
            not 1 <= num_classes <= WEBVISION_TOTAL_CLASSES:
        raise UserError(f"WebVision num_classes must be an integer in 1..{WEBVISION_TOTAL_CLASSES}, "
                        f"got {num_classes!r} (DivideMix uses 50)")
    info = [root / "info", root]
    wnids, names = _webvision_synsets(root / "info" / "synsets.txt", num_classes)

    def read_list(name: str) -> tuple[Path, list[str], np.ndarray, list[int]]:
        path = _find_file(info, name, "WebVision")
        rows, numbers = _split_lines(path, _read_lines(path), 2, "'<image path> <class id>'")
        labels = _labels(path, [r[1] for r in rows], numbers, 0, WEBVISION_TOTAL_CLASSES, "class id")
        _check_keys(path, [r[0] for r in rows], numbers)
        keep = np.flatnonzero(labels < num_classes)
        kept = keep.tolist()
        return path, [rows[i][0] for i in kept], labels[keep], [numbers[i] for i in kept]

    train_list, train_rel, train_labels, train_numbers = read_list("train_filelist_google.txt")
    val_list, val_rel, val_labels, val_numbers = read_list("val_filelist.txt")
    for path, rel in ((train_list, train_rel), (val_list, val_rel)):
        if not rel:
            raise UserError(f"{path} lists no image of classes 0..{num_classes - 1}; is it the right file?")
    val_base = root / "val_images_256"
    if check_images:
        _check_images(root, train_rel, train_list, train_numbers,
                      f"extract the WebVision Google training images into {root}")
        _check_images(val_base, val_rel, val_list, val_numbers,
                      f"extract the WebVision validation images into {val_base}")

    extra: dict[str, tuple[list[Path], np.ndarray]] = {}
    if imagenet_root is not None or (root / "imagenet").is_dir():
        extra["imagenet"] = _imagenet_val(Path(imagenet_root if imagenet_root is not None else root / "imagenet"),
                                          wnids, num_classes)
    else:  # said once, here at the start: the run has no test_acc_imagenet column, and nothing else says so
        log.warning(f"no ILSVRC2012 validation folder at {root / 'imagenet'}: the second test set (ImageNet val of "
                    "the 50 classes, test_acc_imagenet) is left out; give --extra-data-path ILSVRC2012_FOLDER to score it")
    return ImageList(
        train_paths=_join(root, train_rel), train_labels=train_labels,
        test_paths=_join(val_base, val_rel), test_labels=val_labels,
        class_names=names, extra_tests=extra, train_ids=train_rel,
    )


def _webvision_synsets(path: Path, num_classes: int) -> tuple[list[str] | None, list[str]]:
    """(wnid per class id or None, class name per class id) for the first ``num_classes`` classes."""
    if not path.is_file():
        return None, [str(c) for c in range(num_classes)]
    rows = [(n, line.split(None, 1)) for n, line in enumerate(_read_lines(path), start=1) if line.strip()]
    if len(rows) < num_classes:
        raise UserError(f"{path} lists {len(rows)} synsets, fewer than the {num_classes} classes asked for; "
                        f"restore the official file")
    wnids, names = [], []
    for number, parts in rows[:num_classes]:
        if not _WNID.fullmatch(parts[0]):
            raise UserError(f"{path} line {number}: expected '<wnid like n01440764> <names>', got {parts[0]!r}")
        wnids.append(parts[0])
        names.append(parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0])
    return wnids, names


def _imagenet_val(imagenet_root: Path, wnids: list[str] | None, num_classes: int) -> tuple[list[Path], np.ndarray]:
    imagenet_root = imagenet_root.expanduser()
    val = imagenet_root / "val" if (imagenet_root / "val").is_dir() else imagenet_root
    if not val.is_dir():
        raise UserError(f"ImageNet folder {imagenet_root} does not exist; pass the ILSVRC2012 folder whose val/ "
                        f"holds one sub-folder per synset")
    if wnids is None:
        found = sorted(d.name for d in val.iterdir() if d.is_dir() and _WNID.fullmatch(d.name))
        wnids = found[:num_classes] if len(found) >= num_classes else None
    paths: list[Path] = []
    labels: list[int] = []
    for c in range(num_classes):
        candidates = ([val / wnids[c]] if wnids is not None else []) + [val / str(c)]
        folder = next((d for d in candidates if d.is_dir()), None)
        if folder is None:
            looked = " or ".join(str(d) for d in candidates)
            raise UserError(f"no ImageNet validation folder for WebVision class {c} (looked at {looked}); sort the "
                            f"ILSVRC2012 validation images into one folder per synset")
        files = _scan_images(folder)
        if not files:
            raise UserError(f"ImageNet validation folder {folder} holds no images")
        paths.extend(folder / f for f in files)
        labels.extend([c] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------------------- Food-101N


def read_food101n(root: str | Path, food101_root: str | Path | None = None, *,
                  check_images: bool = True) -> ImageList:
    """Read Food-101N (Lee et al., 2018) for training and the Food-101 test set for testing.

    ``root`` holds ``meta/imagelist.tsv`` (a "class_name/key" header, then "apple_pie/<key>.jpg"
    per line; images under ``images/``) and, optionally, ``meta/verified_train.tsv`` (a header, then
    "apple_pie/<key>.jpg<TAB>1" where 1 means the class label is right, 0 wrong).
    ``food101_root`` (default ``root/food-101``, Jo-SRC's layout) holds Food-101's
    ``meta/classes.txt``, ``meta/test.txt`` ("apple_pie/1011328" per line) and
    ``images/<class>/<id>.jpg``.

    As Jo-SRC (``data/food101n.py``, ``utils/builder.py``) does: training uses **every** image of
    ``imagelist.tsv`` (310,009) with its folder's class as the noisy label, not only the verified
    subset; the classes are Food-101's class names sorted alphabetically (label = index); the test
    set is Food-101's 25,250 test images. The verification labels (52,867 of the training images)
    come back as ``train_label_verified`` (1 right, 0 wrong, -1 unchecked); a verification line
    naming an image missing from ``imagelist.tsv`` is ignored (the official file has one).
    ``train_true_labels`` stays None: a "wrong" verdict does not say which class is right.
    ``train_ids`` are the list entries ("apple_pie/<key>.jpg").
    """
    root = _existing_dir(root, "Food-101N", "pass the folder that holds meta/imagelist.tsv and images/")
    image_list = _find_file([root / "meta"], "imagelist.tsv", "Food-101N")
    food101 = Path(food101_root).expanduser() if food101_root is not None else root / "food-101"
    food101 = _existing_dir(food101, "Food-101", "pass food101_root, the folder that holds Food-101's meta/ and "
                                                 "images/ (its test set is Food-101N's test set)")
    classes_file = _find_file([food101 / "meta"], "classes.txt", "Food-101")
    class_names = sorted({line.strip() for line in _read_lines(classes_file) if line.strip()})
    if not class_names:
        raise UserError(f"{classes_file} lists no classes; restore it from the Food-101 download")
    index = {name: i for i, name in enumerate(class_names)}
    own_classes = root / "meta" / "classes.txt"
    if own_classes.is_file():
        own = {line.strip() for line in _read_lines(own_classes) if line.strip()} - {"class_name"}
        if own != set(class_names):
            raise UserError(f"{own_classes} and {classes_file} list different classes; use Food-101N with "
                            f"the Food-101 release it was built for")

    def class_ids(path: Path, rows: list[list[str]], numbers: list[int]) -> np.ndarray:
        try:
            return np.fromiter((index[r[0]] for r in rows), dtype=np.int64, count=len(rows))
        except KeyError as exc:
            i = next(i for i, r in enumerate(rows) if r[0] not in index)
            raise UserError(f"{path} line {numbers[i]}: class {exc.args[0]!r} is not one of the {len(class_names)} "
                            f"classes of {classes_file}") from None

    rows, numbers = _split_lines(image_list, _read_lines(image_list), 2, "'<class>/<file>.jpg'", sep="/",
                                 header="class_name")
    _nonempty(image_list, rows)
    train_labels = class_ids(image_list, rows, numbers)
    train_ids = [f"{r[0]}/{r[1]}" for r in rows]
    _check_keys(image_list, train_ids, numbers)
    image_base = root / "images"

    test_list = _find_file([food101 / "meta"], "test.txt", "Food-101")
    test_rows, test_numbers = _split_lines(test_list, _read_lines(test_list), 2, "'<class>/<image id>'", sep="/")
    _nonempty(test_list, test_rows)
    test_labels = class_ids(test_list, test_rows, test_numbers)
    test_rel = [f"{r[0]}/{r[1]}.jpg" for r in test_rows]
    test_base = food101 / "images"

    verified = _food101n_verified(root / "meta" / "verified_train.tsv", train_ids)
    if check_images:
        _check_images(image_base, train_ids, image_list, numbers,
                      f"extract the Food-101N images into {image_base}")
        _check_images(test_base, test_rel, test_list, test_numbers,
                      f"extract the Food-101 images into {test_base}")
    return ImageList(
        train_paths=_join(image_base, train_ids), train_labels=train_labels,
        test_paths=_join(test_base, test_rel), test_labels=test_labels,
        class_names=class_names, train_ids=train_ids, train_label_verified=verified,
    )


def _food101n_verified(path: Path, train_ids: list[str]) -> np.ndarray | None:
    if not path.is_file():
        return None
    rows, numbers = _split_lines(path, _read_lines(path), 2, "'<class>/<file>.jpg<TAB><0 or 1>'", sep="\t",
                                 header="class_name")
    flags = _labels(path, [r[1] for r in rows], numbers, 0, 2, "verification label")
    position = {key: i for i, key in enumerate(train_ids)}
    verified = np.full(len(train_ids), -1, dtype=np.int8)
    for (key, _), flag in zip(rows, flags.tolist()):
        i = position.get(key)
        if i is not None:
            verified[i] = flag
    return verified


# ---------------------------------------------------------------------------------------- ANIMAL-10N


def read_animal10n(root: str | Path) -> ImageList:
    """Read ANIMAL-10N (Song et al., 2019): ``root/training/`` (50,000) and ``root/testing/`` (5,000).

    Each image's file name is ``<label>_<id>.jpg`` with the class id 0..9 first; the classes are,
    in id order, cat, lynx, wolf, coyote, cheetah, jaguar, chimpanzee, orangutan, hamster,
    guinea pig (the dataset page's table). Training labels are the noisy human labels, test
    labels clean. Images are taken in file-name order; ``train_ids`` are the file names.
    """
    root = _existing_dir(root, "ANIMAL-10N", "pass the folder that holds training/ and testing/")
    splits = []
    for name in ("training", "testing"):
        folder = _existing_dir(root / name, "ANIMAL-10N", f"extract the ANIMAL-10N archive so that {root} holds "
                                                          f"training/ and testing/")
        files = _scan_images(folder)
        if not files:
            raise UserError(f"ANIMAL-10N folder {folder} holds no images")
        labels = np.empty(len(files), dtype=np.int64)
        for i, file in enumerate(files):
            head = file.split("_", 1)[0]
            if "_" not in file or not (head.isascii() and head.isdigit()):  # not "٣_…", which int() reads as 3
                raise UserError(f"{folder / file}: expected a file name '<label>_<id>.jpg'; remove files that are "
                                f"not part of ANIMAL-10N")
            labels[i] = int(head)
            if labels[i] >= len(ANIMAL10N_CLASSES):
                raise UserError(f"{folder / file}: label {labels[i]} is outside 0..{len(ANIMAL10N_CLASSES) - 1}; "
                                f"remove files that are not part of ANIMAL-10N")
        splits.append(([folder / f for f in files], labels, files))
        _warn_links(root, folder, files)
    (train_paths, train_labels, train_files), (test_paths, test_labels, _) = splits
    return ImageList(train_paths=train_paths, train_labels=train_labels, test_paths=test_paths,
                     test_labels=test_labels, class_names=list(ANIMAL10N_CLASSES), train_ids=train_files)


def _warn_links(root: Path, folder: Path, files: Sequence[str]) -> None:
    """Warn about images in ``folder`` that are links to files outside ``root``."""
    real_root = root.resolve()
    outside = [f for f in files if (folder / f).is_symlink() and not (folder / f).resolve().is_relative_to(real_root)]
    if outside:
        log.warning(f"{len(outside)} image(s) in {folder} are links to files outside {root} (e.g. {outside[0]} -> "
                    f"{(folder / outside[0]).resolve()}); they are read as if they were in it")


READERS: dict[str, Callable[..., ImageList]] = {
    "clothing1m": read_clothing1m,
    "webvision": read_webvision,
    "food101n": read_food101n,
    "animal10n": read_animal10n,
}
"""Dataset name -> reader; each takes the dataset folder first."""
