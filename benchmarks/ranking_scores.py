"""Would another score, computed from the same predictions, rank the label errors better?

Reads finished run folders whose data knew the true labels (``label_issues.csv`` has a
``true_label`` column: CIFAR-N, synthetic noise, ``train_true_labels``) and scores each run's
``pred_probs.npy`` in several ways against the truly mislabeled samples:

- ``self-confidence``: 1 - p(given label), cdmix's ``issue_score`` (cleanlab's default);
- ``normalized margin``: max p(other class) - p(given label) (cleanlab's ``normalized_margin``);
- ``class-adjusted self-confidence``: 1 - p(given) after dividing each class's column by that
  class's mean self-confidence and renormalising (cleanlab's ``adjust_pred_probs``);
- ``1 - clean_prob``: the GMM's posterior of a clean label (the flagged set's score).

Prints ROC-AUC and precision at K (K = number truly mislabeled) per run and score.

    python benchmarks/ranking_scores.py runs/cifar10n-dm runs/cifar10n-ce
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_small import ranking_quality  # noqa: E402


def load_run(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pred_probs N x C, given labels, true labels, clean_prob), rows in the training order."""
    with open(run_dir / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "true_label" not in rows[0]:
        raise SystemExit(f"{run_dir}: label_issues.csv has no true_label column (its data had no true labels)")
    pred_probs = np.load(run_dir / "pred_probs.npy").astype(np.float64)
    order = np.array([int(r["index"]) for r in rows])
    given, true, clean = (np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64),
                          np.empty(len(rows)))
    given[order] = [int(r["given_label"]) for r in rows]
    true[order] = [int(r["true_label"]) for r in rows]
    clean[order] = [float(r["clean_prob"]) for r in rows]
    return pred_probs, given, true, clean


def scores(pred_probs: np.ndarray, given: np.ndarray, clean_prob: np.ndarray) -> dict[str, np.ndarray]:
    """Suspicion scores, higher = more likely mislabeled."""
    rows = np.arange(len(given))
    p_given = pred_probs[rows, given]
    others = pred_probs.copy()
    others[rows, given] = -np.inf
    mean_conf = np.array([p_given[given == c].mean() if np.any(given == c) else 1.0
                          for c in range(pred_probs.shape[1])])
    adjusted = pred_probs / np.clip(mean_conf, 1e-12, None)
    adjusted /= adjusted.sum(axis=1, keepdims=True)
    return {"self-confidence": 1.0 - p_given, "normalized margin": others.max(axis=1) - p_given,
            "class-adjusted self-confidence": 1.0 - adjusted[rows, given], "1 - clean_prob": 1.0 - clean_prob}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    args = parser.parse_args(argv)
    lines = ["| run | score | ROC-AUC | precision@K |", "|---|---|---|---|"]
    for run_dir in args.runs:
        pred_probs, given, true, clean = load_run(run_dir)
        wrong = given != true
        for name, score in scores(pred_probs, given, clean).items():
            auc, p_at_k = ranking_quality(score, wrong)
            lines.append(f"| {run_dir.name} | {name} | {auc:.3f} | {p_at_k:.3f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
