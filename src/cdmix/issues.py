"""Ranked suspected label errors: every training sample, most likely mislabeled first.

The score is 1 - clean_prob, where clean_prob is the probability (averaged over a method's nets,
from its last division) that the given label is right.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdmix.errors import UserError
from cdmix.atomic import atomic_write
from cdmix.runs import LABEL_ISSUES

COLUMNS = ("rank", "index", "given_label", "predicted_label", "clean_prob", "issue_score", "true_label")


@dataclass
class LabelIssues:
    """Arrays of equal length N, sorted by ``issue_score`` descending (most suspicious first)."""

    index: np.ndarray  # int64 position in the dataset's training order
    given_label: np.ndarray
    predicted_label: np.ndarray
    clean_prob: np.ndarray
    issue_score: np.ndarray  # 1 - clean_prob
    true_label: np.ndarray | None

    def __len__(self) -> int:
        return len(self.index)


def rank_order(clean_prob: np.ndarray) -> np.ndarray:
    """Positions sorted from most to least suspicious; ties keep dataset order (stable)."""
    return np.argsort(np.asarray(clean_prob, dtype=np.float64), kind="stable")


def write_label_issues(path: Path, index, given_label, predicted_label, clean_prob, true_label=None) -> None:
    order = rank_order(clean_prob)
    out = io.StringIO()
    writer = csv.writer(out)
    columns = COLUMNS if true_label is not None else COLUMNS[:-1]
    writer.writerow(columns)
    for rank, pos in enumerate(order, start=1):
        prob = float(clean_prob[pos])
        row = [rank, int(index[pos]), int(given_label[pos]), int(predicted_label[pos]),
               f"{prob:.6f}", f"{1.0 - prob:.6f}"]
        if true_label is not None:
            row.append(int(true_label[pos]))
        writer.writerow(row)
    atomic_write(Path(path), out.getvalue())


def rank_label_issues(run_dir: str | Path, top: int | None = None) -> LabelIssues:
    """Read a run's ranked suspected label errors (most suspicious first) as arrays.

    run_dir: a finished (or interrupted and resumed) cdmix run folder holding label_issues.csv.
    top: keep only the first ``top`` rows.
    """
    path = Path(run_dir) / LABEL_ISSUES
    if not path.is_file():
        raise UserError(f"{run_dir} has no {LABEL_ISSUES}; it is written when a run ends")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = rows[:top] if top is not None else rows
    has_true = bool(rows) and "true_label" in rows[0]

    def column(name, dtype):
        return np.asarray([row[name] for row in rows], dtype=dtype)

    return LabelIssues(
        index=column("index", np.int64),
        given_label=column("given_label", np.int64),
        predicted_label=column("predicted_label", np.int64),
        clean_prob=column("clean_prob", np.float64),
        issue_score=column("issue_score", np.float64),
        true_label=column("true_label", np.int64) if has_true else None,
    )
