"""The image store: every image of a source decoded once, at one size, into one array on disk.

A store is a folder::

    manifest.json  format, version, source, count, size, channels, class names, files hash, complete
    samples.csv    one row per sample: path (relative to the source) or id, label, split, bytes, mtime_ns
                   (the later of the file's mtime and ctime)
    images.npy     N x S x S x C uint8, a plain .npy (``np.load(path, mmap_mode="r")`` maps it)
    stats.npy      N x 2C float64: per image, the channel means of x and of x^2 (x in [0, 1])
    status.npy     N int8: 0 not decoded yet, 1 decoded, 2 skipped (unreadable)
    skipped.txt    path <TAB> reason of every image that could not be decoded

Geometry: the short side of each image is resized to S (bilinear, antialiased) and the center
S x S square kept, so no image is distorted. Images are converted to RGB (16-bit images scaled to
8 bits, transparency composited on white, EXIF orientation applied).

The build is restartable: a killed build resumes where it stopped (``status.npy`` is written only
after the image rows it marks are on disk), and a complete store is never rebuilt: asked again for
the same files and size it is reused, for other files or another size it is refused.
Training reads rows by index (:class:`StoreView`, :class:`RowReader`), never the whole array.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdmix.atomic import TEMP_SUFFIX, atomic_write
from cdmix.data.decode import (MIN_PIXEL_CAP, array_chunks, decode_image, fit_square,  # noqa: F401  (re-exported)
                               image_stats, max_decoded_pixels, to_rgb)
from cdmix.data.store_rows import RowReader, StoreView  # noqa: F401  (re-exported)
from cdmix.errors import UserError

FORMAT = "cdmix-store"
VERSION = 1
MANIFEST, SAMPLES, IMAGES, STATS, STATUS, SKIPPED = (
    "manifest.json", "samples.csv", "images.npy", "stats.npy", "status.npy", "skipped.txt")
PENDING, DECODED, UNREADABLE = 0, 1, 2
MAX_SIZE = 4096  # the largest image side a store holds (a 4096 px RGB image is 48 MiB)
_STORE_FILES = {MANIFEST, SAMPLES, IMAGES, STATS, STATUS, SKIPPED, ".lock"}

log = logging.getLogger("cdmix")


def _decode_chunk(task: tuple[np.ndarray, list[str], int]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                    list[tuple[int, str]]]:
    """Decode one chunk (worker side): (rows, images k x S x S x 3, their ``image_stats``,
    failures [(row, reason)]; a failed image's row stays zero)."""
    rows, paths, size = task
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    failures = []
    for i, path in enumerate(paths):
        try:
            images[i] = decode_image(path, size)
        except Exception as exc:  # any decoder error of a bad file: skipped and listed, never fatal
            text = " ".join(str(exc).split()) or type(exc).__name__
            failures.append((int(rows[i]), f"{type(exc).__name__}: {text}"[:300]))
    return rows, images, image_stats(images), failures


def decoded_file_chunks(paths: Sequence[str], size: int, chunks: list[np.ndarray], workers: int):
    """Decode the files of each chunk of rows; yields (rows, images, stats, failures) as chunks finish.
    ``workers`` > 1: a pool of spawned processes (safe next to threads and CUDA)."""
    tasks = ((rows, [paths[r] for r in rows], size) for rows in chunks)
    if workers <= 1 or len(chunks) <= 1:
        yield from map(_decode_chunk, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
        yield from pool.imap_unordered(_decode_chunk, tasks)


# -------------------------------------------------------------------------------------- the manifest


@dataclass
class Samples:
    """What a store holds, in row order: ``names`` (relative path or id), int64 ``labels``, ``splits``
    ("train", "test" or "" when the source has no split), ``bytes`` and ``mtimes`` of each file."""

    names: list[str]
    labels: np.ndarray
    splits: list[str]
    bytes: list[int]
    mtimes: list[int]

    def __len__(self) -> int:
        return len(self.names)

    def files_hash(self) -> str:
        """Hash of the ordered file list (name, size, modification time), labels not included."""
        digest = hashlib.sha256()
        for name, size, mtime in zip(self.names, self.bytes, self.mtimes):
            digest.update(f"{name}\t{size}\t{mtime}\n".encode())
        return digest.hexdigest()

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        # csv quotes a field holding "\n" but not one holding a lone "\r", which a reader then splits:
        # such rows are written with every text field quoted.
        quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(["path", "label", "split", "bytes", "mtime_ns"])
        for row in zip(self.names, self.labels.tolist(), self.splits, self.bytes, self.mtimes):
            (quoted if "\r" in row[0] else writer).writerow(row)
        return out.getvalue()

    @classmethod
    def read_csv(cls, path: Path) -> "Samples":
        """The samples listed in ``path``; a UserError names the first damaged line."""
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"cannot read {path} ({exc}); prepare the store again") from None
        if not rows or [c.strip() for c in rows[0]] != ["path", "label", "split", "bytes", "mtime_ns"]:
            raise UserError(f"{path} lacks its header path,label,split,bytes,mtime_ns; prepare the store again")
        names, labels, splits, sizes, mtimes = [], [], [], [], []
        for number, row in enumerate(rows[1:], start=2):
            try:
                if len(row) != 5 or not row[0]:
                    raise ValueError("expected 5 fields and a name")
                label, size, mtime = int(row[1]), int(row[3]), int(row[4])
                if label < 0 or size < 0:
                    raise ValueError("a negative label or size")
                if row[2] not in ("", "train", "test", "val") and not row[2].startswith("test:"):
                    raise ValueError(f"unknown split {row[2]!r}")
            except ValueError as exc:
                raise UserError(f"{path} line {number} is damaged ({exc}); prepare the store again") from None
            names.append(row[0])
            labels.append(label)
            splits.append(row[2])
            sizes.append(size)
            mtimes.append(mtime)
        return cls(names, np.asarray(labels, dtype=np.int64), splits, sizes, mtimes)


def describe_difference(old: Samples, new: Samples) -> str:
    """'3 added, 1 removed, 2 changed (e.g. cat/001.jpg)' between two file lists."""
    before = {n: (b, m) for n, b, m in zip(old.names, old.bytes, old.mtimes)}
    after = {n: (b, m) for n, b, m in zip(new.names, new.bytes, new.mtimes)}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and after[n] != before[n]]
    parts = [f"{len(v)} {k}" for k, v in (("added", added), ("removed", removed), ("changed", changed)) if v]
    example = (added + removed + changed)[:1]
    if not parts:
        return "the same files in another order"
    return ", ".join(parts) + (f" (e.g. {example[0]})" if example else "")


