"""The run folder: config, metrics, TensorBoard events, checkpoints, summary.

Every write is atomic (temp file + rename), so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
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

README_TEXT = """\
This folder is one cdmix run.

config.json        every setting of the run, resolved (what actually ran)
metrics.csv        one row per epoch: lr, losses, test accuracy, selection metrics, seconds per phase
events.out.tfevents.*  the same metrics for TensorBoard (tensorboard --logdir <this folder>)
checkpoint.pt      everything needed to resume: models, optimizers, RNG states, epoch (cdmix resume <this folder>)
best.pt            the checkpoint of the epoch with the best test (or validation) accuracy
summary.json       test_acc_best, test_acc_last (percent), epochs_done, noise rates, seconds, device
labels.npz         the noisy labels training used and, where known, the true labels
division.npz       per-sample losses, clean probabilities and GMM parameters of the last division
label_issues.csv   every training sample ranked by how likely its label is wrong (cdmix issues <this folder>)
report.html        the one-page report, when made (cdmix report <this folder>)
report-*.png       the report's plots as images (also embedded in report.html)
"""


def atomic_torch_save(obj: Any, *paths: Path) -> None:
    """Serialise ``obj`` once and write it atomically to every path (checkpoint.pt and best.pt)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    for path in paths:
        atomic_write(path, buffer.getvalue())


def default_run_dir(dataset: str, method: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{dataset}-{method}-{stamp}"


def prepare_run_dir(path: Path, overwrite: bool) -> None:
    """Create the folder; refuse one that holds a different run unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        existing = path / CONFIG
        if not overwrite:
            if existing.is_file():
                raise UserError(
                    f"--out {path} already holds a run; use `cdmix resume {path}` to continue it, "
                    "another --out, or --overwrite to replace it"
                )
            raise UserError(f"--out {path} is not empty; choose another folder or pass --overwrite")
        for child in path.iterdir():
            if child.is_file() or child.is_symlink():
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / README, README_TEXT)


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; nothing to resume (did the first epoch finish?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
                        f"start the run again with --overwrite") from None
    if not isinstance(state, dict) or "epoch" not in state or "method" not in state:
        raise UserError(f"checkpoint {path} is not a cdmix checkpoint")
    return state


def _clean_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


class MetricsLog:
    """metrics.csv (one row per epoch, columns = union of keys seen) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, start_epoch: int, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS
        self.rows: list[dict[str, Any]] = []
        if start_epoch > 0 and self.path.is_file():
            with self.path.open(newline="") as fh:
                self.rows = [row for row in csv.DictReader(fh) if int(row["epoch"]) < start_epoch]
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch)

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean_value(v) for k, v in row.items()}
        self.rows.append(row)
        columns: list[str] = []
        for r in self.rows:
            columns.extend(k for k in r if k not in columns)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, out.getvalue())
        if self.writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
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


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as a list of rows with numeric values (empty cells become NaN)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS}; is it a cdmix run folder?")
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value) if value != "" else float("nan")
                except ValueError:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise UserError(f"{run_dir} has no {SUMMARY}; has the run finished an epoch?")
    return json.loads(path.read_text())
