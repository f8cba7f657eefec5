"""See a run at a glance: a one-page report (``cdmix report``) and a side-by-side table (``cdmix compare``).

``make_report(run_dirs, out=None)`` writes one self-contained HTML page: every plot is embedded as
a base64 PNG, so the page opens offline and can be sent as a single file. The same PNGs are also
written beside the page, named ``<page stem>-<plot>.png`` (``report-accuracy.png``, ...).

Where the page goes:
  * one run: ``RUN_DIR/report.html`` (PNGs ``RUN_DIR/report-*.png``);
  * several runs: ``./report.html`` in the current folder unless ``out`` is given. The page then has
    one accuracy plot with a line per run, the comparison table, and a section per run with its own
    plots (PNGs ``report-<run>-*.png``).
``out`` may be a file or an existing folder (the page is then ``out/report.html``). An existing page
and its PNGs are replaced.

Plots (each is left out, with the reason on the page, when the run has no data for it):
  accuracy   test accuracy per epoch: ensemble and each net, best and last marked
  selection  clean-selection precision / recall / ROC-AUC (when true labels are known), labeled-set size
  loss_hist  per-sample loss histogram of the last division (split truly clean / noisy when known)
             with the fitted two-component GMM drawn over it (division.npz)
  training   learning rate, lambda_u_eff and the loss terms per epoch
  seconds    seconds per phase per epoch (stacked bars)
  confusion  given vs predicted label of the most suspicious samples (label_issues.csv)

``compare_runs(run_dirs, markdown=False)`` returns the summaries side by side as a plain-text (or
Markdown) table and flags (``!``) every run whose best test accuracy is more than 2 points above
its last one: such a run lost accuracy after its best epoch (a late collapse, or over-fitting to
the noisy labels).

Matplotlib is used through its Agg canvas directly (no pyplot), so making a report never changes
the backend of an interactive session.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdmix import runs
from cdmix.errors import UserError

DROP_FLAG_POINTS = 2.0  # compare/report flag runs whose best - last test accuracy exceeds this
DEFAULT_PAGE = "report.html"
MAX_TOP = 200  # the confusion matrix uses the min(10%, 200) most suspicious samples by default

PLOT_TITLES = {
    "accuracy": "Test accuracy per epoch",
    "selection": "Clean selection per epoch",
    "loss_hist": "Per-sample loss of the last division",
    "training": "Learning rate, λu_eff and loss terms",
    "seconds": "Seconds per phase",
    "confusion": "Given vs predicted label of the most suspicious samples",
}


# --------------------------------------------------------------------------- loading a run folder
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


def _check_run_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give a cdmix run folder")
    return path


def _read_summary(path: Path) -> dict[str, Any]:
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


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read a run folder for the report; raises UserError when it is not a cdmix run folder."""
    path = _check_run_dir(run_dir)
    summary = _read_summary(path)
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
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}#{seen[name]}"
        out.append(name)
    return out


# --------------------------------------------------------------------------- numbers from metrics.csv
def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    """One metrics column as float64 (NaN where empty or absent)."""
    return np.array([_num(row.get(key)) for row in rows], dtype=np.float64)


def has_data(rows: list[dict[str, Any]], key: str) -> bool:
    return bool(np.isfinite(column(rows, key)).any())


def epochs_axis(rows: list[dict[str, Any]]) -> np.ndarray:
    """1-based epoch numbers, as the training log prints them."""
    epochs = column(rows, "epoch")
    if not np.isfinite(epochs).all():
        return np.arange(1, len(rows) + 1, dtype=np.float64)
    return epochs + 1


def _matching(columns: list[str], pattern: str, rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in columns if re.fullmatch(pattern, c) and has_data(rows, c)]


def _net_label(key: str) -> str:
    found = re.search(r"net(\d+)$", key)
    return f"net{found.group(1)}" if found else ""


def _net_style(key: str) -> str:
    found = re.search(r"net(\d+)$", key)
    return ("-", "--", ":", "-.")[(int(found.group(1)) - 1) % 4] if found else "-"


def best_last(rows: list[dict[str, Any]], key: str = "test_acc") -> tuple[int, int] | None:
    """Row positions of the best and of the last finite value of a column (None when none)."""
    values = column(rows, key)
    finite = np.flatnonzero(np.isfinite(values))
    if not len(finite):
        return None
    return int(finite[np.argmax(values[finite])]), int(finite[-1])


# --------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def _empty_panel(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="0.35",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")


def _warmup_epochs(run: RunData) -> int:
    config = run.config or {}
    if config.get("method", run.summary.get("method")) == "standard":
        return 0
    try:
        return max(0, int(config.get("warmup") or 0))
    except (TypeError, ValueError):
        return 0


def _shade_warmup(ax, run: RunData) -> None:
    warmup = _warmup_epochs(run)
    if warmup > 0:
        ax.axvspan(0.5, warmup + 0.5, color="0.6", alpha=0.15, lw=0, label=f"warm-up ({warmup} epoch{'s' if warmup > 1 else ''})")


@dataclass
class Plot:
    """One plot of the page: a PNG, or the reason it is left out."""

    key: str
    title: str
    png: bytes | None = None
    caption: str = ""
    missing: str = ""  # why it is not drawn
    file: str = ""  # file name beside the page