# --------------------------------------------------------------------------------------- reading rows


# ------------------------------------------------------------------------------------------ the store


class Store:
    """An opened store folder: its manifest, samples and row status (see the module docstring)."""

    reused = False  # set by build_store when a complete store was asked for again

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.path} is not an image store (no {MANIFEST}); make one with `cdmix prepare`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {manifest_path}: {exc}") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path} is not a cdmix image store manifest")
        if self.manifest.get("version") != VERSION:
            raise UserError(f"{self.path} is a version {self.manifest.get('version')} store; this cdmix reads "
                            f"version {VERSION}: prepare it again into a new folder")
        self._check_manifest()
        self.samples = Samples.read_csv(self.path / SAMPLES)
        self.status = self._read_status()
        self._check_samples()
        n, size, channels = len(self.samples), self.size, self.channels
        _check_npy(self.path / IMAGES, (n, size, size, channels), np.uint8)
        _check_npy(self.path / STATS, (n, 2 * channels), np.float64)

    def _damaged(self, what: str) -> UserError:
        return UserError(f"the store {self.path} is damaged: {what}; prepare it again (or delete it and rerun)")

    def _check_manifest(self) -> None:
        m = self.manifest
        ints = all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool) for k in ("count", "size", "channels"))
        names = m.get("class_names")
        if not ints or not 1 <= m["size"] <= MAX_SIZE or m["channels"] not in (1, 3) or m["count"] < 0:
            raise self._damaged(f"{MANIFEST} has no valid count, size (1..{MAX_SIZE}) and channels (1 or 3)")
        if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
            raise self._damaged(f"{MANIFEST} has no list of class names")
        if not isinstance(m.get("files_hash"), str):
            raise self._damaged(f"{MANIFEST} has no files_hash")

    def _read_status(self) -> np.ndarray:
        try:
            status = np.load(self.path / STATUS, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise self._damaged(f"{STATUS} cannot be read ({exc})") from None
        if status.dtype != np.int8 or status.shape != (len(self.samples),) or \
                not np.isin(status, (PENDING, DECODED, UNREADABLE)).all():
            raise self._damaged(f"{STATUS} holds {status.dtype} {status.shape}, not one 0/1/2 flag per sample "
                                f"({len(self.samples)})")
        return status

    def _check_samples(self) -> None:
        samples, count = self.samples, self.manifest["count"]
        if len(samples) != count:
            raise self._damaged(f"{SAMPLES} lists {len(samples)} samples, the manifest {count}")
        if len(samples) and int(samples.labels.max()) >= len(self.manifest["class_names"]):
            raise self._damaged(f"{SAMPLES} holds label {int(samples.labels.max())}, but there are only "
                                f"{len(self.manifest['class_names'])} classes")
        if len(set(samples.names)) != len(samples):
            raise self._damaged(f"{SAMPLES} lists a name twice")

    size = property(lambda self: int(self.manifest["size"]))
    channels = property(lambda self: int(self.manifest["channels"]))
    complete = property(lambda self: bool(self.manifest.get("complete")))
    class_names = property(lambda self: list(self.manifest["class_names"]))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def decoded(self) -> np.ndarray:
        """(N,) bool: rows holding an image (not skipped)."""
        return self.status == DECODED

    def skipped_count(self) -> int:
        return int((self.status == UNREADABLE).sum())

    def view(self, rows: np.ndarray) -> StoreView:
        return StoreView(RowReader(self.path / IMAGES), rows)

    def mean_std(self, rows: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std (x in [0, 1]) over the images at ``rows``, from the build's stats."""
        stats = np.load(self.path / STATS, mmap_mode="r")[np.sort(np.asarray(rows))]
        if not np.isfinite(stats).all():
            raise self._damaged(f"{STATS} holds non-finite values (NaN or inf), which would make every loss NaN")
        c = self.channels
        mean = stats[:, :c].mean(0)
        std = np.sqrt(np.maximum(stats[:, c:].mean(0) - mean * mean, 0.0))
        std[std == 0] = 1.0
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _check_npy(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Raise a one-line UserError unless ``path`` is a complete ``.npy`` of ``shape`` and ``dtype``."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            found, fortran, found_dtype = (fmt.read_array_header_1_0 if version == (1, 0)
                                           else fmt.read_array_header_2_0)(fh)
            offset = fh.tell()
        length = os.path.getsize(path)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"the store file {path} cannot be read ({exc}); prepare the store again") from None
    if tuple(found) != shape or found_dtype != np.dtype(dtype) or fortran:
        raise UserError(f"the store file {path} holds {found_dtype} {tuple(found)}, not {np.dtype(dtype)} {shape}; "
                        f"prepare the store again")
    if length < offset + int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise UserError(f"the store file {path} is truncated ({length} bytes); prepare the store again")


def open_store(path: str | Path) -> Store:
    """A complete store (a one-line ``UserError`` for a missing, foreign or unfinished one)."""
    store = Store(path)
    if not store.complete:
        raise UserError(f"the store {store.path} is unfinished ({int((store.status != PENDING).sum())} of "
                        f"{len(store)} images); run the same `cdmix prepare` again to finish it")
    return store


@contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (two processes, e.g. torchrun ranks, never build at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for another process that is building {folder}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _check_same(store: Store, samples: Samples, size: int, channels: int, source: str, elsewhere: str) -> None:
    """Refuse a store made at another size or from other files than asked (one line: what differs)."""
    where = f"the store {store.path}"
    if store.size != size:
        raise UserError(f"{where} holds {store.size} px images, {size} px were asked; use --size {store.size} "
                        f"or {elsewhere}")
    if store.channels != channels:
        raise UserError(f"{where} holds {store.channels}-channel images, {channels}-channel were asked; {elsewhere}")
    if store.manifest["files_hash"] != samples.files_hash():
        raise UserError(f"{where} was built from other files than {source} "
                        f"({describe_difference(store.samples, samples)}); {elsewhere}")


ChunkSource = Callable[[list[np.ndarray]], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]]]


