"""Run folder, exact resume after SIGKILL, clean stop on SIGINT (real tiny runs on digits)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cdmix
from cdmix import runs
from cdmix.config import Config
from cdmix.engine import lr_at
from cdmix.errors import UserError

# --warmup auto with a floor of 2 epochs (19 steps each) and a ceiling of 4: the kill may land before or
# after the warm-up's decision, which the resumed run must replay to the bit.
TINY = ["--epochs", "6", "--warmup", "auto", "--warmup-min-steps", "38", "--warmup-max-steps", "76", "--width", "8",
        "--no-progress"]
TINY_FIXED_WARMUP = ["--epochs", "6", "--warmup", "2", "--width", "8", "--no-progress"]  # --warmup auto: dividemix


def _cdmix(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack
    return subprocess.Popen([sys.executable, "-m", "cdmix", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def _output(proc, timeout: float) -> str:
    """The process's output once it exits; a process still running after ``timeout`` seconds is
    aborted, and the test fails with the stacks of all its threads (where it hung)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"no exit within {timeout} s; its threads:\n{proc.communicate(timeout=60)[0][-6000:]}")


def _rows(run_dir: Path):
    with (run_dir / "metrics.csv").open() as fh:
        return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in csv.DictReader(fh)]


def _wait_rows(run_dir: Path, n: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.csv"
        if path.is_file() and path.read_text().count("\n") >= n + 1 and (run_dir / "checkpoint.pt").is_file():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError("run did not reach the expected epoch in time")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dividemix", "standard", "josrc", "hybrid"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, method):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    tiny = TINY if method == "dividemix" else TINY_FIXED_WARMUP
    proc = _cdmix("train", *tiny, "--method", method, "--out", str(straight))
    proc_k = _cdmix("train", *tiny, "--method", method, "--out", str(killed))
    _wait_rows(killed, 3, proc_k)
    proc_k.send_signal(signal.SIGKILL)
    proc_k.wait()
    out = _output(proc, 300)
    assert proc.returncode == 0, out
    assert len(_rows(killed)) < 6
    resumed = _cdmix("resume", str(killed))
    out = _output(resumed, 300)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a, b = _rows(straight), _rows(killed)
    assert len(a) == len(b) == 6
    assert a == b  # every loss, accuracy and selection figure, to the last bit
    sa, sb = runs.read_summary(straight), runs.read_summary(killed)
    assert sa["test_acc_last"] == sb["test_acc_last"] and sa["test_acc_best"] == sb["test_acc_best"]
    wa = runs.load_checkpoint(straight / "checkpoint.pt")["method"]
    wb = runs.load_checkpoint(killed / "checkpoint.pt")["method"]
    for net_a, net_b in zip(wa["nets"], wb["nets"]):
        assert all(torch.equal(net_a[k], net_b[k]) for k in net_a)
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]  # none left by the kill
    assert (straight / "label_issues.csv").read_text() == (killed / "label_issues.csv").read_text()