def plot_accuracy(run: RunData) -> Plot:
    plot = Plot("accuracy", PLOT_TITLES["accuracy"])
    rows = run.metrics
    marks = best_last(rows)
    if marks is None:
        plot.missing = "metrics.csv has no test_acc values"
        return plot
    x = epochs_axis(rows)
    acc = column(rows, "test_acc")
    fig = _figure(11, 4.6)
    ax = fig.add_subplot()
    _shade_warmup(ax, run)
    net_keys = _matching(run.columns, r"test_acc_net\d+", rows)
    for i, key in enumerate(net_keys):
        ax.plot(x, column(rows, key), color=f"C{i + 1}", lw=1.2, ls="--", marker=".", ms=4,
                label=f"{_net_label(key)} alone")
    ax.plot(x, acc, color="C0", lw=2.4, marker="o", ms=4,
            label="ensemble of the nets" if net_keys else "test accuracy")
    if has_data(rows, "val_acc"):
        ax.plot(x, column(rows, "val_acc"), color="C4", lw=1.5, ls=":", marker=".", label="validation accuracy")
    best, last = marks
    ax.scatter([x[best]], [acc[best]], marker="*", s=320, color="gold", edgecolor="black", zorder=6,
               label=f"best {acc[best]:.2f}% (epoch {x[best]:.0f})")
    ax.scatter([x[last]], [acc[last]], marker="o", s=140, facecolor="none", edgecolor="red", lw=2, zorder=7,
               label=f"last {acc[last]:.2f}% (epoch {x[last]:.0f})")
    collapse = column(rows, "collapse") > 0
    if collapse.any():
        ax.scatter(x[collapse], acc[collapse], marker="X", s=90, color="red", zorder=8, label="collapse warning")
    _integer_epochs(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{run.name}: test accuracy, best {acc[best]:.2f}%, last {acc[last]:.2f}% "
                 f"(best − last {acc[best] - acc[last]:.2f} points)")
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    plot.png = _png_bytes(fig)
    plot.caption = ("Thick line: the accuracy the run reports (ensemble of its nets); dashed: each net alone. "
                    "Star: best epoch; red circle: last epoch"
                    + ("; grey band: warm-up." if _warmup_epochs(run) else "."))
    return plot