def build_store(out: str | Path, samples: Samples, class_names: list[str], size: int, produce: ChunkSource, *,
                channels: int = 3, source: str = "", chunk_size: int = 64, progress: bool = True,
                commit_every: float = 2.0, after_commit: Callable[[int], None] | None = None,
                excluded: Sequence[tuple[str, str]] = (), cache: bool = False, verify: bool = False) -> Store:
    """Build (or finish, or reuse) the store ``out`` of ``samples`` at ``size`` px.

    ``produce(chunks)`` turns a list of row-index chunks into (rows, images k x S x S x C uint8,
    their ``image_stats``, failures [(row, reason)]) in any order. A complete store of the same
    files and size is reused (labels refreshed if they changed); one of other files or another
    size raises ``UserError``. A folder holding only the files of a store whose start was cut short
    (no manifest yet) is started again.
    Every ``commit_every`` seconds the finished rows are synced to disk and only then marked done
    in ``status.npy``; ``after_commit(done)`` is called after each commit (tests use it to
    simulate a kill). ``excluded``: (name, reason) of files left out before the build (names that
    cannot be stored), listed in ``skipped.txt``. ``cache``: ``out`` is a cache folder cdmix chose
    (messages say to delete it, not to pass --out). ``verify``: record a digest of the pixels when
    the build completes and check it on every reuse (a store in a cache outside the data folder).
    Returns the opened, complete store. File-system errors (full, read-only, file too large) raise
    a one-line ``UserError``.
    """
    out = Path(out)
    if not 1 <= size <= MAX_SIZE:
        raise UserError(f"image size {size} px is outside 1..{MAX_SIZE}; choose a smaller size")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give --out a folder for the store")
    elsewhere = f"delete {out} to rebuild it" if cache else "use --out elsewhere for a new store"
    try:
        return _build(out, samples, class_names, size, produce, channels, source, chunk_size, progress, commit_every,
                      after_commit, excluded, elsewhere, verify)
    except OSError as exc:
        raise UserError(_write_error(out, exc)) from None


