"""The report's plots: one function per plot, ``RunData`` in, a ``Plot`` (PNG bytes or the reason it
is left out) back. Each is left out, with the reason on the page, when the run has no data for it:

  accuracy   test accuracy per epoch: ensemble and each net, best and last marked
  selection  clean-selection precision / recall / ROC-AUC (when true labels are known), labeled-set size
  warmup     --warmup auto: the loss GMM's separation after each warm-up epoch, and where it ended
  loss_hist  per-sample loss histogram of the last division (split truly clean / noisy when known)
             with the fitted two-component GMM drawn over it (division.npz)
  training   learning rate, lambda_u_eff and the loss terms per epoch
  seconds    seconds per phase per epoch (stacked bars)
  confusion  given vs predicted label of the most suspicious samples (label_issues.csv)
  accuracy_mean  ``cdmix compare --plot``: runs that differ only in the seed averaged, one line each
  knn        a `cdmix pretrain` run (no classifier; only knn, training, seconds and confusion): the
             NT-Xent loss and the kNN monitor's accuracy per epoch

Matplotlib is used through its Agg canvas directly (no pyplot), so making a report never changes
the backend of an interactive session.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from cdmix import runs
from cdmix.report.rundata import RunData, best_last, column, epochs_axis, format_seconds, has_data, num

MAX_TOP = 200  # the confusion matrix uses the min(10%, 200) most suspicious samples by default


@dataclass
class Plot:
    """One plot of the page: a PNG, or the reason it is left out."""

    key: str
    title: str
    png: bytes | None = None
    caption: str = ""
    missing: str = ""  # why it is not drawn
    file: str = ""  # file name beside the page


# --------------------------------------------------------------------------- figure helpers
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plain(text: str) -> str:
    """Text from the user (a class or run folder name) as matplotlib shows it literally: ``$`` escaped,
    so ``$\\frac{$`` is not parsed as mathtext (which raises on it)."""
    return str(text).replace("$", r"\$")


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


def _shade_warmup(ax, run: RunData) -> None:
    warmup = run.warmup_epochs
    if warmup > 0:
        ax.axvspan(0.5, warmup + 0.5, color="0.6", alpha=0.15, lw=0,
                   label=f"warm-up ({warmup} epoch{'s' if warmup > 1 else ''})")


def _net_label(key: str) -> str:
    """'net2' for a column ending in net2; '' for one of no net."""
    found = re.search(r"net(\d+)$", key)
    return f"net{found.group(1)}" if found else ""


def _net_style(key: str) -> str:
    """Line style per net: solid net1, dashed net2, ..."""
    net = _net_label(key)
    return ("-", "--", ":", "-.")[(int(net[3:]) - 1) % 4] if net else "-"


def _epoch_lines(ax, run: RunData, keys: list[str], title: str, ylabel: str, empty: str,
                 colour=None, label=None, log: bool = False) -> None:
    """One line per metrics column in ``keys`` over the epochs (or ``empty`` said in the panel when none).

    ``colour(key)`` / ``label(key)`` default to one colour per quantity (every net of it alike, nets told
    apart by line style) and the column name; ``log``: log scale when the values span more than 20x.
    """
    if not keys:
        _empty_panel(ax, empty)
        ax.set_title(title, fontsize=10)
        return
    rows, x = run.metrics, epochs_axis(run.metrics)
    _shade_warmup(ax, run)
    bases: list[str] = []
    for key in keys:
        base = re.sub(r"_net\d+$", "", key)
        if base not in bases:
            bases.append(base)
        lw = 2.2 if key in ("train_loss", "lr", "lambda_u_eff") else 1.4
        ax.plot(x, column(rows, key), color=colour(key) if colour else f"C{bases.index(base)}", ls=_net_style(key),
                lw=lw, marker="o", ms=3, label=label(key) if label else key)
    values = np.concatenate([column(rows, k) for k in keys])
    values = values[np.isfinite(values)]
    if log and len(values) and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7.5, ncol=2 if len(keys) > 3 else 1, framealpha=0.9, loc="best")
    _integer_epochs(ax)


# --------------------------------------------------------------------------- the plots
def run_plots(run: RunData, top: int | None = None) -> list[Plot]:
    """Every plot of one run, in page order; ``top``: samples in the confusion matrix."""
    if run.summary.get("pretraining"):  # no classifier: no accuracy, selection, warm-up or division
        return [plot_knn(run), plot_training(run), plot_seconds(run), plot_confusion(run, top)]
    return [plot_accuracy(run), plot_selection(run), plot_warmup(run), plot_loss_hist(run), plot_training(run),
            plot_seconds(run), plot_confusion(run, top)]


def plot_knn(run: RunData) -> Plot:
    """A pretraining run: the NT-Xent loss per epoch and the kNN monitor's test accuracy where measured."""
    plot = Plot("knn", "Pretraining: NT-Xent loss and kNN accuracy per epoch")
    rows = run.metrics
    loss_key = "nt_xent" if has_data(rows, "nt_xent") else "train_loss"
    if not has_data(rows, loss_key) and not has_data(rows, "knn_acc"):
        plot.missing = "metrics.csv has no nt_xent or knn_acc values"
        return plot
    fig = _figure(11, 4.2)
    ax_loss, ax_knn = fig.subplots(1, 2)
    x = epochs_axis(rows)
    _epoch_lines(ax_loss, run, [loss_key] if has_data(rows, loss_key) else [], "NT-Xent loss (mean over the steps)",
                 "loss", "no loss column")
    knn = column(rows, "knn_acc")
    measured = np.isfinite(knn)
    if measured.any():
        ax_knn.plot(x[measured], knn[measured], color="C2", lw=2, marker="o", ms=4, label="kNN accuracy (test split)")
        last = np.flatnonzero(measured)[-1]
        ax_knn.set_title(f"kNN accuracy of the test split: last {knn[last]:.2f}% (epoch {x[last]:.0f})", fontsize=10)
        ax_knn.set_ylabel("accuracy (%)")
        ax_knn.legend(fontsize=8, loc="lower right")
        _integer_epochs(ax_knn)
    else:
        _empty_panel(ax_knn, "no kNN accuracy\n(no test split, or the monitor never ran)")
    plot.png = _png_bytes(fig)
    plot.caption = ("Left: the NT-Xent loss of the two views (SupContrast's scale aside). Right: weighted kNN "
                    "accuracy (k = --knn-k, vote weight exp(cosine / --knn-temperature)) of the test images against "
                    "the training images and their given labels, in the encoder's feature space, every --knn-every "
                    "epochs and at the last; chance is 100 / classes.")
    return plot


def plot_warmup(run: RunData) -> Plot:
    """--warmup auto: the loss GMM's separation after each warm-up epoch, and where the warm-up ended."""
    plot = Plot("warmup", "Automatic warm-up: loss separation per epoch")
    if not has_data(run.metrics, "warmup_separation"):
        method = run.summary.get("method", "this method")
        plot.missing = ("the run had a fixed warm-up (no warmup_separation column in metrics.csv)"
                        if "warmup_rule" in run.summary else f"{method} has no automatic warm-up")
        return plot
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    x, sep = epochs_axis(run.metrics), column(run.metrics, "warmup_separation")
    ax.plot(x, sep, color="C4", marker="o", ms=3, lw=1.6, label="separation (Ashman's D, mean of the nets)")
    end = run.summary.get("warmup_epochs")
    rule = str(run.summary.get("warmup_rule", ""))
    if isinstance(end, (int, float)):
        ax.axvline(end + 0.5, color="0.3", ls="--", lw=1.2, label=f"warm-up ends after epoch {int(end)}")
    ax.set_ylabel("separation D")
    ax.legend(fontsize=8, loc="best")
    _integer_epochs(ax)
    plot.png = _png_bytes(fig)
    plot.caption = ("After each warm-up epoch, Ashman's D = |m_noisy - m_clean| / sqrt((v_clean + v_noisy) / 2) of the "
                    "two-component GMM fitted to the normalised per-sample losses (mean over the nets). The warm-up "
                    "ends when D stops improving, reaches 3, or the step ceiling or epoch cap is reached, never before "
                    "the step floor" + (f"; this run: {rule}." if rule else "."))
    return plot


def plot_accuracy(run: RunData) -> Plot:
    plot = Plot("accuracy", "Test accuracy per epoch")
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
    net_keys = run.matching(r"test_acc_net\d+")
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
    ax.set_title(f"{_plain(run.name)}: test accuracy, best {acc[best]:.2f}%, last {acc[last]:.2f}% "
                 f"(best − last {acc[best] - acc[last]:.2f} points)")
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    plot.png = _png_bytes(fig)
    plot.caption = (("Thick line: the accuracy the run reports (ensemble of its nets); dashed: each net alone. "
                     if net_keys else "") + "Star: best epoch; red circle: last epoch"
                    + ("; grey band: warm-up." if run.warmup_epochs else "."))
    return plot


def plot_accuracy_runs(runs_data: list[RunData]) -> Plot:
    """One accuracy line per run (the overview of a report of several runs)."""
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
                label=f"{_plain(run.name)}: best {acc[best]:.2f}% (ep {x[best]:.0f}), last {acc[last]:.2f}%")
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


