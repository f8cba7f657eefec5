"""The run folder: config, metrics, TensorBoard events, checkpoints, summary.

Every write is atomic (temp file + rename), so a killed run never leaves a half-written file.
Checkpoints hold only tensors, numbers, strings and plain containers, and are read with
``torch.load(weights_only=True)``: a planted file cannot run code. A train or resume holds an
exclusive lock on its folder (``.cdmix.lock``) for as long as it runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdmix.atomic import atomic_write
from cdmix.errors import UserError

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
LABELS = "labels.npz"
DIVISION = "division.npz"
LABEL_ISSUES = "label_issues.csv"
README = "README.txt"
PRED_PROBS = "pred_probs.npy"
CLEAN_PROB = "clean_prob.npy"
MODEL = "model.json"  # what cdmix.load_model needs besides the weights (net1.safetensors or net1.pt, ...)
ISSUES_PAGE = "issues.html"
ARRAYS = "arrays.npz"  # the training arrays of a run started from arrays (cdmix.train(images, labels))
NET_FILES = tuple(f"net{i}.{ext}" for i in (1, 2) for ext in ("safetensors", "pt"))
# `cdmix pretrain`'s encoder and its provenance (cdmix.models.encoder); a run from --pretrained: its record.
ENCODER_FILES = ("encoder.safetensors", "encoder.pt", "encoder.json")
PRETRAINED_RECORD = "pretrained.json"
LOCK = ".cdmix.lock"
# Files a run writes itself: --overwrite removes these and nothing else; reports may not replace them.
OWN_FILES = (CHECKPOINT, BEST, CONFIG, METRICS, SUMMARY, LABELS, DIVISION, LABEL_ISSUES, README, PRED_PROBS,
             CLEAN_PROB, MODEL, ISSUES_PAGE, ARRAYS, *NET_FILES, *ENCODER_FILES, PRETRAINED_RECORD)
_OWN_PATTERN = re.compile(r"events\.out\.tfevents\..+|report\.html|report-.+\.png")
# Temporary files of the atomic writer left by a kill: ".<own file>.<random>.tmp".
_TEMP_PATTERN = re.compile(r"\.(" + "|".join(re.escape(n) for n in OWN_FILES) + r")\..+\.tmp")

logger = logging.getLogger("cdmix")

README_TEXT = """\
This folder is one cdmix run. Epochs are numbered from 1 everywhere (metrics.csv, summary.json,
the training log, warnings, the report): epoch 1 is the first.