def _write_error(out: Path, exc: OSError) -> str:
    why = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"the disk holding {out} is full ({why}); free some space and run again (the build resumes)"
    if exc.errno == errno.EFBIG:
        return (f"the file system of {out} cannot hold a file that large ({why}); put the store on another file "
                f"system or use a smaller image size")
    return f"cannot write the image store {out} ({why}); choose a folder you can write to"


def _build(out: Path, samples: Samples, class_names: list[str], size: int, produce: ChunkSource, channels: int,
           source: str, chunk_size: int, progress: bool, commit_every: float, after_commit, excluded, elsewhere: str,
           verify: bool) -> Store:
    n = len(samples)
    with _locked(out):
        if (out / MANIFEST).is_file():
            existing = Store(out)
            _check_same(existing, samples, size, channels, source, elsewhere)
            if existing.complete:
                if verify:
                    _verify_content(existing)
                _refresh_labels(existing, samples, class_names)
                store = open_store(out)
                store.reused = True
                return store
        else:
            _clear_cut_start(out, elsewhere)
            _start(out, samples, class_names, size, channels, source)
        _fill(out, samples, size, channels, produce, chunk_size, progress, commit_every, after_commit, excluded)
        store = Store(out)
        if n and not store.decoded.any():
            first = (out / SKIPPED).read_text().splitlines()[:1]
            raise UserError(f"none of the {n} images could be decoded (first: {first[0] if first else '?'})")
        manifest = {**store.manifest, "complete": True, "skipped": store.skipped_count()}
        if verify:
            manifest["content_sha256"] = _content_digest(out)
        atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return open_store(out)


