"""The arrays-in API (cdmix.train / cdmix.find_label_issues on arrays) and cdmix.load_model."""

import numpy as np
import pytest

import cdmix
from cdmix.data.noise import make_noisy_labels
from cdmix.data.sources import load_source
from cdmix.errors import UserError


@pytest.fixture(scope="module")
def digits():
    raw = load_source("digits", "unused")
    noisy = make_noisy_labels(raw.train_labels, 10, "sym-exclusive", 0.3, seed=0)
    return raw, noisy


@pytest.mark.slow
def test_find_label_issues_on_digit_arrays(digits, tmp_path, one_thread):
    raw, noisy = digits
    wrong = noisy != raw.train_labels
    issues, result = cdmix.find_label_issues(raw.train_images[..., 0], noisy, epochs=10, warmup=4, batch_size=32,
                                             return_result=True)
    assert not any(tmp_path.iterdir()) and result.run.run_dir is None  # nothing written
    n = len(noisy)
    assert sorted(result.ranking.tolist()) == list(range(n)) and result.pred_probs.shape == (n, 10)
    assert np.all(np.diff(result.issue_score[result.ranking]) <= 0)  # most suspicious first
    assert issues.tolist() == [i for i in result.ranking if result.flagged[i]]
    assert wrong[issues].mean() > 0.85 and wrong[issues].sum() > 0.8 * wrong.sum()  # precision, recall
    k = int(wrong.sum())
    assert wrong[result.ranking[:k]].mean() > 0.85  # precision at K
    probs = result.run.model(raw.test_images)  # the final nets, in memory
    assert (probs.argmax(1) == raw.test_labels).mean() > 0.85


def test_train_on_arrays_keeps_a_resumable_folder_only_when_asked(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.array(["cat", "dog"] * 20)
    result = cdmix.train(images, labels, method="standard", epochs=1, batch_size=16, ids=[f"img{i}" for i in range(40)],
                         out=str(tmp_path / "run"), progress=False)
    run = result.run_dir
    assert (run / "arrays.npz").is_file() and (run / "pred_probs.npy").is_file()
    assert np.load(run / "pred_probs.npy").shape == (40, 2) and np.load(run / "clean_prob.npy").shape == (40,)
    issues = cdmix.rank_label_issues(run)
    assert set(issues.given_class) == {"cat", "dog"} and set(issues.ids) == {f"img{i}" for i in range(40)}
    model = cdmix.load_model(run)
    assert model.class_names == ["cat", "dog"]
    np.testing.assert_allclose(model(images), np.load(run / "pred_probs.npy"), atol=1e-5)
    assert model.predict(images[:3, :4, :4]).shape == (3,)  # other sizes are resized
    again = cdmix.resume(run)  # the arrays are the run's data
    assert again.summary["epochs_done"] == 1


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 8, 6), np.uint8), [0, 1, 0, 1], "square"),
    (np.zeros((4, 3, 8, 8), np.uint8), [0, 1, 0, 1], "channels first"),
    (np.zeros((4, 8, 8), np.uint8), [0, 1, 0], "one per image"),
    (np.zeros((4, 8, 8), np.float32) + 0.5, [0, 1, 0, 1], "uint8"),
    (np.zeros((4, 8, 8), np.uint8), [0, 0, 0, 0], "single class"),
])
def test_arrays_that_do_not_fit_are_user_errors(images, labels, message):
    with pytest.raises(UserError, match=message):
        cdmix.train(images, np.asarray(labels), epochs=1)


def test_load_model_of_a_folder_without_exported_nets(tmp_path):
    with pytest.raises(UserError, match="model.json"):
        cdmix.load_model(tmp_path)