def mean_curve(members: list[RunData], key: str = "test_acc"):
    """(epochs, mean, min, max, runs) of ``key`` over the runs that have it, over the epochs they all
    have (the shortest run's); None when no run has a value."""
    curves = [c for c in (column(run.metrics, key) for run in members) if np.isfinite(c).any()]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    stack = np.array([c[:length] for c in curves])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an epoch no run measured stays NaN
        return (epochs_axis(members[0].metrics[:length]), np.nanmean(stack, axis=0), np.nanmin(stack, axis=0),
                np.nanmax(stack, axis=0), len(curves))


def plot_accuracy_groups(groups: list[tuple[str, list[RunData]]], title: str = "") -> Plot:
    """Test accuracy per epoch, one line per group of runs (``cdmix compare --plot``): the mean over the
    group's runs (its seeds) over the epochs they all have, with the min-max band where a group has
    more than one run; ``groups``: (label, runs)."""
    plot = Plot("accuracy_mean", "Test accuracy per epoch, mean over each group's runs")
    fig = _figure(10, 5)
    ax = fig.add_subplot()
    drawn = 0
    for i, (label, members) in enumerate(groups):
        curve = mean_curve(members)
        if curve is None:
            continue
        x, mean, low, high, count = curve
        color = f"C{i % 10}"
        last = np.flatnonzero(np.isfinite(mean))[-1]
        ax.plot(x, mean, color=color, lw=1.8, label=f"{_plain(label)} ({count} run{'s' if count > 1 else ''}): "
                f"best {np.nanmax(mean):.2f}%, last {mean[last]:.2f}%")
        if count > 1:
            ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)
        drawn += 1
    if not drawn:
        plot.missing = "no run has test_acc values"
        return plot
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    ax.grid(alpha=0.3)
    _integer_epochs(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_plain(title) or "test accuracy, mean over each group's runs (band: min to max)")
    plot.png = _png_bytes(fig)
    plot.caption = ("One line per group of runs whose settings differ only in the seed: their mean test accuracy "
                    "over the epochs they all have; the band spans their lowest to highest.")
    return plot