def _clear_cut_start(out: Path, elsewhere: str) -> None:
    """Remove what a start cut short left (store files, no manifest); refuse a folder with anything else."""
    leftovers = [p for p in out.iterdir() if p.name != ".lock"]
    foreign = [p.name for p in leftovers if p.name not in _STORE_FILES and not p.name.endswith(TEMP_SUFFIX)]
    if foreign:
        if elsewhere.startswith("use --out"):
            elsewhere = "use --out with a new or empty folder"
        raise UserError(f"{out} is not empty and not an image store (it holds {foreign[0]}); {elsewhere}")
    for p in leftovers:
        p.unlink()
    if leftovers:
        log.info(f"{out}: a store whose start was cut short is started again")


def _content_digest(out: Path) -> str:
    """sha256 of the pixels, statistics and row status of the store ``out``."""
    digest = hashlib.sha256()
    for name in (IMAGES, STATS, STATUS):
        with open(out / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _verify_content(store: Store) -> None:
    expected = store.manifest.get("content_sha256")
    if expected is None or _content_digest(store.path) != expected:
        raise UserError(f"the cached store {store.path} does not match the digest its manifest recorded (it was "
                        f"changed after it was built); delete {store.path} and run again to rebuild it")


def _start(out: Path, samples: Samples, class_names: list[str], size: int, channels: int, source: str) -> None:
    n = len(samples)
    need = n * (size * size * channels + 16 * channels) + (1 << 20)
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(f"the store {out} needs {need / 2**30:.1f} GiB for {n} images of {size} px, but only "
                        f"{free / 2**30:.1f} GiB are free there; free space, use a smaller size or another folder")
    np.lib.format.open_memmap(out / IMAGES, mode="w+", dtype=np.uint8, shape=(n, size, size, channels)).flush()
    np.lib.format.open_memmap(out / STATS, mode="w+", dtype=np.float64, shape=(n, 2 * channels)).flush()
    atomic_write(out / STATUS, lambda fh: np.save(fh, np.zeros(n, dtype=np.int8)))
    atomic_write(out / SKIPPED, "")
    atomic_write(out / SAMPLES, samples.to_csv())
    manifest = {"format": FORMAT, "version": VERSION, "source": source, "count": n, "size": size,
                "channels": channels, "class_names": list(class_names), "files_hash": samples.files_hash(),
                "geometry": "short side resized to size (bilinear, antialiased), center crop size x size",
                "complete": False}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: the store exists from here on


def _refresh_labels(store: Store, samples: Samples, class_names: list[str]) -> None:
    old = store.samples
    if np.array_equal(old.labels, samples.labels) and old.splits == samples.splits \
            and store.class_names == list(class_names):
        return
    changed = int((old.labels != samples.labels).sum())
    atomic_write(store.path / SAMPLES, samples.to_csv())
    atomic_write(store.path / MANIFEST, json.dumps({**store.manifest, "class_names": list(class_names)},
                                                   indent=1) + "\n")
    log.info(f"{store.path}: images reused, labels updated from the source ({changed} changed)")


def _fill(out: Path, samples: Samples, size: int, channels: int, produce: ChunkSource, chunk_size: int,
          progress: bool, commit_every: float, after_commit, excluded: Sequence[tuple[str, str]] = ()) -> None:
    """Decode every pending row, committing finished rows every ``commit_every`` seconds."""
    from tqdm import tqdm

    status = np.load(out / STATUS)
    skipped = _read_skipped(out)
    left_out = "".join(f"{name}\t{why}\n" for name, why in excluded)

    def write_skipped() -> None:
        atomic_write(out / SKIPPED, left_out + "".join(f"{samples.names[r]}\t{why}\n" for r, why in sorted(skipped.items())))

    write_skipped()
    pending = np.flatnonzero(status == PENDING)
    chunks = [pending[i:i + chunk_size] for i in range(0, len(pending), chunk_size)]
    row_bytes = size * size * channels
    image_file, stats_file = open(out / IMAGES, "r+b"), open(out / STATS, "r+b")
    image_offset = int(np.load(out / IMAGES, mmap_mode="r").offset)
    stats_offset = int(np.load(out / STATS, mmap_mode="r").offset)
    finished: list[tuple[np.ndarray, bool]] = []  # rows on disk but not yet marked, and whether each decoded

    def commit() -> None:
        if not finished:
            return
        for f in (image_file, stats_file):
            f.flush()
            os.fdatasync(f.fileno())
        write_skipped()
        for rows, ok in finished:
            status[rows] = np.where(ok, DECODED, UNREADABLE)
        atomic_write(out / STATUS, lambda fh: np.save(fh, status))
        finished.clear()
        if after_commit is not None:
            after_commit(int((status != PENDING).sum()))

    last = time.monotonic()
    try:
        with tqdm(total=len(samples), initial=len(samples) - len(pending), unit="img", dynamic_ncols=True,
                  desc=f"decoding into {out.name}", disable=not progress) as bar:
            for rows, images, stats, failures in produce(chunks):
                ok = np.ones(len(rows), dtype=bool)
                for row, why in failures:
                    ok[rows == row] = False
                    skipped[row] = why
                if len(rows) and np.all(np.diff(rows) == 1):  # the usual case: one write per file
                    runs = [(0, len(rows))]
                else:
                    runs = [(i, i + 1) for i in range(len(rows))]
                for a, b in runs:
                    os.pwrite(image_file.fileno(), images[a:b].tobytes(), image_offset + int(rows[a]) * row_bytes)
                    os.pwrite(stats_file.fileno(), stats[a:b].tobytes(),
                              stats_offset + int(rows[a]) * stats.shape[1] * 8)
                finished.append((rows, ok))
                bar.update(len(rows))
                if time.monotonic() - last >= commit_every:
                    commit()
                    last = time.monotonic()
        commit()
    finally:
        try:
            commit()  # what is on disk is kept (also when interrupted)
        finally:
            image_file.close()
            stats_file.close()


def _read_skipped(out: Path) -> dict[int, str]:
    """{row: reason} of the images already found unreadable (a restarted build keeps them)."""
    status_rows = {}
    path = out / SKIPPED
    if not path.is_file():
        return status_rows
    index = {name: i for i, name in enumerate(Samples.read_csv(out / SAMPLES).names)}
    for line in path.read_text().splitlines():
        name, _, why = line.partition("\t")
        if name in index:
            status_rows[index[name]] = why
    return status_rows


def _changed_ns(stat: os.stat_result) -> int:
    """When a file last changed: its ctime, which also moves when the content is rewritten and the
    modification time set back (``touch -d``), so such a file is not mistaken for its old self."""
    return max(stat.st_mtime_ns, stat.st_ctime_ns)


def file_samples(paths: Sequence[Path], names: Sequence[str], labels: np.ndarray,
                 splits: Sequence[str]) -> Samples:
    """``Samples`` of image files (their size and modification time go into the files hash)."""
    stats = [os.stat(p) for p in paths]
    return Samples(list(names), np.asarray(labels, dtype=np.int64), list(splits), [s.st_size for s in stats],
                   [_changed_ns(s) for s in stats])


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