config.json        every setting of the run, resolved (what actually ran)
metrics.csv        one row per epoch: lr, losses, test accuracy, selection metrics, seconds per phase;
                   with --warmup auto, warmup_separation (Ashman's D of the loss GMM, mean over the nets)
                   after each warm-up epoch and warmup_end = 1 on the last warm-up epoch
events.out.tfevents.*  the same metrics for TensorBoard (tensorboard --logdir <this folder>)
checkpoint.pt      everything needed to resume: models, optimizers, RNG states, epoch (cdmix resume <this folder>)
best.pt            the checkpoint of the epoch with the best test (or validation) accuracy
summary.json       test_acc_best, test_acc_last (percent), epochs_done, noise rates, seconds, device;
                   scored_epoch: the epoch whose nets scored the samples and were exported (the last,
                   or the best when ended_collapsed: the run collapsed and did not recover)
labels.npz         the noisy labels training used and, where known, the true labels
division.npz       per-sample losses, clean probabilities and GMM parameters of the last division
label_issues.csv   every training sample ranked by how likely its label is wrong (cdmix issues <this folder>):
                   index (row in the training order), id (path or id column, where the data has one),
                   given and predicted label and class, clean_prob, issue_score, scored, and the true
                   label where it is known. How each score was made, after the last epoch, by the final
                   nets (the best epoch's when the run ended collapsed) in eval mode without augmentation:
                     issue_score = 1 - pred_probs[i, given label] (the ranking, most suspicious first);
                     clean_prob  = the clean component's posterior of a two-component GMM fitted, per net,
                                   to the min-max normalised per-sample losses of the in-sample part,
                                   averaged over the nets; clean_prob < 0.5 is the default flagged set;
                     scored      = in-sample (trained on with its given label) or held-out (the
                                   --val-fraction part: never trained on, scored by the same nets and GMM).
pred_probs.npy     N x C: the final nets' mean softmax for every training sample, in the training order
                   (in-sample for the trained part): cleanlab.filter.find_label_issues(labels, pred_probs)
clean_prob.npy     (N,): clean_prob of every training sample, in the training order
net1.safetensors   plain state_dict of each final net (net1, net2 for two-net methods; .pt without the
                   safetensors package) and model.json to rebuild them: cdmix.load_model(<this folder>),
                   cdmix predict <this folder> IMAGES...
encoder.safetensors  `cdmix pretrain` runs: the encoder (plain state dict, the model's own names, no classifier
                   and no projection head; encoder.pt without safetensors) and encoder.json, its provenance
                   (model, width, channels, sizes, normalisation mean/std, epochs, sha256, data fingerprint).
                   Their label_issues.csv ranks by kNN label disagreement in the encoder's feature space:
                   issue_score = the share of a sample's nearest training neighbours whose given label differs,
                   each weighted by exp(cosine / knn_temperature); clean_prob = 1 - that share, predicted = the
                   neighbours' weighted majority class (scored = knn-encoder).
                   Train from it: cdmix train --pretrained <this folder>
pretrained.json    runs started with --pretrained: the weights file, its sha256 and, for a cdmix encoder, its
                   provenance
issues.html        the review page of the top suspects with thumbnails, when made (cdmix issues --html)
report.html        the one-page report, when made (cdmix report <this folder>)
report-*.png       the report's plots as images (also embedded in report.html)
.cdmix.lock        held while a train or resume runs in this folder (names the process)
"""


def atomic_torch_save(obj: Any, *paths: Path) -> None:
    """Serialise ``obj`` once and write it atomically to every path (checkpoint.pt and best.pt).

    numpy arrays and scalars in ``obj`` are stored as tagged byte tensors (``to_checkpoint_data``), so
    the file loads with ``weights_only=True`` and ``load_checkpoint`` gives back the very same arrays.
    """
    buffer = io.BytesIO()
    torch.save(to_checkpoint_data(obj), buffer)
    for path in paths:
        atomic_write(path, buffer.getvalue())


_NDARRAY = "__cdmix_ndarray__"
_PLAIN = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def to_checkpoint_data(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with every numpy array or scalar replaced by ``{_NDARRAY: uint8 bytes, "dtype", "shape",
    "scalar"}``; containers are copied only where something changed (state dicts keep their class and
    metadata). Anything else that is not a tensor, number, string or plain container raises TypeError."""
    if isinstance(obj, _PLAIN) and not isinstance(obj, np.generic):  # np.float64 is a float subclass
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"{where}: a numpy array of {arr.dtype} cannot be stored in a checkpoint")
        data = torch.from_numpy(np.frombuffer(arr.tobytes(), dtype=np.uint8).copy())
        return {_NDARRAY: data, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, dict):
        items = {k: to_checkpoint_data(v, f"{where}.{k}") for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        return items
    if isinstance(obj, (list, tuple)):
        items = [to_checkpoint_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (tensors, numbers, "
                    "strings, lists, tuples, dicts and numpy arrays only)")


def from_checkpoint_data(obj: Any) -> Any:
    """Inverse of ``to_checkpoint_data``: tagged byte tensors become numpy arrays (or scalars) again."""
    if isinstance(obj, dict):
        if _NDARRAY in obj:
            dtype = np.dtype(str(obj["dtype"]))
            if dtype.kind not in "biufc":
                raise ValueError(f"array of dtype {dtype}")
            raw = obj[_NDARRAY].numpy().tobytes()
            arr = np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in obj["shape"]]).copy()
            return arr[()] if obj.get("scalar") else arr
        items = {k: from_checkpoint_data(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        return items
    if isinstance(obj, (list, tuple)):
        items = [from_checkpoint_data(v) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    return obj


def default_run_dir(dataset: str, method: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{dataset}-{method}-{stamp}"


def is_own_file(name: str) -> bool:
    """Whether a file of this name in a run folder is one the run (or its report) writes."""
    return name in OWN_FILES or name == LOCK or bool(_OWN_PATTERN.fullmatch(name) or _TEMP_PATTERN.fullmatch(name))


def is_run_folder(path: Path) -> bool:
    """A folder whose config.json is a cdmix run config (a JSON object naming a dataset and a method)."""
    try:
        values = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(values, dict) and {"dataset", "method", "seed"} <= set(values)


def refuse_run_file(path: str | Path, flag: str = "--out") -> None:
    """Raise ``UserError`` when an output ``path`` would replace a run folder's own file (its
    summary, checkpoints, ...): a command's output must never break the run it reads."""
    path = Path(path)
    if path.name in OWN_FILES and is_run_folder(path.parent):
        raise UserError(f"{flag} {path} is the run's own {path.name}; writing there would break the run, "
                        "choose another file name")


def _check_out_folder(path: Path, overwrite: bool) -> None:
    """Refuse a --out folder that cdmix may not use: not a folder, a run (without ``overwrite``), or
    anything else that is not empty (cdmix never deletes what it did not write, --overwrite included)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    if not path.is_dir():
        return
    leftovers = [p for p in path.iterdir() if p.name not in (README, LOCK) and not _TEMP_PATTERN.fullmatch(p.name)]
    if not leftovers:
        return
    if not is_run_folder(path):
        raise UserError(f"--out {path} is not empty and is not a cdmix run folder; choose a new or empty "
                        "folder (cdmix never replaces files it did not write)")
    if not overwrite:
        raise UserError(f"--out {path} already holds a run; use `cdmix resume {path}` to continue it, "
                        "another --out, or --overwrite to replace it")


def prepare_run_dir(path: Path, overwrite: bool) -> "RunLock":
    """Create (or, with ``overwrite``, clear) a run folder and lock it; returns the held ``RunLock``.

    ``overwrite`` replaces only a folder that is a cdmix run, and removes only the run's own files
    (``is_own_file``): anything else in the folder is kept. A folder that is neither empty nor a run
    is refused.
    """
    path = Path(path)
    _check_out_folder(path, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {path}: {exc.strerror or exc}") from None
    lock = RunLock(path)
    try:
        _check_out_folder(path, overwrite)  # again, now that no other cdmix process can change it
        kept = 0
        for child in sorted(path.iterdir()):
            if child.name == LOCK:
                continue
            if is_own_file(child.name) and (child.is_symlink() or child.is_file()):
                child.unlink()
            else:
                kept += 1
        if kept:
            logger.warning(f"--overwrite kept {kept} file(s) in {path} that cdmix did not write")
        atomic_write(path / README, README_TEXT)
    except BaseException:
        lock.release()
        raise
    return lock


def remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the atomic writer's temporary files a kill left in the run folder (call under the lock)."""
    for child in Path(run_dir).iterdir():
        if _TEMP_PATTERN.fullmatch(child.name) and child.is_file() and not child.is_symlink():
            child.unlink(missing_ok=True)


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.cdmix.lock``, held until ``release`` (or the process ends:
    a killed run frees it). The file names the holder (pid, host, start time) for the error of the
    process that cannot take it."""

    def __init__(self, run_dir: Path):
        import fcntl  # POSIX only, so imported where it is used
        import socket

        self.path = Path(run_dir) / LOCK
        try:
            self.file: Any = open(self.path, "a+b")
        except OSError as exc:
            raise UserError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            self._take(fcntl)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read(300).decode("utf-8", "replace").strip() or "a process that has not said which"
            self.file.close()
            raise UserError(f"{run_dir} is in use by another cdmix run ({holder}); wait for it to finish, "
                            "or stop it, before training or resuming in this folder") from None
        except OSError as exc:  # a file system without locks (some network mounts): go on unlocked
            logger.warning(f"cannot lock {self.path} ({exc.strerror or exc}); make sure no other run uses "
                           f"{run_dir} at the same time")
        self.file.seek(0)
        self.file.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode())
        self.file.flush()

    def _take(self, fcntl: Any, grace: float = 10.0) -> None:
        """The lock, waiting up to ``grace`` seconds: a run killed a moment ago may still be exiting
        (the kernel frees its lock only when its last process is gone)."""
        deadline = time.monotonic() + grace
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def release(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()  # closing the file releases the lock
        self.file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def load_checkpoint(path: Path, map_location: str = "cpu", config: Any = None) -> dict[str, Any]:
    """A checkpoint's state, read safely (``weights_only=True``: tensors and plain data only).

    ``config``: the run's Config; a checkpoint written by another method or model is refused (so an
    edited config.json never loads one method's weights into another).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name} (did the first epoch finish?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors and plain data, so it was not loaded (loading "
                        "it could run code): it is not a checkpoint of this cdmix version") from None
    except Exception as exc:  # torch raises many kinds for a damaged file
        other = BEST if path.name == CHECKPOINT else CHECKPOINT
        raise UserError(f"checkpoint {path} is damaged or truncated ({type(exc).__name__}) and cannot be read; "
                        f"the run's {other} may still be intact") from None
    if not isinstance(state, dict) or "epoch" not in state or "method" not in state:
        raise UserError(f"checkpoint {path} is not a cdmix checkpoint")
    try:
        state = from_checkpoint_data(state)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc})") from None
    saved = state.get("config")
    if config is not None and isinstance(saved, dict):
        for key in ("method", "model", "width"):
            if key in saved and saved[key] != getattr(config, key):
                raise UserError(f"{path} was written by a run with {key} {saved[key]!r}, but the run's {CONFIG} "
                                f"says {getattr(config, key)!r}; was {CONFIG} edited? Put back {key} = "
                                f"{saved[key]!r}")
    return state


def restore_method(method: Any, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's method state into ``method``; a checkpoint that does not fit the method's
    nets (another model, width or class count) raises ``UserError``."""
    try:
        method.load_state_dict(state["method"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(f"checkpoint {path} does not fit this run's model ({type(exc).__name__}: {first}); "
                        f"was {CONFIG} or the data changed since it was written?") from None


def on_this_machine(config: Any) -> Any:
    """The run's config with its device replaced by one this machine has: a run trained on a GPU is
    evaluated or resumed on the CPU (bf16 autocast off there), with a warning."""
    device = config.device
    if not device.startswith("cuda"):
        return config
    if not torch.cuda.is_available():
        logger.warning(f"this run was trained on {device}, which this machine does not have; using the CPU "
                       "(slower, and a resumed run will not repeat the GPU's numbers bit for bit)")
        return config.replace(device="cpu", amp=False)
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        logger.warning(f"this run was trained on {device}, which this machine does not have; using cuda:0")
        return config.replace(device="cuda:0")
    return config


# The metrics.csv columns the engine writes itself, named once (a method adds its own columns, named in
# its module: ``labeled_net1``, ``frac_clean``, ...). Epochs are 1-based.
EPOCH = "epoch"
LR = "lr"
BETA1 = "beta1"  # Adam's beta1 (Jo-SRC's plan drops it); only with --optimizer adam
TRAIN_LOSS = "train_loss"
TEST_ACC = "test_acc"
VAL_ACC = "val_acc"
SECONDS_TEST = "seconds_test"  # wall-clock seconds of the evaluation
SECONDS = "seconds"  # wall-clock seconds of the whole epoch
COLLAPSE = "collapse"  # 1: the selection accuracy dropped by --collapse-drop points below the best
ROLLBACK = "rollback"  # 1: the best checkpoint was restored (--on-collapse rollback)
SELECTION_DROP = "selection_drop"  # 1: the selected (clean) set shrank to under half


def _clean_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def _as_float(value: Any) -> float:
    """A metrics cell as a float: a number, a tensor, or the text of metrics.csv ("" or junk: NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, str):
        try:
            return float(value) if value != "" else math.nan
        except ValueError:
            return math.nan
    return math.nan if value is None else float(value)


def typed_rows(cells: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Rows of metrics cells as floats, every row holding every column (NaN where a row has none)."""
    columns = _columns(cells)
    return [{k: _as_float(row.get(k, "")) for k in columns} for row in cells]


def _columns(cells: list[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in cells:
        columns.update(dict.fromkeys(row))
    return list(columns)


class MetricsLog:
    """The per-epoch metrics of a run: metrics.csv (one row per epoch, columns = union of the keys
    seen, in the order first seen) plus TensorBoard scalars; or, without a run folder
    (``run_dir`` None), the rows in memory only.

    ``rows``: typed rows (floats, NaN where a row has no value), the same whether they were logged
    in this process or read back from metrics.csv when a run resumes.
    """

    def __init__(self, run_dir: Path | None, start_epoch: int = 0, tensorboard: bool = True):
        self.path = None if run_dir is None else Path(run_dir) / METRICS
        # The cells as written: the file's own text for rows read back, so a resumed run rewrites
        # them byte for byte.
        self.cells: list[dict[str, Any]] = []
        if start_epoch > 0 and self.path is not None:
            # ``epoch`` is 1-based: rows 1..start_epoch are the completed epochs
            rows = _metrics_rows(self.path) if self.path.is_file() else []
            self.cells = [row for row in rows if int(row[EPOCH]) <= start_epoch]
            if len(self.cells) < start_epoch:
                # Without the history the summary's best epoch and accuracy would be wrong.
                raise UserError(f"{self.path} holds {len(self.cells)} of the {start_epoch} completed epoch(s); "
                                f"the run's history is lost, so its best epoch cannot be known. Put back "
                                f"{METRICS} to resume (cdmix evaluate still works on the checkpoints)")
        self.writer = None
        if tensorboard and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch + 1)

    @property
    def rows(self) -> list[dict[str, float]]:
        return typed_rows(self.cells)

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean_value(v) for k, v in row.items()}
        self.cells.append(row)
        if self.path is None:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_columns(self.cells), restval="")
        writer.writeheader()
        writer.writerows(self.cells)
        atomic_write(self.path, out.getvalue())
        if self.writer is not None:
            epoch = int(row[EPOCH])
            for key, value in row.items():
                if key != EPOCH and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            self.writer.flush()

    def log_division(self, epoch: int, division: dict[str, Any] | None) -> None:
        """TensorBoard histograms of the division's per-sample losses and clean probabilities
        (``loss_net*``, ``clean_prob*``) and its GMM means as scalars, so the live view shows the split.

        ``division``: the method's ``last_division`` (arrays by name); nothing is written for None.
        """
        if self.writer is None or division is None:
            return
        for key, value in division.items():
            values = np.asarray(value, dtype=np.float64).reshape(-1)
            if re.fullmatch(r"(loss|clean_prob)(_net\d+)?", key):
                values = values[np.isfinite(values)]
                if len(values):
                    self.writer.add_histogram(f"division/{key}", values, epoch)
            elif key.startswith("gmm_means"):
                for k, mean in enumerate(values):
                    self.writer.add_scalar(f"division/{key}_{k}", mean, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _metrics_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv as text; raises ``UserError`` for a missing or damaged file (not
    UTF-8 CSV, no ``epoch`` column, an epoch that is not a whole number)."""
    if not path.is_file():
        raise UserError(f"{path.parent} has no {METRICS}; is it a cdmix run folder?")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [{k: ("" if v is None else v) for k, v in row.items() if isinstance(k, str)} for row in reader]
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}); the file is damaged") from None
    if EPOCH not in header:
        raise UserError(f"{path} has no epoch column; the file is damaged")
    for line, row in enumerate(rows, start=2):
        try:
            int(row[EPOCH])
        except ValueError:
            raise UserError(f"{path} line {line}: epoch {row[EPOCH]!r} is not a whole number; "
                            "the file is damaged") from None
    return rows


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as typed rows (``MetricsLog.rows``): floats, NaN for empty or unreadable cells."""
    return typed_rows(_metrics_rows(Path(run_dir) / METRICS))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise UserError(f"{run_dir} has no {SUMMARY}; has the run finished an epoch?")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text (not UTF-8); the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} does not hold a cdmix summary (a JSON object)")
    return summary


def read_labels(run_dir: Path) -> dict[str, np.ndarray]:
    """The arrays of a run's labels.npz (``train_labels``, ...); raises ``UserError`` when the file is
    missing, damaged or truncated."""
    path = Path(run_dir) / LABELS
    if not path.is_file():
        raise UserError(f"{run_dir} has no {LABELS}; without it the run's data cannot be checked")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile, numpy and OS errors for a damaged file
        raise UserError(f"{path} is damaged or truncated ({type(exc).__name__}); it cannot be read") from None
    if "train_labels" not in arrays:
        raise UserError(f"{path} has no train_labels; the file is damaged")
    return arrays