def plot_accuracy_runs(runs_data: list[RunData]) -> Plot:
    from matplotlib.lines import Line2D

    plot = Plot("accuracy", "Test accuracy per epoch, one line per run")
    fig = _figure(11, 5)
    ax = fig.add_subplot()
    drawn = 0
    for i, run in enumerate(runs_data):
        marks = best_last(run.metrics)
        if marks is None:
            continue
        x, acc = epochs_axis(run.metrics), column(run.metrics, "test_acc")
        best, last = marks
        color = f"C{i % 10}"
        ax.plot(x, acc, color=color, lw=1.8, marker="o", ms=3,
                label=f"{run.name}: best {acc[best]:.2f}% (ep {x[best]:.0f}), last {acc[last]:.2f}%")
        ax.scatter([x[best]], [acc[best]], marker="*", s=260, color=color, edgecolor="black", zorder=6)
        ax.scatter([x[last]], [acc[last]], marker="o", s=120, facecolor="none", edgecolor=color, lw=2, zorder=7)
        drawn += 1
    if not drawn:
        plot.missing = "no run has test_acc values"
        return plot
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="*", ms=14, color="0.6", markeredgecolor="black"),
                Line2D([], [], ls="", marker="o", ms=10, markerfacecolor="none", markeredgecolor="0.3", mew=2)]
    labels += ["best epoch", "last epoch"]
    ax.legend(handles, labels, loc="lower right", fontsize=8.5, framealpha=0.9)
    _integer_epochs(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy (ensemble of each run's nets)")
    plot.png = _png_bytes(fig)
    plot.caption = "One line per run; star: its best epoch, open circle: its last epoch."
    return plot


def plot_selection(run: RunData) -> Plot:
    plot = Plot("selection", PLOT_TITLES["selection"])
    rows, cols = run.metrics, run.columns
    metric_keys = {m: _matching(cols, rf"sel_{m}(_net\d+)?", rows) for m in ("precision", "recall", "auc")}
    labeled_keys = _matching(cols, r"labeled(_net\d+)?", rows)
    has_sel = any(metric_keys.values())
    if not has_sel and not labeled_keys:
        method = run.summary.get("method", "this method")
        plot.missing = (f"metrics.csv has no selection columns (sel_*, labeled_*): {method} logged no "
                        "clean/noisy division"
                        + (" (the run may have ended inside warm-up)" if _warmup_epochs(run) else ""))
        return plot
    x = epochs_axis(rows)
    fig = _figure(11, 4.2)
    ax_sel, ax_lab = fig.subplots(1, 2)
    colors = {"precision": "C0", "recall": "C1", "auc": "C2"}
    names = {"precision": "precision", "recall": "recall", "auc": "ROC-AUC"}
    if has_sel:
        for metric, keys in metric_keys.items():
            for key in keys:
                net = _net_label(key)
                ax_sel.plot(x, column(rows, key), color=colors[metric], ls=_net_style(key), marker="o", ms=3,
                            label=f"{names[metric]} {net}".strip())
        _shade_warmup(ax_sel, run)
        ax_sel.set_ylim(-0.02, 1.02)
        ax_sel.set_ylabel("fraction")
        ax_sel.set_title("selected-as-clean vs truly clean")
        ax_sel.legend(fontsize=8, loc="best", ncol=2, framealpha=0.9)
        _integer_epochs(ax_sel)
    else:
        _empty_panel(ax_sel, "true labels unknown:\nselection precision, recall and ROC-AUC\nneed them")
    if labeled_keys:
        for i, key in enumerate(labeled_keys):
            ax_lab.plot(x, column(rows, key), color=f"C{i + 3}", ls=_net_style(key), marker="o", ms=3,
                        label=f"labeled set {_net_label(key)}".strip())
        n_train = _num(run.summary.get("num_train"))
        actual = _num(run.summary.get("noise_rate_actual_train", run.summary.get("noise_rate_actual")))
        if math.isfinite(n_train) and math.isfinite(actual):
            clean = n_train * (1 - actual)
            ax_lab.axhline(clean, color="green", ls=":", lw=1.5, label=f"truly clean samples ({clean:.0f})")
        elif math.isfinite(n_train):
            ax_lab.axhline(n_train, color="0.5", ls=":", lw=1.2, label=f"all training samples ({n_train:.0f})")
        _shade_warmup(ax_lab, run)
        ax_lab.set_ylim(bottom=0)
        ax_lab.set_ylabel("samples")
        ax_lab.set_title("labeled set (clean probability > threshold)")
        ax_lab.legend(fontsize=8, loc="best", framealpha=0.9)
        _integer_epochs(ax_lab)
    else:
        _empty_panel(ax_lab, "no labeled-set size in metrics.csv")
    plot.png = _png_bytes(fig)
    plot.caption = ("Precision: share of the selected (labeled) samples whose label is truly clean; recall: share "
                    "of the truly clean samples selected; ROC-AUC of the clean probability. Solid: net1, dashed: net2. "
                    "Empty before the first division (warm-up).")
    if not has_sel:
        plot.caption += " The run's true labels are unknown, so only the labeled-set size is drawn."
    return plot


def _normal_pdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def _gmm_params(division: dict[str, np.ndarray], tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    for suffix in (f"_{tag}", ""):
        keys = [f"gmm_{p}{suffix}" for p in ("means", "variances", "weights")]
        if all(k in division for k in keys):
            means, variances, weights = (np.asarray(division[k], dtype=np.float64).reshape(-1) for k in keys)
            if len(means) == len(variances) == len(weights) and len(means) >= 1:
                return means, variances, weights
    return None


def plot_loss_hist(run: RunData) -> Plot:
    plot = Plot("loss_hist", PLOT_TITLES["loss_hist"])
    division = run.division
    if division is None:
        plot.missing = f"no {runs.DIVISION} in the run folder (it is written when a run ends)"
        return plot
    tags = sorted((k[len("loss_"):] for k in division if re.fullmatch(r"loss_net\d+", k)),
                  key=lambda t: int(t[3:]))
    if not tags and "loss" in division:
        tags = [""]
    if not tags:
        plot.missing = f"{runs.DIVISION} holds no per-sample losses (the run ended before its first division?)"
        return plot
    is_noisy = division.get("is_noisy")
    threshold = _num((run.config or {}).get("p_threshold", 0.5))
    fig = _figure(5.5 * len(tags) if len(tags) > 1 else 9, 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(tags)))
    missing_gmm = []
    for ax, tag in zip(axes, tags):
        loss = np.asarray(division[f"loss_{tag}" if tag else "loss"], dtype=np.float64).reshape(-1)
        finite = np.isfinite(loss)
        loss_f = loss[finite]
        if not len(loss_f):
            _empty_panel(ax, f"{tag}: no finite losses")
            continue
        lo, hi = float(loss_f.min()), float(loss_f.max())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 51)
        width = bins[1] - bins[0]
        if is_noisy is not None and len(is_noisy) == len(loss):
            noisy = np.asarray(is_noisy, dtype=bool)[finite]
            counts, _, _ = ax.hist([loss_f[~noisy], loss_f[noisy]], bins=bins, stacked=True,
                                   color=["tab:green", "tab:red"], alpha=0.55,
                                   label=[f"truly clean ({(~noisy).sum()})", f"truly noisy ({noisy.sum()})"])
            top = float(np.max(counts[-1]))
        else:
            counts, _, _ = ax.hist(loss_f, bins=bins, color="tab:gray", alpha=0.6,
                                   label=f"all samples ({len(loss_f)})")
            top = float(np.max(counts))
        params = _gmm_params(division, tag)
        if params is not None and np.all(params[1] > 0) and np.all(np.isfinite(params[0])):
            means, variances, weights = params
            grid = np.linspace(lo, hi, 500)
            scale = len(loss_f) * width  # density -> expected count per bin
            comps = np.array([w * _normal_pdf(grid, m, v) * scale for m, v, w in zip(means, variances, weights)])
            clean = int(np.argmin(means))
            for k in range(len(means)):
                is_clean = k == clean
                ax.plot(grid, comps[k], color="darkgreen" if is_clean else "darkred", ls="--", lw=1.6,
                        label=f"{'clean' if is_clean else 'noisy'} component (mean {means[k]:.2f}, "
                              f"weight {weights[k]:.2f})")
            mixture = comps.sum(0)
            ax.plot(grid, mixture, color="black", lw=1.8, label="fitted 2-component GMM")
            if len(means) == 2 and math.isfinite(threshold):
                posterior = comps[clean] / np.maximum(mixture, 1e-300)
                below = np.flatnonzero((posterior < threshold) & (grid > means[clean]))
                if len(below) and below[0] > 0:
                    ax.axvline(grid[below[0]], color="0.2", ls=":", lw=1.2,
                               label=f"clean probability = {threshold:g}")
            ax.set_ylim(0, max(top * 1.25, min(float(mixture.max()) * 1.05, top * 3)))
        else:
            missing_gmm.append(tag or "the run")
        name = tag or "ensemble"
        prob_key = f"clean_prob_{tag}" if f"clean_prob_{tag}" in division else "clean_prob"
        if prob_key in division and (len(tags) == 1 or prob_key != "clean_prob"):
            n_sel = int((np.asarray(division[prob_key]) > threshold).sum())
            ax.set_title(f"{name}: {n_sel} of {len(loss)} selected as clean", fontsize=10)
        else:
            ax.set_title(name, fontsize=10)
        ax.set_xlabel("normalised per-sample loss (GMM input)")
        ax.set_ylabel("samples per bin")
        ax.legend(fontsize=7.5, loc="upper right", framealpha=0.9)
        ax.grid(True, alpha=0.3)
    plot.png = _png_bytes(fig)
    epoch = run.summary.get("epochs_done")
    plot.caption = ("Histogram of the losses the last division" + (f" (epoch {epoch})" if epoch else "")
                    + " fitted its Gaussian mixture on, stacked by whether the given label is truly clean (green) "
                      "or noisy (red); curves: the fitted components and their sum, scaled to the histogram.")
    if is_noisy is None:
        plot.caption = plot.caption.replace(", stacked by whether the given label is truly clean (green) or noisy "
                                            "(red)", " (true labels unknown, so not split)")
    if missing_gmm:
        plot.caption += f" No usable GMM parameters for {', '.join(missing_gmm)}, so no curve there."
    return plot


def plot_training(run: RunData) -> Plot:
    plot = Plot("training", PLOT_TITLES["training"])
    rows, cols = run.metrics, run.columns
    lr_keys = _matching(cols, r"lr(_net\d+)?", rows)
    lam_keys = _matching(cols, r"lambda_u_eff", rows) or _matching(cols, r"lambda_u_eff_net\d+", rows)
    loss_keys = _matching(cols, r"train_loss|loss_net\d+", rows)
    term_keys = _matching(cols, r"(lx|lu|penalty)(_net\d+)?", rows)
    term_keys += [c for c in _matching(cols, r".*loss.*", rows)
                  if c not in loss_keys and c not in term_keys and not c.startswith("seconds")]
    if not (lr_keys or lam_keys or loss_keys or term_keys):
        plot.missing = "metrics.csv has no lr, lambda_u_eff or loss columns"
        return plot
    x = epochs_axis(rows)
    fig = _figure(11, 6.4)
    (ax_lr, ax_lam), (ax_loss, ax_terms) = fig.subplots(2, 2)

    def draw(ax, keys, title, ylabel, empty, log=False):
        if not keys:
            _empty_panel(ax, empty)
            ax.set_title(title, fontsize=10)
            return
        _shade_warmup(ax, run)
        bases: list[str] = []
        for key in keys:
            base = re.sub(r"_net\d+$", "", key)  # the same colour for a quantity of every net
            if base not in bases:
                bases.append(base)
            lw = 2.2 if key in ("train_loss", "lr", "lambda_u_eff") else 1.4
            ax.plot(x, column(rows, key), color=f"C{bases.index(base)}", ls=_net_style(key), lw=lw, marker="o",
                    ms=3, label=key)
        values = np.concatenate([column(rows, k) for k in keys])
        values = values[np.isfinite(values)]
        if log and len(values) and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7.5, ncol=2 if len(keys) > 3 else 1, framealpha=0.9, loc="best")
        _integer_epochs(ax)

    draw(ax_lr, lr_keys, "learning rate", "lr", "no lr column")
    draw(ax_lam, lam_keys, "λu_eff (weight of the unlabeled loss, after ramp-up)", "λu_eff",
         "no lambda_u_eff column\n(the method has no unlabeled loss,\nor the run ended in warm-up)")
    draw(ax_loss, loss_keys, "training loss (per net and mean)", "loss", "no loss column")
    draw(ax_terms, term_keys, "loss terms: Lx (labeled), Lu (unlabeled), prior penalty", "value (log scale if wide)",
         "no loss terms in metrics.csv\n(warm-up only, or the method logs none)", log=True)
    plot.png = _png_bytes(fig)
    plot.caption = ("Per-epoch averages from metrics.csv; solid: net1, dashed: net2. Lu is unweighted (the loss adds "
                    "λu_eff × Lu). Epochs without a value (warm-up) are left empty.")
    return plot


