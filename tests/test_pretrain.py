"""`cdmix pretrain` / `cdmix.pretrain` (issue #22) on real tiny digits runs: the loss falls and the kNN
monitor is far above chance; the run folder (encoder, provenance, kNN-ranked label issues, report);
kill + resume to the same bits; every method starts from the encoder via --pretrained RUN_DIR; the
kNN column after training; torchrun with gloo; wrong --pretrained inputs in one line; SupContrast's
schedule by hand."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
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
from cdmix.cli import main
from cdmix.config import Config

# Small and quick, and strong enough that 10 epochs reach a kNN accuracy far above chance (10%).
QUICK = dict(epochs=10, batch_size=128, lr=0.1, width=16, knn_every=5, progress=False)


def _error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished 10-epoch pretraining run on digits (the demo's 40% symmetric noise on the labels)."""
    out = tmp_path_factory.mktemp("pretrain") / "enc"
    return cdmix.pretrain(dataset="digits", out=str(out), **QUICK)


# ------------------------------------------------------------------ the run and its files
def test_pretraining_lowers_its_loss_and_its_knn_accuracy_is_far_above_chance(pretrained):
    rows = runs.read_metrics(pretrained.run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
    losses = [r["nt_xent"] for r in rows]
    assert np.mean(losses[-3:]) < losses[0] - 0.2, losses
    knn = [r["knn_acc"] for r in rows if not math.isnan(r.get("knn_acc", math.nan))]
    assert len(knn) == 2  # every 5 epochs, the last included
    assert pretrained.knn_acc == knn[-1] > 50.0  # chance is 10%, and the bank's labels are 40% noisy
    summary = runs.read_summary(pretrained.run_dir)
    assert summary["knn_acc_last"] == pretrained.knn_acc and summary["issue_score_kind"] == "knn_disagreement"
    config = json.loads((pretrained.run_dir / runs.CONFIG).read_text())
    # SupContrast's settings under the flags given, every training image, no cross-entropy warm-up.
    assert (config["method"], config["schedule"], config["simclr_temperature"], config["weight_decay"],
            config["val_fraction"], config["warmup"]) == ("simclr", "supcon", 0.5, 1e-4, 0.0, 0)
    assert summary["num_val"] == 0 and summary["num_train"] == 1347  # the test split is never trained on


def test_the_encoder_file_and_its_provenance(pretrained):
    from cdmix.models import create_model
    from cdmix.models.encoder import find_encoder, load_encoder
    from cdmix.models.pretrained import sha256_file

    run = pretrained.run_dir
    provenance = json.loads((run / "encoder.json").read_text())
    assert pretrained.encoder == run / provenance["file"] and pretrained.encoder.is_file()
    assert provenance["sha256"] == sha256_file(pretrained.encoder)
    labels_file = runs.read_labels(run)
    assert provenance["train_fingerprint"] == str(labels_file["train_fingerprint"])
    assert (provenance["model"], provenance["width"], provenance["in_channels"], provenance["epochs"],
            provenance["dataset"], provenance["image_size"], provenance["knn_acc_last"]) == (
        "small_cnn", 16, 1, 10, "digits", 8, pretrained.knn_acc)
    assert len(provenance["mean"]) == len(provenance["std"]) == 1 and provenance["std"][0] > 0
    assert find_encoder(run) == (pretrained.encoder, provenance)  # the folder stands for its encoder
    # The model's own names, no classifier, no projection head; the last state of the run's encoder.
    state = runs.load_checkpoint(run / runs.CHECKPOINT)["method"]["nets"][0]
    net = create_model("small_cnn", 10, 1, width=16)
    head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc.")}
    load_encoder(net, pretrained.encoder)
    for key, value in net.state_dict().items():
        if key.startswith("fc."):
            assert torch.equal(value, head[key]), key  # the classifier stays fresh
        else:
            assert torch.equal(value, state[f"encoder.{key}"]), key


def test_label_issues_rank_by_knn_disagreement_and_cdmix_issues_says_so(pretrained, capsys):
    from cdmix.selection import selection_metrics

    issues = cdmix.rank_label_issues(pretrained.run_dir)
    assert len(issues) == 1347 and set(issues.scored) == {"knn-encoder"}
    assert np.all(np.diff(issues.issue_score) <= 0)  # most suspicious first
    np.testing.assert_allclose(issues.clean_prob, 1 - issues.issue_score)
    by_index = np.empty(len(issues))
    by_index[issues.index] = issues.issue_score
    np.testing.assert_allclose(by_index, pretrained.knn_disagreement)
    np.testing.assert_array_equal(pretrained.ranking[:5], issues.index[:5])
    noisy = issues.given_label != issues.true_label
    auc = selection_metrics(~issues.flagged, 1 - issues.issue_score, ~noisy)["auc"]
    assert auc > 0.75  # the flipped labels rank first without a classifier
    assert main(["issues", str(pretrained.run_dir), "--top", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: no classifier was trained") and "kNN label disagreement" in out[0]
    assert len(out) == 7 and all("knn-encoder" in line for line in out[2:])


def test_the_report_draws_the_loss_and_the_knn_accuracy(pretrained, capsys):
    assert main(["report", str(pretrained.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "report-knn.png" in out and "report-training.png" in out
    assert (pretrained.run_dir / "report-knn.png").stat().st_size > 1000
    page = (pretrained.run_dir / "report.html").read_text()
    assert "kNN accuracy (last)" in page and "best test accuracy" not in page
    # one net, no unlabeled loss, no warm-up, no classifier: the captions say only what was drawn
    assert "net2" not in page and "λu_eff × Lu" not in page and "warm-up" not in page
    assert "the model predicts" not in page and "nearest training neighbours in the encoder" in page


def test_a_batch_larger_than_the_data_gives_one_step_per_epoch_and_unlabelled_arrays_work(tmp_path, caplog):
    from sklearn.datasets import load_digits

    images = (load_digits().images[:100] * 15).astype(np.uint8)
    result = cdmix.pretrain(images, out=str(tmp_path / "enc"), epochs=2, width=8, progress=False)  # batch 1024
    assert "more than the 100 training images" in caplog.text
    rows = runs.read_metrics(result.run_dir)
    assert len(rows) == 2 and all(np.isfinite(r["nt_xent"]) and r["nt_xent"] > 0 for r in rows)
    assert result.encoder.is_file() and result.knn_acc is None  # no test set, no labels
    assert not (result.run_dir / runs.LABEL_ISSUES).exists()  # no labels: nothing to disagree with


def test_pretraining_refuses_what_does_not_apply(capsys):
    assert "--method dividemix is for cdmix train" in _error(capsys, "pretrain", "--method", "dividemix")
    line = _error(capsys, "pretrain", "--preset", "c2d-cifar10-sym90")
    assert "training preset" in line and "--preset simclr-cifar10" in line
    assert "--val-fraction must be 0" in _error(capsys, "pretrain", "--val-fraction", "0.1")


# ------------------------------------------------------------------ kill + resume
def _cdmix(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cdmix", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _rows(run_dir: Path):
    with (run_dir / "metrics.csv").open() as fh:
        return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_kill_then_resume_of_pretraining_is_bitwise_identical(tmp_path):
    # Batch 512 > 256: SupContrast's per-step lr warm-up is on, so the resumed epochs replay it too.
    args = ["pretrain", "--epochs", "6", "--batch-size", "512", "--width", "8", "--knn-every", "1", "--no-progress"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _cdmix(*args, "--out", str(straight))
    proc_k = _cdmix(*args, "--out", str(killed))
    deadline = time.time() + 180
    while time.time() < deadline:
        path = killed / "metrics.csv"
        if path.is_file() and path.read_text().count("\n") >= 3 and (killed / "checkpoint.pt").is_file():
            break
        assert proc_k.poll() is None, proc_k.stdout.read()
        time.sleep(0.02)
    proc_k.send_signal(signal.SIGKILL)
    proc_k.wait()
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert len(_rows(killed)) < 6 and not (killed / "encoder.json").exists()
    resumed = _cdmix("resume", str(killed))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resuming" in out, out
    assert _rows(straight) == _rows(killed)  # every loss, lr and kNN accuracy, to the last bit
    for name in ("encoder.safetensors", "label_issues.csv"):
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name
    a, b = (json.loads((d / "encoder.json").read_text()) for d in (straight, killed))
    assert a["sha256"] == b["sha256"] and a["knn_acc_last"] == b["knn_acc_last"]


# ------------------------------------------------------------------ training from the encoder
@pytest.mark.parametrize("method", ["standard", "dividemix", "josrc", "hybrid"])
def test_every_method_starts_all_its_nets_from_the_encoder(pretrained, method, tmp_path):
    """Both nets (and Jo-SRC's mean teacher) hold the encoder and a classifier of their own; a scratch
    run of the same seed holds other weights."""
    from cdmix.engine import start_run
    from cdmix.models.encoder import classifier_name
    from cdmix.models.pretrained import _read_state_dict

    encoder = _read_state_dict(pretrained.encoder)
    common = dict(method=method, epochs=2, warmup=0 if method == "standard" else 1, progress=False)
    trainer = start_run(Config(pretrained=str(pretrained.run_dir), out=str(tmp_path / "from"), **common))
    scratch = start_run(Config(width=16, out=str(tmp_path / "scratch"), **common))
    try:
        assert trainer.config.model == "small_cnn" and trainer.config.width == 16  # from encoder.json
        assert trainer.config.normalization == "encoder"
        assert trainer.data.raw.mean == tuple(json.loads((pretrained.run_dir / "encoder.json").read_text())["mean"])
        heads = []
        for net, other in zip(trainer.method.nets, scratch.method.nets):
            head = classifier_name(net)
            state, other_state = net.state_dict(), other.state_dict()
            assert set(state) - set(encoder) == {k for k in state if k.startswith(f"{head}.")}
            for key, value in encoder.items():
                assert torch.equal(state[key], value), key
            first = next(iter(encoder))  # the first conv
            assert not torch.equal(state[first], other_state[first])
            heads.append(state[f"{head}.weight"])
        if len(heads) == 2:
            assert not torch.equal(heads[0], heads[1])  # a fresh classifier each
        record = json.loads((tmp_path / "from" / "pretrained.json").read_text())
        assert record["pretrained"] == str(pretrained.encoder.resolve())
        assert record["pretrained_encoder"]["run_dir"] == str(pretrained.run_dir.resolve())
    finally:
        trainer.release_lock()
        scratch.release_lock()


def test_a_run_from_the_encoder_trains_and_scores_knn_disagreement_in_its_nets_features(pretrained, tmp_path):
    result = cdmix.train(Config(method="dividemix", epochs=2, warmup=1, pretrained=str(pretrained.encoder),
                                out=str(tmp_path / "dm"), progress=False))
    assert result.summary["pretrained_encoder"]["model"] == "small_cnn"
    issues = cdmix.rank_label_issues(result.run_dir)
    assert issues.knn_disagreement is not None and issues.knn_disagreement.shape == (1347,)
    assert 0 <= issues.knn_disagreement.min() and issues.knn_disagreement.max() <= 1
    np.testing.assert_allclose(np.sort(result.scores["knn_disagreement"]), np.sort(issues.knn_disagreement))
    # The nets' feature space, not the encoder's: the column is not the pretraining run's score.
    assert not np.allclose(result.scores["knn_disagreement"], pretrained.knn_disagreement)


def test_wrong_pretrained_inputs_are_one_line(pretrained, capsys, tmp_path):
    base = ["train", "--epochs", "2", "--warmup", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert "not found" in _error(capsys, *base, "--pretrained", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "is a folder without encoder.safetensors" in _error(capsys, *base, "--pretrained", tmp_path / "empty")
    line = _error(capsys, *base, "--pretrained", pretrained.run_dir, "--model", "preact_resnet18")
    assert "pretrained as --model small_cnn --width 16" in line
    assert "--width 8" in _error(capsys, *base, "--pretrained", pretrained.run_dir, "--width", "8")
    # An encoder pretrained on 1-channel images, for 3-channel data.
    rng = np.random.default_rng(0)
    npz = tmp_path / "rgb.npz"
    np.savez(npz, train_images=rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8), train_labels=np.arange(64) % 4,
             test_images=rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8), test_labels=np.arange(8) % 4)
    line = _error(capsys, *base, "--dataset", "npz", "--data-path", npz, "--pretrained", pretrained.run_dir)
    assert "pretrained on 1-channel images, these have 3" in line
    # A replaced or damaged encoder file.
    copy = Path(shutil.copytree(pretrained.run_dir, tmp_path / "copy"))
    encoder = copy / "encoder.safetensors"
    encoder.write_bytes(encoder.read_bytes()[:-7])
    assert "sha256 differs" in _error(capsys, *base, "--pretrained", copy)
    (copy / "encoder.json").unlink()
    assert "damaged" in _error(capsys, *base, "--pretrained", encoder, "--model", "small_cnn", "--width", "16")


# ------------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_pretraining_under_torchrun_with_two_gloo_ranks_writes_the_encoder(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cdmix",
           "pretrain", "--epochs", "2", "--batch-size", "64", "--width", "8", "--no-progress", "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # never leave a hung rank behind
        raise
    assert proc.returncode == 0, out
    assert "(2 processes)" in out and out.count("epoch 2/2") == 1
    provenance = json.loads((run / "encoder.json").read_text())
    assert provenance["world_size"] == 2 and (run / provenance["file"]).is_file()
    assert all(np.isfinite(r["nt_xent"]) for r in runs.read_metrics(run))
    assert (run / runs.LABEL_ISSUES).is_file()


# ------------------------------------------------------------------ SupContrast's schedule
def test_supcon_schedule_follows_supcontrast_by_hand():
    from cdmix.engine.schedule import lr_at, step_lr

    config = Config(schedule="supcon", lr=0.5, epochs=100)
    eta_min = 0.5 * 0.001
    # util.adjust_learning_rate at the 1-based epoch: epoch 1 already below lr, the last at eta_min.
    assert lr_at(config, 0) == pytest.approx(eta_min + (0.5 - eta_min) * (1 + math.cos(math.pi / 100)) / 2)
    assert lr_at(config, 99) == pytest.approx(eta_min)
    # util.warmup_learning_rate: batch > 256, epochs 1..10, from 0.01 to the cosine's value at epoch 10.
    warm_to = eta_min + (0.5 - eta_min) * (1 + math.cos(math.pi * 10 / 100)) / 2
    assert step_lr(config, 0, 0, 4, 1024) == pytest.approx(0.01)
    assert step_lr(config, 2, 1, 4, 1024) == pytest.approx(0.01 + (1 + 2 * 4) / 40 * (warm_to - 0.01))
    assert step_lr(config, 10, 0, 4, 1024) is None  # after the warm-up: the epoch's cosine value
    assert step_lr(config, 0, 0, 4, 256) is None  # no warm-up at batch 256
    assert step_lr(Config(schedule="cosine", lr=0.5, epochs=100), 0, 0, 4, 1024) is None
