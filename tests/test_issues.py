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
    assert rank_order(np.array([0.2, 0.9, 0.0])).tolist() == [2, 0, 1]


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="label_issues.csv"):
        rank_label_issues(tmp_path)