PHASE_ORDER = ("seconds_train", "seconds_divide", "seconds_train_net1", "seconds_train_net2")
PHASE_NAMES = {"seconds_train": "warm-up training", "seconds_divide": "division (losses + GMM)",
               "seconds_train_net1": "train net1", "seconds_train_net2": "train net2", "seconds_test": "test"}


def plot_seconds(run: RunData) -> Plot:
    plot = Plot("seconds", PLOT_TITLES["seconds"])
    rows, cols = run.metrics, run.columns
    phases = _matching(cols, r"seconds_.+", rows)
    phases = ([p for p in PHASE_ORDER if p in phases] + [p for p in phases if p not in PHASE_ORDER
                                                           and p != "seconds_test"]
              + [p for p in phases if p == "seconds_test"])
    total = column(rows, "seconds")
    if not phases and not np.isfinite(total).any():
        plot.missing = "metrics.csv has no seconds columns"
        return plot
    x = epochs_axis(rows)
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    bottom = np.zeros(len(rows))
    colors = {"seconds_test": "0.55"}
    for i, key in enumerate(phases):
        values = np.nan_to_num(column(rows, key), nan=0.0)
        ax.bar(x, values, bottom=bottom, width=0.8, color=colors.get(key, f"C{i}"),
               label=PHASE_NAMES.get(key, key.removeprefix("seconds_").replace("_", " ")))
        bottom += values
    if np.isfinite(total).any():
        other = np.clip(np.nan_to_num(total, nan=0.0) - bottom, 0.0, None)
        if phases and other.max() > 0.02 * max(float(np.nanmax(total)), 1e-9):
            timed_training = any(p.startswith("seconds_train") for p in phases)
            ax.bar(x, other, bottom=bottom, width=0.8, color="0.85", hatch="//", edgecolor="0.6",
                   label="other" if timed_training else "training and other (not timed apart)")
        elif not phases:
            ax.bar(x, other, width=0.8, color="C0", label="epoch")
    _integer_epochs(ax)
    ax.set_axisbelow(True)
    ax.set_ylabel("seconds")
    seconds_total = _num(run.summary.get("seconds_total"))
    title = "seconds per epoch by phase"
    if math.isfinite(seconds_total):
        title += f" (run total {format_seconds(seconds_total)} on {run.summary.get('device', '?')})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, framealpha=0.9, loc="upper right")
    plot.png = _png_bytes(fig)
    plot.caption = ("Stacked wall-clock seconds of each epoch's phases; 'other' is the rest of the epoch "
                    "(data handling, logging).")
    return plot