def plot_selection(run: RunData) -> Plot:
    plot = Plot("selection", "Clean selection per epoch")
    metric_keys = {m: run.matching(rf"sel_{m}(_net\d+)?") for m in ("precision", "recall", "auc")}
    labeled_keys = run.matching(r"labeled(_net\d+)?")
    has_sel = any(metric_keys.values())
    if not has_sel and not labeled_keys:
        method = run.summary.get("method", "this method")
        plot.missing = (f"metrics.csv has no selection columns (sel_*, labeled_*): {method} logged no "
                        "clean/noisy division"
                        + (" (the run may have ended inside warm-up)" if run.warmup_epochs else ""))
        return plot
    fig = _figure(11, 4.2)
    ax_sel, ax_lab = fig.subplots(1, 2)
    style = {"precision": ("C0", "precision"), "recall": ("C1", "recall"), "auc": ("C2", "ROC-AUC")}
    metric_of = {key: metric for metric, keys in metric_keys.items() for key in keys}
    _epoch_lines(ax_sel, run, list(metric_of), "selected-as-clean vs truly clean", "fraction",
                 "true labels unknown:\nselection precision, recall and ROC-AUC\nneed them",
                 colour=lambda key: style[metric_of[key]][0],
                 label=lambda key: f"{style[metric_of[key]][1]} {_net_label(key)}".strip())
    if has_sel:
        ax_sel.set_ylim(-0.02, 1.02)
    _epoch_lines(ax_lab, run, labeled_keys, "labeled set (clean probability > threshold)", "samples",
                 "no labeled-set size in metrics.csv", colour=lambda key: f"C{labeled_keys.index(key) + 3}",
                 label=lambda key: f"labeled set {_net_label(key)}".strip())
    if labeled_keys:
        n_train = num(run.summary.get("num_train"))
        actual = num(run.summary.get("noise_rate_actual_train", run.summary.get("noise_rate_actual")))
        if math.isfinite(n_train) and math.isfinite(actual):
            clean = n_train * (1 - actual)
            ax_lab.axhline(clean, color="green", ls=":", lw=1.5, label=f"truly clean samples ({clean:.0f})")
        elif math.isfinite(n_train):
            ax_lab.axhline(n_train, color="0.5", ls=":", lw=1.2, label=f"all training samples ({n_train:.0f})")
        ax_lab.set_ylim(bottom=0)
        ax_lab.legend(fontsize=7.5, framealpha=0.9, loc="best")  # again, with the line just drawn
    plot.png = _png_bytes(fig)
    plot.caption = ("Precision: share of the selected (labeled) samples whose label is truly clean; recall: share "
                    "of the truly clean samples selected; ROC-AUC of the clean probability. Solid: net1, dashed: net2. "
                    "Empty before the first division (warm-up).")
    if not has_sel:
        plot.caption += " The run's true labels are unknown, so only the labeled-set size is drawn."
    return plot