@pytest.mark.slow
def test_sigint_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    # A shell that starts pytest in the background without job control makes its children ignore
    # SIGINT; the run under test gets the default disposition back, as in a terminal.
    proc = _cdmix("train", *TINY, "--out", str(run), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_rows(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    out = _output(proc, 120)
    assert proc.returncode == 130, out
    assert "cdmix resume" in out and "Traceback" not in out
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 0 <= state["epoch"] < 5
    resumed = _cdmix("resume", str(run))
    out = _output(resumed, 300)
    assert resumed.returncode == 0, out
    assert runs.read_summary(run)["epochs_done"] == 6


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "dm"
    result = cdmix.train(Config(epochs=5, warmup=2, batch_size=32, out=str(out), progress=False))
    return result


def test_run_folder_contents(digits_run):
    run_dir = digits_run.run_dir
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "best.pt", "summary.json", "labels.npz",
                 "division.npz", "label_issues.csv", "README.txt"):
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["device"] == "cpu" and config["model"] == "small_cnn" and config["out"] == str(run_dir)
    summary = runs.read_summary(run_dir)
    for key in ("test_acc_best", "test_acc_last", "epochs_done", "noise_rate_actual", "noise_rate_nominal",
                "seconds_total", "device"):
        assert key in summary
    assert summary["epochs_done"] == 5 and 0 <= summary["test_acc_last"] <= 100
    assert summary["test_acc_best"] >= summary["test_acc_last"]
    assert 0.3 < summary["noise_rate_actual"] < 0.4  # 40% sym over 10 classes: ~36% actually wrong
    rows = runs.read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]  # 1-based, as every epoch number a person reads
    post = rows[-1]
    for key in ("labeled_net1", "labeled_net2", "gmm_mean_clean_net1", "lambda_u_eff", "sel_precision_net1",
                "sel_recall_net1", "sel_auc_net1", "seconds_divide", "seconds_train_net1", "seconds_test",
                "test_acc_net1", "test_acc_net2"):
        assert key in post and post[key] == post[key], key  # present and not NaN
    assert post["gmm_mean_clean_net1"] < post["gmm_mean_noisy_net1"]


def test_label_issues_rank_noisy_samples_first(digits_run):
    issues = cdmix.rank_label_issues(digits_run.run_dir)
    noisy = issues.given_label != issues.true_label
    assert 0.2 < noisy.mean() < 0.5
    # Ranking quality: AUC of "suspicious score" for truly noisy samples, far above chance (0.5).
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(noisy, issues.issue_score) > 0.8
    top = noisy[: int(noisy.sum())]
    assert top.mean() > 0.7  # precision among the top-|noisy| ranked


def test_out_holding_a_run_is_refused(digits_run):
    with pytest.raises(UserError, match="already holds a run"):
        cdmix.train(Config(epochs=2, warmup=1, out=str(digits_run.run_dir), progress=False))