def default_top(n: int) -> int:
    """How many of the most suspicious samples the confusion matrix uses: 10% of them, at most 200."""
    return max(1, min(MAX_TOP, math.ceil(0.1 * n)))


def plot_confusion(run: RunData, top: int | None = None) -> Plot:
    plot = Plot("confusion", PLOT_TITLES["confusion"])
    issues = run.issues
    if issues is None or not len(issues):
        plot.missing = f"no {runs.LABEL_ISSUES} in the run folder (it is written when a run ends)"
        return plot
    n = len(issues)
    k = min(n, top if top else default_top(n))
    given, pred = issues.given_label[:k], issues.predicted_label[:k]
    class_names = None
    if run.labels is not None and "class_names" in run.labels:
        class_names = [str(c) for c in np.asarray(run.labels["class_names"]).reshape(-1)]
    n_classes = max(len(class_names or []), int(max(issues.given_label.max(), issues.predicted_label.max())) + 1)
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (given, pred), 1)
    small = n_classes <= 20
    side = 7.5 if small else 9
    fig = _figure(side, side * 0.86)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    from matplotlib.ticker import MaxNLocator

    bar = fig.colorbar(image, ax=ax, shrink=0.8, label="samples")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    if small:
        peak = max(int(matrix.max()), 1)
        for i in range(n_classes):
            for j in range(n_classes):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] > 0.5 * peak else "black")
        names = class_names if class_names and len(class_names) == n_classes else [str(c) for c in range(n_classes)]
        names = [name if len(name) <= 12 else name[:11] + "…" for name in names]
        ax.set_xticks(range(n_classes), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right"
                      if max(map(len, names)) > 2 else "center", fontsize=8)
        ax.set_yticks(range(n_classes), names, fontsize=8)
    ax.set_xlabel("predicted label (the model's guess)")
    ax.set_ylabel("given (training) label")
    agree = int(np.trace(matrix))
    ax.set_title(f"{k} most suspicious of {n} training samples: model disagrees with the given label for {k - agree}",
                 fontsize=10)
    plot.png = _png_bytes(fig)
    plot.caption = (f"The {k} samples ranked most likely mislabeled in {runs.LABEL_ISSUES} (10% of the training "
                    f"samples, at most {MAX_TOP}, unless --top is given). Off the diagonal: the model predicts another "
                    "class than the given label.")
    if issues.true_label is not None:
        true = issues.true_label[:k]
        truly = float(np.mean(true != given))
        fixed = float(np.mean(pred[true != given] == true[true != given])) if (true != given).any() else float("nan")
        plot.caption += (f" With the true labels: {truly:.0%} of them are truly mislabeled"
                         + (f", and for {fixed:.0%} of those the prediction is the true label." if math.isfinite(fixed)
                            else "."))
    return plot


