"""Ranked suspected label errors: every training sample, most likely mislabeled first.

How each sample is scored (``score_samples``), once training has ended, by the final nets (the
averaged nets where a method averages them), in eval mode without augmentation:

- ``pred_probs``: the mean over the nets of their softmax, N x C, in the dataset's training order;
- ``issue_score`` = 1 - ``pred_probs[i, given label]``: how little the final nets believe the given
  label (cleanlab's "self-confidence" label quality, turned into a suspicion score); the ranking;
- ``clean_prob``: the probability that the given label is right, from DivideMix's two-component
  GMM fitted, per net, to the min-max normalised per-sample losses of the samples the nets were
  trained on, averaged over the nets; ``clean_prob < 0.5`` is the default flagged set.

- ``knn_disagreement`` (a column beside them): the share of the sample's ``--knn-disagreement-k``
  nearest training neighbours (cosine, in the final nets' feature space: each net's input to its
  classifier, the share averaged over the nets) whose given label differs from its own, each
  neighbour weighted by exp(cosine / ``--knn-temperature``) so that equal shares do not tie
  (SimiFeat's kNN signal; REFERENCE §7). The nets' space, not that of the encoder a run may start from: the
  encoder's score is already in its pretraining run's label_issues.csv, and this one is there for
  runs from scratch too.

A `cdmix pretrain` run trains no classifier: its label_issues.csv ranks by kNN label disagreement in
the encoder's feature space (issue_score = that share, clean_prob = 1 - it, predicted = the
neighbours' majority class, scored = ``knn-encoder``; ``score_note`` says so to the reader).

Samples held out by ``--val-fraction`` are scored by the same nets (their losses normalised with
the training part's range, then the same GMM); the ``scored`` column says ``in-sample`` (the nets
trained on this sample with its given label, so a label the nets memorised looks clean) or
``held-out`` (never trained on: an out-of-sample score).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cdmix.ensemble import softmax_np as softmax  # row-wise softmax, float64
from cdmix.errors import UserError
from cdmix.atomic import atomic_write, check_output
from cdmix.runs import LABEL_ISSUES
from cdmix.safetext import neutralise_cell, neutralise_path, printable, restore_cell

COLUMNS = ("rank", "index", "id", "given_label", "given_class", "predicted_label", "predicted_class", "clean_prob",
           "issue_score", "knn_disagreement", "scored", "true_label", "true_class")
FLAG_THRESHOLD = 0.5  # the default flagged set: clean_prob below this
# Text from the user's data: written spreadsheet-safe (a leading = + - @ gets a ' before it, as the OWASP
# CSV-injection guidance says) and given back as it was by rank_label_issues.
TEXT_COLUMNS = ("id", "given_class", "predicted_class", "true_class")


@dataclass
class LabelIssues:
    """Arrays of equal length N, sorted by ``issue_score`` descending (most suspicious first).

    index: int64 position in the dataset's training order (the row of pred_probs.npy); ids: what
    names the sample in the user's data (a path relative to the data folder, or an id column), or
    None where ``index`` is the name; ``*_class``: class names; ``scored``: "in-sample" or
    "held-out"; ``true_label`` / ``true_class``: only where the true labels are known.
    """

    index: np.ndarray
    given_label: np.ndarray
    predicted_label: np.ndarray
    clean_prob: np.ndarray
    issue_score: np.ndarray
    true_label: np.ndarray | None
    ids: np.ndarray | None = None
    given_class: np.ndarray | None = None
    predicted_class: np.ndarray | None = None
    scored: np.ndarray | None = None
    true_class: np.ndarray | None = None
    knn_disagreement: np.ndarray | None = None  # after training: kNN label disagreement in the nets' features

    def __len__(self) -> int:
        return len(self.index)

    @property
    def flagged(self) -> np.ndarray:
        """bool (N,): the default flagged set, ``clean_prob < 0.5``."""
        return self.clean_prob < FLAG_THRESHOLD


@dataclass
class LabelIssueResult:
    """What ``cdmix.find_label_issues`` finds, for every sample in the order given (length N).

    ranking: all N indices, most suspicious first (highest ``issue_score``); issue_score,
    clean_prob (N,), pred_probs (N x C, the final nets' mean softmax, in-sample), given_label,
    predicted_label (N,), flagged (N,) bool = clean_prob < 0.5, class_names, run (the RunResult).
    """

    ranking: np.ndarray
    issue_score: np.ndarray
    clean_prob: np.ndarray
    pred_probs: np.ndarray
    given_label: np.ndarray
    predicted_label: np.ndarray
    flagged: np.ndarray
    class_names: list[str]
    run: object = None

    @property
    def issues(self) -> np.ndarray:
        """The flagged samples' indices, most suspicious first."""
        return self.ranking[self.flagged[self.ranking]]

    @classmethod
    def from_run(cls, run) -> "LabelIssueResult":
        scores = run.scores
        given = np.asarray(run.labels, dtype=np.int64)
        return cls(ranking=rank_order(scores["issue_score"]), issue_score=scores["issue_score"],
                   clean_prob=scores["clean_prob"], pred_probs=scores["pred_probs"], given_label=given,
                   predicted_label=scores["pred_probs"].argmax(1), flagged=scores["clean_prob"] < FLAG_THRESHOLD,
                   class_names=list(run.class_names), run=run)


def score_samples(logits_per_net: Sequence[np.ndarray], labels: np.ndarray, fit_mask: np.ndarray | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Score every sample's given label with the final nets (see the module docstring).

    Args:
        logits_per_net: one N x C array of logits per net.
        labels: (N,) int given labels.
        fit_mask: (N,) bool, the samples the nets were trained on (the GMM is fitted on them and
            their loss range normalises everyone's); default all.
        seed: random_state of the GMM.

    Returns:
        {"pred_probs": N x C float32, "issue_score": (N,), "clean_prob": (N,), "loss": (N,) mean
        CE over the nets} (float64 unless said).
    """
    from cdmix.ensemble import ensemble_probs
    from cdmix.selection import fit_gmm_clean_prob, gmm_posterior_from_params

    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    fit_mask = np.ones(n, dtype=bool) if fit_mask is None else np.asarray(fit_mask, dtype=bool)
    probs = [softmax(z) for z in logits_per_net]
    rows = np.arange(n)
    clean, losses = [], []
    for p in probs:
        loss = -np.log(np.clip(p[rows, labels], 1e-30, None))
        losses.append(loss)
        lo, hi = float(loss[fit_mask].min()), float(loss[fit_mask].max())
        norm = np.clip((loss - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros(n)
        _, params = fit_gmm_clean_prob(norm[fit_mask], seed=seed)
        clean.append(gmm_posterior_from_params(norm, params))
    pred_probs = ensemble_probs(logits_per_net, per_net=probs)  # the one ensemble rule (cdmix.ensemble)
    return {"pred_probs": pred_probs.astype(np.float32), "issue_score": 1.0 - pred_probs[rows, labels],
            "clean_prob": np.mean(clean, axis=0), "loss": np.mean(losses, axis=0)}


def rank_order(issue_score: np.ndarray) -> np.ndarray:
    """Positions sorted from most to least suspicious (highest score first); ties keep dataset order."""
    return np.argsort(-np.asarray(issue_score, dtype=np.float64), kind="stable")


def _names(labels, class_names) -> list[str]:
    return [class_names[int(v)] if 0 <= int(v) < len(class_names) else "" for v in labels]


def write_label_issues(path: Path, index, given_label, predicted_label, clean_prob, true_label=None, *,
                       issue_score=None, ids=None, class_names=None, scored=None, knn_disagreement=None) -> None:
    """Write label_issues.csv: one row per sample, most suspicious first (columns: ``COLUMNS``;
    ``id`` only with ``ids``, ``*_class`` only with ``class_names``, ``scored`` only with ``scored``,
    ``knn_disagreement`` only with it, ``true_*`` only with ``true_label``). ``issue_score`` defaults
    to ``1 - clean_prob``; the rows are ranked by it."""
    clean_prob = np.asarray(clean_prob, dtype=np.float64)
    issue_score = 1.0 - clean_prob if issue_score is None else np.asarray(issue_score, dtype=np.float64)
    order = rank_order(issue_score)
    present = {"id": ids is not None, "given_class": class_names is not None,
               "predicted_class": class_names is not None, "scored": scored is not None,
               "knn_disagreement": knn_disagreement is not None,
               "true_label": true_label is not None, "true_class": true_label is not None and class_names is not None}
    columns = [c for c in COLUMNS if present.get(c, True)]
    values = {
        "rank": np.arange(1, len(order) + 1), "index": np.asarray(index)[order],
        "id": None if ids is None else [ids[i] for i in order],
        "given_label": np.asarray(given_label)[order], "predicted_label": np.asarray(predicted_label)[order],
        "clean_prob": [f"{v:.9g}" for v in clean_prob[order]], "issue_score": [f"{v:.9g}" for v in issue_score[order]],
        "scored": None if scored is None else np.asarray(scored)[order],
        "knn_disagreement": None if knn_disagreement is None else
        [f"{v:.9g}" for v in np.asarray(knn_disagreement, dtype=np.float64)[order]],
        "true_label": None if true_label is None else np.asarray(true_label)[order],
    }
    if class_names is not None:
        values["given_class"] = _names(values["given_label"], class_names)
        values["predicted_class"] = _names(values["predicted_label"], class_names)
        if true_label is not None:
            values["true_class"] = _names(values["true_label"], class_names)
    for name in TEXT_COLUMNS:  # spreadsheet-safe (CSV injection); rank_label_issues restores them
        if values.get(name) is not None:
            values[name] = [neutralise_cell(str(v)) for v in values[name]]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(zip(*(values[c] for c in columns)))
    atomic_write(Path(path), out.getvalue())


def rank_label_issues(run_dir: str | Path, top: int | None = None) -> LabelIssues:
    """Read a run's ranked suspected label errors (most suspicious first) as arrays.

    run_dir: a finished (or interrupted and resumed) cdmix run folder holding label_issues.csv.
    top: keep only the first ``top`` rows.
    """
    path = Path(run_dir) / LABEL_ISSUES
    if not path.is_file():
        raise UserError(f"{run_dir} has no {LABEL_ISSUES}; it is written when a run ends")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}); the file is damaged") from None
    rows = rows[:top] if top is not None else rows
    has_true = bool(rows) and "true_label" in rows[0]

    def column(name, dtype):
        try:
            return np.asarray([row[name] for row in rows], dtype=dtype)
        except (KeyError, ValueError, TypeError):
            raise UserError(f"{path}: the {name} column is missing or holds a value that is not a number; "
                            "the file is damaged (it is written again when the run is resumed)") from None

    def optional(name, dtype=str):
        if not rows or name not in rows[0]:
            return None
        if name in TEXT_COLUMNS:
            return np.asarray([restore_cell(row[name] or "") for row in rows], dtype=dtype)
        return column(name, dtype)

    return LabelIssues(
        index=column("index", np.int64),
        given_label=column("given_label", np.int64),
        predicted_label=column("predicted_label", np.int64),
        clean_prob=column("clean_prob", np.float64),
        issue_score=column("issue_score", np.float64),
        true_label=column("true_label", np.int64) if has_true else None,
        ids=optional("id"),
        given_class=optional("given_class"),
        predicted_class=optional("predicted_class"),
        scored=optional("scored"),
        true_class=optional("true_class"),
        knn_disagreement=optional("knn_disagreement", np.float64),
    )


def display_names(issues: LabelIssues) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Given, predicted and true labels as text: class names where the run has them (``3 cat`` when
    the name is not the number itself), else the numbers."""
    def text(labels, names):
        if labels is None:
            return None
        if names is None:
            return np.asarray([str(v) for v in labels])
        return np.asarray([n if n == str(v) else f"{v} {n}" for v, n in zip(labels, names)])

    return (text(issues.given_label, issues.given_class), text(issues.predicted_label, issues.predicted_class),
            text(issues.true_label, issues.true_class))


def score_note(summary: dict) -> str | None:
    """What the issue score is, for a run whose score is not the classifier's (a `cdmix pretrain` run:
    kNN label disagreement in the self-supervised encoder's feature space); None for a classifier run."""
    if summary.get("issue_score_kind") != "knn_disagreement":
        return None
    return ("note: no classifier was trained (a `cdmix pretrain` run): issue_score is the kNN label disagreement in "
            "the self-supervised encoder's feature space (the share of a sample's nearest training neighbours whose "
            "given label differs, each weighted by its similarity), clean_prob = 1 - that share, predicted = the "
            "neighbours' weighted majority class; samples whose every neighbour disagrees tie at 1.0")


def one_class_caution(issues: LabelIssues, share: float = 0.8, min_rows: int = 10) -> str | None:
    """A line for the user when the nets predict one class for at least ``share`` of the rows shown
    (``min_rows`` or more: fewer say little), None otherwise: then the "predicted" column says what the nets learned, not what
    the files show, and is no relabelling suggestion."""
    if len(issues) < min_rows:
        return None
    classes, counts = np.unique(issues.predicted_label, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < share * len(issues):
        return None
    name = str(issues.predicted_class[issues.predicted_label == classes[top]][0]) if issues.predicted_class is not None \
        else str(classes[top])
    return (f"caution: the nets predict '{name}' for {counts[top]} of these {len(issues)} rows: they have not learned "
            "the classes apart, so 'predicted' is no relabelling suggestion (more --epochs, --method standard or a "
            "pretrained backbone; README: 'Your own data')")


def collapse_caution(summary: dict, drop: float = 10.0) -> str | None:
    """A line for the user when the run collapsed and did not recover, None otherwise.

    Such a run is scored with its best epoch's nets (summary.json ``ended_collapsed``,
    ``scored_epoch``); the line says so. A run folder from before that rule (no ``ended_collapsed``)
    was scored by its final nets: the line says those are unreliable when the run had collapse
    warnings and its last test accuracy is ``drop`` points or more below the best.
    """
    count = summary.get("collapse_warnings") or 0
    best, last = summary.get("test_acc_best"), summary.get("test_acc_last")
    accuracies = ("" if best is None or last is None else
                  f" (best {best:.2f}% at epoch {summary['test_acc_best_epoch']}, last {last:.2f}% on the test split)")
    advice = "Too few images for DivideMix? Try --method standard or a pretrained backbone (README: 'Your own data')"
    if "ended_collapsed" in summary:
        if not summary["ended_collapsed"]:
            return None
        return (f"caution: accuracy collapsed in {count} epoch(s) of this run and did not recover{accuracies}; the "
                f"label issues come from the nets of epoch {summary['scored_epoch']}, its best, not from the "
                f"collapsed final ones. {advice}")
    if not count or best is None or last is None or best - last < drop:
        return None
    return (f"caution: accuracy collapsed in {count} epoch(s) of this run{accuracies}; the ranking comes from the "
            f"final nets and is unreliable. {advice}")


def format_table(issues: LabelIssues) -> list[str]:
    """The rows of ``cdmix issues`` as aligned text lines (header first): rank, index, id (where the
    data names its samples), given, predicted, clean_prob, issue_score, scored, true (where known).
    Control characters of names (a file named ``ESC[31m...``) are shown as escapes, never sent raw."""
    given, predicted, true = (None if v is None else [printable(t) for t in v] for v in display_names(issues))
    columns = [("rank", [str(i + 1) for i in range(len(issues))], ">"), ("index", [str(v) for v in issues.index], ">")]
    if issues.ids is not None:
        columns.append(("id", [printable(v) for v in issues.ids], "<"))
    columns += [("given", list(given), "<"), ("predicted", list(predicted), "<"),
                ("clean_prob", [f"{v:.4f}" for v in issues.clean_prob], ">"),
                ("issue_score", [f"{v:.4f}" for v in issues.issue_score], ">")]
    if issues.knn_disagreement is not None:
        columns.append(("knn_disagree", [f"{v:.4f}" for v in issues.knn_disagreement], ">"))
    if issues.scored is not None:
        columns.append(("scored", [printable(v) for v in issues.scored], "<"))
    if true is not None:
        columns.append(("true", list(true), "<"))
    widths = [max([len(name)] + [len(v) for v in values]) for name, values, _ in columns]
    lines = ["  ".join(f"{name:{align}{w}}" for (name, _, align), w in zip(columns, widths)).rstrip()]
    for i in range(len(issues)):
        lines.append("  ".join(f"{values[i]:{align}{w}}" for (_, values, align), w in zip(columns, widths)).rstrip())
    return lines


def cleaned_labels(issues: LabelIssues, fix: str = "drop") -> list[tuple[int, str | None, int]]:
    """The labels to keep after acting on the flagged samples (``clean_prob < 0.5``), in training order.

    fix: "drop" leaves the flagged samples out; "relabel" gives them the predicted label.
    Returns (index, id or None, label) per kept sample, sorted by index.
    """
    if fix not in ("drop", "relabel"):
        raise UserError(f"unknown fix {fix!r}; choose drop or relabel")
    rows = []
    for i in range(len(issues)):
        label = int(issues.given_label[i])
        if issues.flagged[i]:
            if fix == "drop":
                continue
            label = int(issues.predicted_label[i])
        rows.append((int(issues.index[i]), None if issues.ids is None else str(issues.ids[i]), label))
    return sorted(rows)


def write_cleaned_csv(path: str | Path, issues: LabelIssues, class_names: Sequence[str], fix: str = "drop",
                      data_root: Path | None = None, *, run_dir: str | Path | None = None,
                      overwrite: bool = False) -> int:
    """Write the cleaned labels (``cleaned_labels``) as a CSV: ``path,label`` (class names) for data
    whose samples are files (``data_root`` / id, written relative to the CSV's folder, so the CSV is a
    ``--dataset csv`` source), else ``index,label``. Returns the number of rows.

    Spreadsheet-safe: a path beginning with ``=``, ``+``, ``-`` or ``@`` is written ``./path`` (the
    same file), a label or id beginning with one gets a ``'`` before it (``--dataset csv`` reads it
    back as it was). ``path`` is checked by ``atomic.check_output`` (``run_dir``: the run it comes
    from, whose files and data are never replaced); an existing file is replaced only with
    ``overwrite``."""
    import os

    path = check_output(path, "--clean-csv", overwrite=overwrite, run_dir=run_dir)
    rows = cleaned_labels(issues, fix)
    out = io.StringIO()
    writer = csv.writer(out)
    files = data_root is not None and issues.ids is not None
    writer.writerow(["path" if files else ("id" if issues.ids is not None else "index"), "label"])
    for index, sample_id, label in rows:
        name = neutralise_cell(class_names[label] if 0 <= label < len(class_names) else str(label))
        if files:
            target = (Path(data_root) / sample_id).resolve()
            writer.writerow([neutralise_path(os.path.relpath(target, path.resolve().parent)), name])
        else:
            writer.writerow([neutralise_cell(sample_id) if sample_id is not None else index, name])
    atomic_write(path, out.getvalue())
    return len(rows)