def _gmm_params(division: dict[str, np.ndarray], tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(means, variances, weights) of the GMM fitted for ``tag`` (or the run's only GMM), or None."""
    for suffix in (f"_{tag}", ""):
        keys = [f"gmm_{p}{suffix}" for p in ("means", "variances", "weights")]
        if all(k in division for k in keys):
            means, variances, weights = (np.asarray(division[k], dtype=np.float64).reshape(-1) for k in keys)
            if len(means) == len(variances) == len(weights) and len(means) >= 1:
                return means, variances, weights
    return None


def _draw_gmm(ax, params, loss: np.ndarray, lo: float, hi: float, width: float, top: float,
              threshold: float) -> None:
    """The fitted components and their sum over a loss histogram, scaled to counts per bin."""
    means, variances, weights = params
    grid = np.linspace(lo, hi, 500)
    scale = len(loss) * width  # density -> expected count per bin
    comps = np.array([w * scale * np.exp(-0.5 * (grid - m) ** 2 / v) / math.sqrt(2 * math.pi * v)
                      for m, v, w in zip(means, variances, weights)])
    clean = int(np.argmin(means))
    for k in range(len(means)):
        is_clean = k == clean
        ax.plot(grid, comps[k], color="darkgreen" if is_clean else "darkred", ls="--", lw=1.6,
                label=f"{'clean' if is_clean else 'noisy'} component (mean {means[k]:.2f}, weight {weights[k]:.2f})")
    mixture = comps.sum(0)
    ax.plot(grid, mixture, color="black", lw=1.8, label="fitted 2-component GMM")
    if len(means) == 2 and math.isfinite(threshold):
        posterior = comps[clean] / np.maximum(mixture, 1e-300)
        below = np.flatnonzero((posterior < threshold) & (grid > means[clean]))
        if len(below) and below[0] > 0:
            ax.axvline(grid[below[0]], color="0.2", ls=":", lw=1.2, label=f"clean probability = {threshold:g}")
    ax.set_ylim(0, max(top * 1.25, min(float(mixture.max()) * 1.05, top * 3)))


def plot_loss_hist(run: RunData) -> Plot:
    plot = Plot("loss_hist", "Per-sample loss of the last division")
    division = run.division
    if division is None:
        plot.missing = f"no {runs.DIVISION} in the run folder (it is written when a run ends)"
        return plot
    tags = sorted((k[len("loss_"):] for k in division if re.fullmatch(r"loss_net\d+", k)), key=lambda t: int(t[3:]))
    if not tags and "loss" in division:
        tags = [""]
    if not tags:
        plot.missing = f"{runs.DIVISION} holds no per-sample losses (the run ended before its first division?)"
        return plot
    is_noisy = division.get("is_noisy")
    threshold = num((run.config or {}).get("p_threshold", 0.5))
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
        if is_noisy is not None and len(is_noisy) == len(loss):
            noisy = np.asarray(is_noisy, dtype=bool)[finite]
            counts, _, _ = ax.hist([loss_f[~noisy], loss_f[noisy]], bins=bins, stacked=True,
                                   color=["tab:green", "tab:red"], alpha=0.55,
                                   label=[f"truly clean ({(~noisy).sum()})", f"truly noisy ({noisy.sum()})"])
            top = float(np.max(counts[-1]))
        else:
            counts, _, _ = ax.hist(loss_f, bins=bins, color="tab:gray", alpha=0.6, label=f"all samples ({len(loss_f)})")
            top = float(np.max(counts))
        params = _gmm_params(division, tag)
        if params is not None and np.all(params[1] > 0) and np.all(np.isfinite(params[0])):
            _draw_gmm(ax, params, loss_f, lo, hi, bins[1] - bins[0], top, threshold)
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
    split = (" (true labels unknown, so not split)" if is_noisy is None else
             ", stacked by whether the given label is truly clean (green) or noisy (red)")
    plot.caption = ("Histogram of the losses the last division" + (f" (epoch {epoch})" if epoch else "")
                    + f" fitted its Gaussian mixture on{split}; curves: the fitted components and their sum, "
                      "scaled to the histogram.")
    if missing_gmm:
        plot.caption += f" No usable GMM parameters for {', '.join(missing_gmm)}, so no curve there."
    return plot


def plot_training(run: RunData) -> Plot:
    plot = Plot("training", "Learning rate, λu_eff and loss terms")
    lr_keys = run.matching(r"lr(_net\d+)?")
    lam_keys = run.matching(r"lambda_u_eff") or run.matching(r"lambda_u_eff_net\d+")
    loss_keys = run.matching(r"train_loss|loss_net\d+")
    term_keys = run.matching(r"(lx|lu|penalty)(_net\d+)?")
    term_keys += [c for c in run.matching(r".*loss.*")
                  if c not in loss_keys and c not in term_keys and not c.startswith("seconds")]
    if not (lr_keys or lam_keys or loss_keys or term_keys):
        plot.missing = "metrics.csv has no lr, lambda_u_eff or loss columns"
        return plot
    fig = _figure(11, 6.4)
    (ax_lr, ax_lam), (ax_loss, ax_terms) = fig.subplots(2, 2)
    _epoch_lines(ax_lr, run, lr_keys, "learning rate", "lr", "no lr column")
    _epoch_lines(ax_lam, run, lam_keys, "λu_eff (weight of the unlabeled loss, after ramp-up)", "λu_eff",
                 "no lambda_u_eff column\n(the method has no unlabeled loss,\nor the run ended in warm-up)")
    _epoch_lines(ax_loss, run, loss_keys, "training loss (per net and mean)", "loss", "no loss column")
    _epoch_lines(ax_terms, run, term_keys, "loss terms: Lx (labeled), Lu (unlabeled), prior penalty",
                 "value (log scale if wide)", "no loss terms in metrics.csv\n(warm-up only, or the method logs none)",
                 log=True)
    plot.png = _png_bytes(fig)
    two_nets = any(re.search(r"_net2$", key) for key in lr_keys + lam_keys + loss_keys + term_keys)
    plot.caption = ("Per-epoch averages from metrics.csv" + ("; solid: net1, dashed: net2." if two_nets else ".")
                    + (" Lu is unweighted (the loss adds λu_eff × Lu)." if any(k.startswith("lu") for k in term_keys)
                       else "")
                    + (" Epochs without a value (warm-up) are left empty." if run.warmup_epochs else ""))
    return plot


PHASE_ORDER = ("seconds_train", "seconds_divide", "seconds_train_net1", "seconds_train_net2")
PHASE_NAMES = {"seconds_train": "warm-up training", "seconds_divide": "division (losses + GMM)",
               "seconds_train_net1": "train net1", "seconds_train_net2": "train net2", "seconds_test": "test"}


def plot_seconds(run: RunData) -> Plot:
    plot = Plot("seconds", "Seconds per phase")
    rows = run.metrics
    found = run.matching(r"seconds_.+")
    phases = sorted(found, key=lambda p: (p == "seconds_test", PHASE_ORDER.index(p) if p in PHASE_ORDER else 9))
    total = column(rows, "seconds")
    if not phases and not np.isfinite(total).any():
        plot.missing = "metrics.csv has no seconds columns"
        return plot
    x = epochs_axis(rows)
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    bottom = np.zeros(len(rows))
    for i, key in enumerate(phases):
        values = np.nan_to_num(column(rows, key), nan=0.0)
        ax.bar(x, values, bottom=bottom, width=0.8, color="0.55" if key == "seconds_test" else f"C{i}",
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
    seconds_total = num(run.summary.get("seconds_total"))
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
    plot = Plot("confusion", "Given vs predicted label of the most suspicious samples")
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
        names = [_plain(name if len(name) <= 12 else name[:11] + "…") for name in names]
        long_names = max(map(len, names)) > 2
        ax.set_xticks(range(n_classes), names, rotation=45 if long_names else 0,
                      ha="right" if long_names else "center", fontsize=8)
        ax.set_yticks(range(n_classes), names, fontsize=8)
    knn = bool(run.summary.get("pretraining"))  # no classifier: the predicted class is the neighbours' vote
    ax.set_xlabel("the neighbours' class (weighted kNN vote)" if knn else "predicted label (the model's guess)")
    ax.set_ylabel("given (training) label")
    agree = int(np.trace(matrix))
    ax.set_title(f"{k} most suspicious of {n} training samples: {'the kNN vote' if knn else 'model'} disagrees with "
                 f"the given label for {k - agree}", fontsize=10)
    plot.png = _png_bytes(fig)
    plot.caption = (f"The {k} samples ranked most likely mislabeled in {runs.LABEL_ISSUES} (10% of the training "
                    f"samples, at most {MAX_TOP}, unless --top is given). Off the diagonal: "
                    + ("no classifier was trained; the similarity-weighted vote of the sample's nearest training "
                       "neighbours in the encoder's feature space is another class than the given label." if knn else
                       "the model predicts another class than the given label."))
    if issues.true_label is not None:
        true = issues.true_label[:k]
        wrong = true != given
        fixed = float(np.mean(pred[wrong] == true[wrong])) if wrong.any() else float("nan")
        plot.caption += (f" With the true labels: {float(np.mean(wrong)):.0%} of them are truly mislabeled"
                         + (f", and for {fixed:.0%} of those the prediction is the true label." if math.isfinite(fixed)
                            else "."))
    return plot