# --------------------------------------------------------------------------- tables
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


def _pct(value: Any, digits: int = 1) -> str:
    v = _num(value)
    return f"{100 * v:.{digits}f}%" if math.isfinite(v) else "-"


def _acc(value: Any) -> str:
    v = _num(value)
    return f"{v:.2f}" if math.isfinite(v) else "-"


def summary_row(name: str, summary: dict[str, Any]) -> dict[str, str]:
    """The columns of ``compare`` for one run (strings; '-' where unknown) plus the flag."""
    best, last = _num(summary.get("test_acc_best")), _num(summary.get("test_acc_last"))
    drop = best - last
    done, total = summary.get("epochs_done"), summary.get("epochs")
    epochs = f"{done}/{total}" if done is not None and total is not None else str(done if done is not None else "-")
    seconds = _num(summary.get("seconds_total"))
    return {
        "!": "!" if math.isfinite(drop) and drop > DROP_FLAG_POINTS else "",
        "run": name,
        "dataset": str(summary.get("dataset") or "-"),
        "method": str(summary.get("method") or "-"),
        "epochs": epochs,
        "best": _acc(best),
        "last": _acc(last),
        "best-last": _acc(drop),
        "noise nominal": _pct(summary.get("noise_rate_nominal")),
        "noise actual": _pct(summary.get("noise_rate_actual")),
        "seconds": f"{seconds:.0f}" if math.isfinite(seconds) and seconds >= 100 else
                   (f"{seconds:.1f}" if math.isfinite(seconds) else "-"),
    }


COMPARE_COLUMNS = ("!", "run", "dataset", "method", "epochs", "best", "last", "best-last", "noise nominal",
                   "noise actual", "seconds")
_LEFT = {"!", "run", "dataset", "method"}


def _flag_line(rows: list[dict[str, str]]) -> str:
    flagged = [row["run"] for row in rows if row["!"]]
    if flagged:
        return (f"! best - last > {DROP_FLAG_POINTS:g} points (accuracy fell after the best epoch: a collapse or "
                f"over-fitting to the noisy labels): {', '.join(flagged)}")
    return f"no run ended more than {DROP_FLAG_POINTS:g} points below its best test accuracy"


def format_table(rows: list[dict[str, str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |",
                 "|" + "|".join(":-:" if c == "!" else (":--" if c in _LEFT else "--:") for c in COMPARE_COLUMNS) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in COMPARE_COLUMNS) + " |")
        return "\n".join(lines) + "\n\n" + _flag_line(rows) + "\n"
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in COMPARE_COLUMNS}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].ljust(widths[c]) if c in _LEFT else values[c].rjust(widths[c])
                         for c in COMPARE_COLUMNS).rstrip()

    out = [line({c: c for c in COMPARE_COLUMNS}), "  ".join("-" * widths[c] for c in COMPARE_COLUMNS)]
    out += [line(row) for row in rows]
    return "\n".join(out) + "\n\n" + _flag_line(rows) + "\n"


