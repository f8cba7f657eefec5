"""benchmarks/ranking_scores.py: other scores of the same pred_probs against the true label errors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ranking_scores  # noqa: E402


def _run_folder(path: Path, pred_probs: np.ndarray, given: np.ndarray, true: np.ndarray | None) -> Path:
    path.mkdir()
    np.save(path / "pred_probs.npy", pred_probs.astype(np.float32))
    fields = ["rank", "index", "given_label", "clean_prob"] + (["true_label"] if true is not None else [])
    with open(path / "label_issues.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for rank, i in enumerate(np.random.default_rng(0).permutation(len(given))):  # rows in any order
            row = {"rank": rank + 1, "index": i, "given_label": given[i], "clean_prob": pred_probs[i, given[i]]}
            if true is not None:
                row["true_label"] = true[i]
            writer.writerow(row)
    return path


def test_a_run_whose_nets_doubt_exactly_the_wrong_labels_ranks_perfectly(tmp_path, capsys):
    true = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    given = true.copy()
    given[[1, 4]] = [0, 2]
    pred_probs = np.full((8, 3), 0.05)
    pred_probs[np.arange(8), true] = 0.9  # the nets believe the true class
    run = _run_folder(tmp_path / "run", pred_probs, given, true)
    table = ranking_scores.main([str(run)])
    assert "| run | self-confidence | 1.000 | 1.000 |" in table
    assert "| run | 1 - clean_prob | 1.000 | 1.000 |" in table
    assert table in capsys.readouterr().out


def test_class_adjustment_lifts_a_class_the_nets_are_shy_of():
    # class 1 is always predicted with low confidence, so plain self-confidence ranks its clean
    # samples above the truly wrong one of class 0; dividing by each class's mean confidence does not.
    given = np.array([0, 0, 0, 1, 1, 1])
    pred_probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    wrong = np.array([False, False, True, False, False, False])
    s = ranking_scores.scores(pred_probs, given, clean_prob=np.zeros(6))
    assert ranking_scores.ranking_quality(s["self-confidence"], wrong)[1] == 0.0
    assert ranking_scores.ranking_quality(s["class-adjusted self-confidence"], wrong) == (1.0, 1.0)


def test_a_run_without_true_labels_is_refused_in_one_line(tmp_path):
    run = _run_folder(tmp_path / "mine", np.full((4, 2), 0.5), np.array([0, 1, 0, 1]), None)
    with pytest.raises(SystemExit, match="no true_label column"):
        ranking_scores.main([str(run)])
