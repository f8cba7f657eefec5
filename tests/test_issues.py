import numpy as np
import pytest

from cdmix.errors import UserError
from cdmix.issues import rank_label_issues, rank_order, write_label_issues


def test_write_and_read_ranked(tmp_path):
    clean_prob = np.array([0.9, 0.1, 0.5, 0.1])
    write_label_issues(tmp_path / "label_issues.csv", index=np.array([10, 11, 12, 13]),
                       given_label=np.array([1, 2, 3, 4]), predicted_label=np.array([1, 0, 3, 2]),
                       clean_prob=clean_prob, true_label=np.array([1, 0, 3, 2]))
    issues = rank_label_issues(tmp_path)
    assert issues.index.tolist() == [11, 13, 12, 10]  # ties keep dataset order
    np.testing.assert_allclose(issues.issue_score, 1 - issues.clean_prob)
    assert issues.true_label.tolist() == [0, 2, 3, 1]
    top = rank_label_issues(tmp_path, top=2)
    assert len(top) == 2 and top.index.tolist() == [11, 13]


def test_rank_order_most_suspicious_first():
    assert rank_order(np.array([0.8, 0.1, 1.0])).tolist() == [2, 0, 1]  # highest issue score first


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="label_issues.csv"):
        rank_label_issues(tmp_path)


def test_score_samples_ranks_by_the_given_labels_probability():
    from cdmix.issues import score_samples

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    logits = np.eye(3)[labels] * 4 + rng.normal(0, 0.5, (200, 3))
    wrong = np.arange(200) < 40
    labels_given = labels.copy()
    labels_given[wrong] = (labels[wrong] + 1) % 3
    nets = [logits, logits + rng.normal(0, 0.1, logits.shape)]
    fit = np.ones(200, dtype=bool)
    fit[-20:] = False  # a held-out part, scored with the same GMM
    scores = score_samples(nets, labels_given, fit)
    assert scores["pred_probs"].shape == (200, 3) and scores["pred_probs"].dtype == np.float32
    np.testing.assert_allclose(scores["pred_probs"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(scores["issue_score"], 1 - scores["pred_probs"][np.arange(200), labels_given], atol=1e-6)
    assert wrong[rank_order(scores["issue_score"])[:40]].all()
    assert (scores["clean_prob"][wrong] < 0.5).all() and (scores["clean_prob"][~wrong] > 0.5).mean() > 0.95


def test_paths_class_names_and_held_out_rows_round_trip(tmp_path):
    write_label_issues(tmp_path / "label_issues.csv", index=np.arange(3), given_label=np.array([0, 1, 1]),
                       predicted_label=np.array([0, 0, 1]), clean_prob=np.array([0.9, 0.2, 0.7]),
                       issue_score=np.array([0.1, 0.8, 0.3]), ids=["cat/a.png", "dog/b,1.png", "dog/c.png"],
                       class_names=["cat", "dog"], scored=np.array(["in-sample", "in-sample", "held-out"]))
    issues = rank_label_issues(tmp_path)
    assert issues.ids.tolist() == ["dog/b,1.png", "dog/c.png", "cat/a.png"]
    assert issues.given_class.tolist() == ["dog", "dog", "cat"] and issues.predicted_class[0] == "cat"
    assert issues.scored.tolist() == ["in-sample", "held-out", "in-sample"] and issues.true_label is None
    assert issues.flagged.tolist() == [True, False, False]
    from cdmix.issues import cleaned_labels, format_table, write_cleaned_csv

    lines = format_table(issues)
    assert lines[0].split()[:5] == ["rank", "index", "id", "given", "predicted"] and "true" not in lines[0]
    assert "dog/b,1.png" in lines[1] and "cat" in lines[1]
    assert cleaned_labels(issues, "drop") == [(0, "cat/a.png", 0), (2, "dog/c.png", 1)]
    assert cleaned_labels(issues, "relabel")[1] == (1, "dog/b,1.png", 0)
    out = tmp_path / "clean" / "labels.csv"
    out.parent.mkdir()
    assert write_cleaned_csv(out, issues, ["cat", "dog"], "drop", data_root=tmp_path / "data") == 2
    assert out.read_text().splitlines() == ["path,label", "../data/cat/a.png,cat", "../data/dog/c.png,dog"]


def test_collapse_caution_only_for_a_run_that_collapsed_and_stayed_down():
    from cdmix.issues import collapse_caution

    collapsed = {"collapse_warnings": 7, "test_acc_best": 66.67, "test_acc_best_epoch": 17, "test_acc_last": 44.44}
    line = collapse_caution(collapsed)
    assert line is not None and "unreliable" in line and "epoch 17" in line and "44.44%" in line
    assert collapse_caution({**collapsed, "collapse_warnings": 0}) is None
    assert collapse_caution({**collapsed, "test_acc_last": 60.0}) is None  # recovered: within 10 points
    # Runs that record how they ended were scored with their best nets when they ended collapsed.
    assert "nets of epoch 17, its best" in collapse_caution({**collapsed, "ended_collapsed": True, "scored_epoch": 17})
    assert collapse_caution({**collapsed, "ended_collapsed": False, "scored_epoch": 30}) is None


def test_epoch_line_estimates_the_time_left():
    from cdmix.config import Config
    from cdmix.engine import epoch_line

    row = {"epoch": 1, "lr": 0.02, "test_acc": 33.3, "seconds": 22.3}
    assert epoch_line(Config(epochs=300), row, 30.0).endswith("(~1h51m left at this pace)")
    assert "left" not in epoch_line(Config(epochs=3), row, 30.0)  # under a minute: nothing to announce


def test_end_of_training_says_which_nets_ranked_after_warnings_that_did_not_hold(capsys, tmp_path):
    from types import SimpleNamespace

    from cdmix.cli import print_end

    (tmp_path / "metrics.csv").write_text("epoch,test_acc\n1,60.0\n")
    summary = {"test_acc_best": 68.89, "test_acc_best_epoch": 15, "test_acc_last": 51.11, "collapse_warnings": 16,
               "ended_collapsed": False, "scored_epoch": 30, "num_val": 0, "num_test": 45}
    print_end(SimpleNamespace(run_dir=tmp_path, summary=summary, test_acc_best=68.89, test_acc_last=51.11))
    out = capsys.readouterr().out
    assert "16 collapse warning(s) did not hold" in out and "45 images" in out and "final nets (epoch 30)" in out
    print_end(SimpleNamespace(run_dir=tmp_path, summary={**summary, "ended_collapsed": True, "scored_epoch": 15},
                              test_acc_best=68.89, test_acc_last=51.11))
    out = capsys.readouterr().out
    assert "did not hold" not in out and "nets of epoch 15, its best" in out


def test_one_class_caution_when_the_nets_predict_one_class_for_the_rows_shown() -> None:
    from cdmix.issues import LabelIssues, one_class_caution

    def issues(predicted: list[int]) -> LabelIssues:
        n = len(predicted)
        return LabelIssues(index=np.arange(n), given_label=np.zeros(n, dtype=np.int64),
                           predicted_label=np.array(predicted), clean_prob=np.zeros(n), issue_score=np.ones(n),
                           true_label=None, predicted_class=np.array(["airplane", "cat", "ship"])[predicted])

    line = one_class_caution(issues([1] * 8 + [2, 0]))
    assert line is not None and "'cat' for 8 of these 10 rows" in line
    assert one_class_caution(issues([1] * 7 + [2, 0, 2])) is None  # 7 of 10: below 80%
    assert one_class_caution(issues([1] * 9)) is None  # too few rows to say
