"""A run folder as the report reads it (``RunData``), and the numbers and texts drawn from its files."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdmix import runs
from cdmix.errors import UserError


@dataclass
class RunData:
    """Everything a report draws from one run folder; optional parts are None when absent."""

    path: Path
    name: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    config: dict[str, Any] | None = None
    division: dict[str, np.ndarray] | None = None
    labels: dict[str, np.ndarray] | None = None
    issues: Any = None  # cdmix.issues.LabelIssues
    notes: list[str] = field(default_factory=list)  # what could not be read, said on the page

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.metrics:
            cols.extend(k for k in row if k not in cols)
        return cols

    def matching(self, pattern: str) -> list[str]:
        """The metrics columns whose whole name matches ``pattern`` and that hold at least one number."""
        return [c for c in self.columns if re.fullmatch(pattern, c) and has_data(self.metrics, c)]

    @property
    def warmup_epochs(self) -> int:
        """Warm-up epochs of the run (0 for the standard method or when unknown)."""
        config = self.config or {}
        if config.get("method", self.summary.get("method")) == "standard":
            return 0
        try:  # summary.json: the warm-up that ran (--warmup auto decides it during the run)
            return max(0, int(self.summary.get("warmup_epochs") or config.get("warmup") or 0))
        except (TypeError, ValueError):
            return 0


def run_folders(run_dirs: Sequence[str | Path] | str | Path) -> list[Path]:
    """The given run folder(s) as paths; raises UserError for none, or one that is missing or not a folder."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("give at least one run folder")
    paths = [Path(p) for p in run_dirs]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist")
        if not path.is_dir():
            raise UserError(f"{path} is not a folder; give a cdmix run folder")
    return paths


def read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = runs.read_summary(path)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / runs.SUMMARY} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path / runs.SUMMARY} does not hold a cdmix summary")
    return summary


def _read_npz(path: Path, notes: list[str]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # a damaged file should not stop the rest of the report
        notes.append(f"{path.name} could not be read ({type(exc).__name__}); the plots drawn from it are left out")
        return None


def load_run(run_dir: str | Path, name: str | None = None, curves_only: bool = False) -> RunData:
    """Read a run folder for the report; raises UserError when it is not a cdmix run folder.
    ``curves_only``: summary, metrics and config only (``compare --plot``), not the division, labels
    and label issues."""
    path = run_folders(run_dir)[0]
    summary = read_summary(path)
    metrics = runs.read_metrics(path)
    if not metrics:
        raise UserError(f"{path / runs.METRICS} has no epochs yet; nothing to report")
    notes: list[str] = []
    config = None
    if (path / runs.CONFIG).is_file():
        try:
            config = json.loads((path / runs.CONFIG).read_text())
        except json.JSONDecodeError:
            notes.append(f"{runs.CONFIG} is not valid JSON; the config table is left out")
    else:
        notes.append(f"no {runs.CONFIG} in the run folder; the config table is left out")
    if curves_only:
        return RunData(path, name or path.resolve().name, summary, metrics, config, notes=notes)
    division = _read_npz(path / runs.DIVISION, notes)
    labels = _read_npz(path / runs.LABELS, notes)
    issues = None
    if (path / runs.LABEL_ISSUES).is_file():
        from cdmix.issues import rank_label_issues

        try:
            issues = rank_label_issues(path)
        except (KeyError, ValueError) as exc:
            notes.append(f"{runs.LABEL_ISSUES} could not be read ({type(exc).__name__}: {exc})")
    return RunData(path, name or path.resolve().name, summary, metrics, config, division, labels, issues, notes)


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short unique names: the folder name, with its parent when two runs share a folder name."""
    paths = [Path(p).resolve() for p in run_dirs]
    short = [p.name for p in paths]
    names = [f"{p.parent.name}/{n}" if short.count(n) > 1 else n for p, n in zip(paths, short)]
    return [f"{n}#{names[:i + 1].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# --------------------------------------------------------------------------- numbers from metrics.csv
def num(value: Any) -> float:
    """``value`` as a float; NaN when it is empty or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    """One metrics column as float64 (NaN where empty or absent)."""
    return np.array([num(row.get(key)) for row in rows], dtype=np.float64)


def has_data(rows: list[dict[str, Any]], key: str) -> bool:
    return bool(np.isfinite(column(rows, key)).any())


def epochs_axis(rows: list[dict[str, Any]]) -> np.ndarray:
    """1-based epoch numbers (metrics.csv's ``epoch`` column), as the training log prints them."""
    epochs = column(rows, "epoch")
    if not np.isfinite(epochs).all():
        return np.arange(1, len(rows) + 1, dtype=np.float64)
    return epochs


def best_last(rows: list[dict[str, Any]], key: str = "test_acc") -> tuple[int, int] | None:
    """Row positions of the best and of the last finite value of a column (None when none)."""
    values = column(rows, key)
    finite = np.flatnonzero(np.isfinite(values))
    if not len(finite):
        return None
    return int(finite[np.argmax(values[finite])]), int(finite[-1])


# --------------------------------------------------------------------------- numbers as text
def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 90:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def selected_test_accuracy(summary: dict[str, Any]) -> float | None:
    """Test accuracy at the epoch a validation set chose (best.pt), the figure comparable with a paper's
    that selected on validation (Clothing1M); None when the test set itself chose, or none was scored."""
    if summary.get("selected_by") != "val_acc":
        return None
    value = (summary.get("test_at_selected_epoch") or {}).get("test_acc")
    return None if value is None or not math.isfinite(num(value)) else float(value)


def pct(value: Any) -> str:
    """A fraction as a percentage ('-' when unknown)."""
    v = num(value)
    return f"{100 * v:.1f}%" if math.isfinite(v) else "-"


def acc(value: Any) -> str:
    """An accuracy in percent, two decimals ('-' when unknown)."""
    v = num(value)
    return f"{v:.2f}" if math.isfinite(v) else "-"