def compare_runs(run_dirs: Sequence[str | Path], markdown: bool = False) -> str:
    """The summaries of ``run_dirs`` side by side as a plain-text (or Markdown) table.

    Columns: run, dataset, method, epochs (done/planned), best and last test accuracy (%), best - last
    (points), noise rate nominal and actual, seconds. Runs whose best - last exceeds 2 points get a
    ``!`` and are named in a line under the table. Raises UserError for a folder that is not a run.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("give at least one run folder")
    paths = [_check_run_dir(p) for p in run_dirs]
    rows = [summary_row(name, _read_summary(path)) for name, path in zip(run_names(paths), paths)]
    return format_table(rows, markdown=markdown)


def _html_table(pairs: list[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f'<table class="{cls}">{body}</table>'


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def key_facts(run: RunData) -> list[tuple[str, str]]:
    s = run.summary
    best_epoch = s.get("test_acc_best_epoch")
    facts = [
        ("run folder", str(run.path.resolve())),
        ("dataset / method", f"{s.get('dataset', '-')} / {s.get('method', '-')}"
                             + (f" (preset {s['preset']})" if s.get("preset") else "")),
        ("model", str((run.config or {}).get("model", "-"))),
        ("epochs", f"{s.get('epochs_done', '-')} of {s.get('epochs', '-')} done"),
        ("best test accuracy", f"{_acc(s.get('test_acc_best'))}%"
                               + (f" at epoch {int(best_epoch) + 1}" if isinstance(best_epoch, (int, float)) else "")),
        ("last test accuracy", f"{_acc(s.get('test_acc_last'))}%"),
        ("best − last", f"{_acc(_num(s.get('test_acc_best')) - _num(s.get('test_acc_last')))} points"),
        ("noise", f"{s.get('noise_source', '-')} {s.get('noise_mode') or ''}: nominal "
                  f"{_pct(s.get('noise_rate_nominal'))}, actual {_pct(s.get('noise_rate_actual'))}".replace("  ", " ")),
        ("samples", f"train {s.get('num_train', '-')}, validation {s.get('num_val', '-')}, "
                    f"test {s.get('num_test', '-')}"),
        ("time", f"{format_seconds(_num(s.get('seconds_total')))} on {s.get('device', '-')}"),
        ("collapse warnings", str(s.get("collapse_warnings", "-"))),
    ]
    if s.get("selected_by"):
        facts.append(("best.pt chosen by", f"{s['selected_by']} (epoch {int(s.get('selected_epoch', -1)) + 1})"))
    return facts


def run_warnings(run: RunData) -> list[str]:
    s = run.summary
    out = []
    drop = _num(s.get("test_acc_best")) - _num(s.get("test_acc_last"))
    if math.isfinite(drop) and drop > DROP_FLAG_POINTS:
        out.append(f"the last test accuracy is {drop:.2f} points below the best: the run lost accuracy after "
                   f"its best epoch (collapse or over-fitting to the noisy labels)")
    if _num(s.get("collapse_warnings")) > 0:
        out.append(f"{int(s['collapse_warnings'])} collapse warning(s) during training (see the ✕ marks)")
    done, total = s.get("epochs_done"), s.get("epochs")
    if isinstance(done, int) and isinstance(total, int) and done < total:
        out.append(f"the run stopped after {done} of {total} epochs (continue it with `cdmix resume {run.path}`)")
    return out


# --------------------------------------------------------------------------- the page
CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1180px;margin:0 auto;padding:18px 28px 40px;background:#fff}
h1{font-size:1.55em;margin:.3em 0 .1em}
h2{font-size:1.25em;border-bottom:2px solid #dde;padding-bottom:4px;margin-top:1.6em}
h3{font-size:1.05em;margin:1.3em 0 .3em}
.sub{color:#667;font-size:.9em;margin:0 0 12px}
table{border-collapse:collapse;font-size:.88em;margin:6px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f3f4f8;font-weight:600;white-space:nowrap}
table.cmp td.num{text-align:right;font-variant-numeric:tabular-nums}table.cmp th{background:#f3f4f8}
tr.flag td{background:#fff4d6}
.grid{display:flex;flex-wrap:wrap;gap:0 24px}.grid table{flex:1 1 340px}
figure{margin:10px 0 22px}figure img{max-width:100%;border:1px solid #e3e3e8}
figcaption{font-size:.85em;color:#444;margin-top:3px}figcaption a{color:#557}
.missing{background:#f6f6f9;border:1px dashed #bbc;padding:10px 14px;color:#555;font-size:.9em}
.warn{background:#fff4d6;border-left:5px solid #e0a100;padding:8px 14px;margin:10px 0}
.note{color:#666;font-size:.85em}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
"""


def _figure_html(plot: Plot, heading: str = "h3") -> str:
    title = f"<{heading}>{html.escape(plot.title)}</{heading}>"
    if plot.png is None:
        return f'{title}<div class="missing" id="missing-{plot.key}">Not drawn: {html.escape(plot.missing)}.</div>'
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'{title}<figure id="plot-{html.escape(plot.file)}"><img alt="{html.escape(plot.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(plot.caption)} '
            f'<a href="{html.escape(plot.file)}">{html.escape(plot.file)}</a></figcaption></figure>')


def _compare_html(run_list: list[RunData]) -> str:
    rows = [summary_row(run.name, run.summary) for run in run_list]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COMPARE_COLUMNS)
    body = ""
    for row in rows:
        cells = "".join(f'<td{"" if c in _LEFT else " class=num"}>{html.escape(row[c])}</td>' for c in COMPARE_COLUMNS)
        body += f'<tr{" class=flag" if row["!"] else ""}>{cells}</tr>'
    return (f'<table class="cmp"><tr>{head}</tr>{body}</table><p class="note">{html.escape(_flag_line(rows))}. '
            f"Accuracy in %, best − last in points, seconds of training.</p>")


def _run_section(run: RunData, plots: list[Plot], heading: str) -> str:
    parts = []
    for warning in run_warnings(run):
        parts.append(f'<div class="warn">⚠ {html.escape(warning)}</div>')
    parts.append(_html_table(key_facts(run)))
    for note in run.notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.extend(_figure_html(p, heading) for p in plots)
    parts.append(f"<{heading}>Resolved config and summary</{heading}>")
    config_table = (_html_table([(k, _value_text(v)) for k, v in sorted(run.config.items())])
                    if run.config else '<div class="missing">no config.json</div>')
    summary_table = _html_table([(k, _value_text(v)) for k, v in sorted(run.summary.items())])
    parts.append(f'<div class="grid"><div><p class="note">{runs.CONFIG}: every setting of the run, as it ran'
                 f'</p>{config_table}</div><div><p class="note">{runs.SUMMARY}</p>{summary_table}</div></div>')
    return "\n".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _page_path(paths: list[Path], out: str | Path | None) -> Path:
    if out is None:
        return paths[0] / DEFAULT_PAGE if len(paths) == 1 else Path.cwd() / DEFAULT_PAGE
    page = Path(out)
    if page.is_dir():
        page = page / DEFAULT_PAGE
    if not page.parent.exists():
        page.parent.mkdir(parents=True, exist_ok=True)
    return page