def test_resume_without_checkpoint_and_corrupt_checkpoint(tmp_path, digits_run):
    with pytest.raises(UserError, match="not a cdmix run folder"):
        cdmix.resume(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "labels.npz"):
        (broken / name).write_bytes((digits_run.run_dir / name).read_bytes())
    with pytest.raises(UserError, match="no checkpoint.pt"):
        cdmix.resume(broken)
    good = (digits_run.run_dir / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    with pytest.raises(UserError, match="damaged or truncated"):
        cdmix.resume(broken)


def _collapse_at_last_epoch(monkeypatch, epochs):
    """The test accuracy of the last epoch is made 0% (a collapse the run does not recover from);
    training is real. Returns the mean softmax of the nets on the training part after each epoch."""
    from cdmix.engine import Trainer

    real, seen = Trainer.evaluate, []

    def evaluate(self):
        row = real(self)
        probs = [torch.softmax(z, 1) for z in self.method.predict_logits(self.train.images, 256)]
        seen.append(torch.stack(probs).mean(0).numpy())
        if len(seen) == epochs:
            row["test_acc"] = 0.0
        return row

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return seen


@pytest.mark.parametrize("folder", [True, False])
def test_a_run_that_ends_collapsed_is_scored_with_its_best_nets(tmp_path, monkeypatch, folder):
    from cdmix.data.sources import load_source
    from cdmix.issues import collapse_caution

    seen = _collapse_at_last_epoch(monkeypatch, epochs=3)
    raw = load_source("digits", "")
    settings = dict(method="standard", epochs=3, batch_size=32, val_fraction=0.0, progress=False,
                    test_images=raw.test_images, test_labels=raw.test_labels,
                    **({"out": str(tmp_path / "run")} if folder else {}))
    result = cdmix.train(raw.train_images, raw.train_labels, **settings)
    summary = result.summary
    best = summary["test_acc_best_epoch"]
    assert summary["ended_collapsed"] and summary["collapse_warnings"] == 1 and best < 3
    assert summary["scored_epoch"] == best
    assert np.allclose(result.scores["pred_probs"], seen[best - 1], atol=1e-6)
    assert not np.allclose(result.scores["pred_probs"], seen[-1], atol=1e-3)  # not the collapsed final nets
    assert f"epoch {best}, its best" in collapse_caution(summary)
    if folder:  # the exported nets are the best ones too, and summary.json says so
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["scored_epoch"] == best
        model = cdmix.load_model(tmp_path / "run")
        assert np.allclose(model(raw.train_images), seen[best - 1], atol=1e-5)


def test_a_drop_that_chance_makes_on_few_images_is_no_collapse():
    from cdmix.engine import chance_drop

    assert chance_drop(66.67, 30) == pytest.approx(24.3, abs=0.1)  # 7 of 30 images
    assert chance_drop(50.0, 1017) < 10 < chance_drop(100.0, 16)  # the 10-point default rules on a real test set


def test_a_run_that_did_not_collapse_is_scored_with_its_final_nets(tmp_path):
    result = cdmix.train(Config(method="standard", epochs=2, batch_size=32, out=str(tmp_path / "ok"),
                                progress=False))
    assert result.summary["ended_collapsed"] is False and result.summary["scored_epoch"] == 2


def test_a_division_method_on_few_images_from_scratch_is_cautioned(caplog):
    from cdmix.data.sources import load_source
    from cdmix.engine import small_data_caution

    caution = small_data_caution(Config(method="dividemix"), 300)
    assert "only 300 training images" in caution and "`cdmix pretrain`" in caution
    assert small_data_caution(Config(method="standard"), 300) is None
    assert small_data_caution(Config(method="dividemix", pretrained="w.pt"), 300) is None
    assert small_data_caution(Config(method="hybrid"), 5000) is None
    raw = load_source("digits", "")
    with caplog.at_level("WARNING", logger="cdmix"):
        cdmix.find_label_issues(raw.train_images[:300], raw.train_labels[:300], epochs=2, warmup=1)
    assert any("only 300 training images" in r.getMessage() for r in caplog.records)


def test_lr_schedules():
    step = Config(lr=0.02, epochs=10, lr_step=5)
    assert lr_at(step, 4) == 0.02 and lr_at(step, 5) == pytest.approx(0.002)
    cos = Config(lr=0.1, epochs=10, schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 5) == pytest.approx(0.05)
    assert lr_at(cos, 9) < lr_at(cos, 8)


def test_standard_method_trains(tmp_path):
    result = cdmix.train(Config(method="standard", epochs=3, batch_size=32, noise_rate=0.2, out=str(tmp_path / "ce"),
                                progress=False))
    assert result.test_acc_best > 60
    assert np.isfinite([r["train_loss"] for r in result.metrics]).all()


def test_validation_split_selects_best_and_rollback_restores_it(tmp_path):
    """A tiny collapse threshold makes every dip a 'collapse': each is flagged and rolled back."""
    result = cdmix.train(Config(method="standard", epochs=6, batch_size=32, val_fraction=0.2, lr=0.1,
                                collapse_drop=0.01, on_collapse="rollback", out=str(tmp_path / "rb"),
                                progress=False))
    rows = result.metrics
    summary = result.summary
    assert summary["selected_by"] == "val_acc" and summary["num_val"] == round(0.2 * 1347)
    assert all("val_acc" in r for r in rows)
    flagged = [r for r in rows if int(r["collapse"]) == 1]
    assert flagged, "with a 0.01-point threshold some epoch must dip below the best"
    assert all(int(r.get("rollback", 0)) == 1 for r in flagged)
    state = torch.load(tmp_path / "rb" / "checkpoint.pt", weights_only=False)
    assert state["collapse_count"] == len(flagged)
    assert state["method"]["damping"] == pytest.approx(0.5 ** len(flagged))
    best = torch.load(tmp_path / "rb" / "best.pt", weights_only=False)
    assert best["epoch"] + 1 == summary["selected_epoch"]  # the checkpoint's index is 0-based, the summary 1-based
    assert max(float(r["val_acc"]) for r in rows) == pytest.approx(best["best_acc"])