def run_plots(run: RunData, top: int | None = None) -> list[Plot]:
    return [plot_accuracy(run), plot_selection(run), plot_loss_hist(run), plot_training(run), plot_seconds(run),
            plot_confusion(run, top)]


@dataclass
class Report:
    """What ``build_report`` wrote: the page and the PNG files beside it."""

    page: Path
    pngs: list[Path]
    missing: list[str]  # "plot: reason" for every plot left out


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, top: int | None = None) -> Report:
    """Write the report page and its PNGs (see the module docstring); ``top``: samples in the confusion matrix."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("give at least one run folder")
    if top is not None and top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    paths = [_check_run_dir(p) for p in run_dirs]
    run_list = [load_run(path, name) for path, name in zip(paths, run_names(paths))]
    page = _page_path(paths, out)
    stem = page.stem
    stamp = time.strftime("%Y-%m-%d %H:%M")
    sections: list[tuple[str, list[Plot]]] = []
    if len(run_list) == 1:
        run = run_list[0]
        plots = run_plots(run, top)
        for plot in plots:
            plot.file = f"{stem}-{plot.key}.png"
        title = f"cdmix report: {run.name}"
        body = (f"<h1>{html.escape(title)}</h1><p class=sub>{html.escape(str(run.path.resolve()))} · "
                f"made {stamp} by <code>cdmix report</code></p>" + _run_section(run, plots, "h2"))
        sections.append((run.name, plots))
    else:
        overview = plot_accuracy_runs(run_list)
        overview.file = f"{stem}-accuracy.png"
        sections.append(("all runs", [overview]))
        title = f"cdmix report: {len(run_list)} runs"
        parts = [f"<h1>{html.escape(title)}</h1><p class=sub>made {stamp} by <code>cdmix report</code></p>",
                 "<h2>Summaries side by side</h2>", _compare_html(run_list), _figure_html(overview, "h2")]
        slugs: list[str] = []
        for run in run_list:
            slug = _slug(run.name)
            while slug in slugs:
                slug += "_"
            slugs.append(slug)
            plots = run_plots(run, top)
            for plot in plots:
                plot.file = f"{stem}-{slug}-{plot.key}.png"
            parts.append(f'<h2 id="run-{html.escape(slug)}">{html.escape(run.name)}</h2>')
            parts.append(_run_section(run, plots, "h3"))
            sections.append((run.name, plots))
        body = "\n".join(parts)
    page_html = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                 f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
                 f"<body><main>\n{body}\n</main></body></html>\n")
    pngs, missing = [], []
    for name, plots in sections:
        for plot in plots:
            if plot.png is None:
                missing.append(f"{name} {plot.key}: {plot.missing}")
                continue
            path = page.parent / plot.file
            runs.atomic_write_bytes(path, plot.png)
            pngs.append(path)
    runs.atomic_write_text(page, page_html)
    return Report(page, pngs, missing)


def make_report(run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None,
                top: int | None = None) -> Path:
    """Write the one-page HTML report of one or several runs; returns the page's path.

    run_dirs: a run folder or a list of them. out: the page (default RUN_DIR/report.html for one run,
    ./report.html for several); the PNGs are written beside it. top: how many of the most suspicious
    samples the confusion matrix uses (default 10%, at most 200). Raises UserError for a folder that
    is not a cdmix run.
    """
    return build_report(run_dirs, out, top).page


# --------------------------------------------------------------------------- command line
def cmd_report(args: argparse.Namespace) -> int:
    report = build_report(args.run_dirs, args.out, args.top)
    print(f"wrote {report.page}")
    print(f"  and {len(report.pngs)} plot(s) beside it: {', '.join(p.name for p in report.pngs)}")
    for line in report.missing:
        print(f"  not drawn: {line}")
    print(f"open it in a browser: {report.page.resolve().as_uri()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare_runs(args.run_dirs, markdown=args.markdown), end="")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="one-page HTML report of a run (plots, config, summary); several runs side by side",
        description="Write a self-contained HTML page (plots embedded, opens offline) and its PNGs beside it. "
                    "One run: RUN_DIR/report.html. Several runs: ./report.html unless --out is given.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="cdmix run folder(s)")
    p.add_argument("--out", help="the HTML file to write (or a folder to write report.html in)")
    p.add_argument("--top", type=int, default=None,
                   help=f"samples in the confusion matrix of the most suspicious (default 10%%, at most {MAX_TOP})")
    p.set_defaults(func=cmd_report)
    return p


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="summaries of runs side by side; flags runs that ended > 2 points below their best",
        description="Print the summaries of the runs as a table: dataset, method, epochs, best and last test "
                    "accuracy, best - last, noise rate nominal and actual, seconds. Runs whose best - last exceeds "
                    f"{DROP_FLAG_POINTS:g} points are marked '!'.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="cdmix run folder(s)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_compare)
    return p
