"""The engine's run lifecycle and contract (real tiny runs on digits): evaluate does not reread
--pretrained, resume refuses changed training images / an edited config.json / another world size,
config.json records the automatic warm-up, typed metrics rows, logs without progress bars, and a
method that is no classifier runs through the same engine through its hooks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cdmix
from cdmix import runs
from cdmix.cli import main
from cdmix.config import Config

TINY = dict(width=8, batch_size=64, progress=False)


def _digits_npz(path, noise_train=False):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_images = images[:1200].copy()
    if noise_train:  # half the training images replaced by noise, under the same labels
        rng = np.random.default_rng(0)
        train_images[::2] = rng.integers(0, 241, size=train_images[::2].shape, dtype=np.uint8)
    np.savez(path, train_images=train_images, train_labels=labels[:1200], test_images=images[1200:1500],
             test_labels=labels[1200:1500])
    return path


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """A finished 2-epoch standard run on digits stored as an .npz file."""
    folder = tmp_path_factory.mktemp("lifecycle")
    data = _digits_npz(folder / "digits.npz")
    cdmix.train(Config(dataset="npz", data_path=str(data), method="standard", epochs=2, out=str(folder / "run"),
                       **TINY))
    return folder / "run"


@pytest.fixture
def run(npz_run, tmp_path):
    """A private copy of the run and of its data file (config.json points at the copy)."""
    run = shutil.copytree(npz_run, tmp_path / "run")
    data = shutil.copy(json.loads((run / "config.json").read_text())["data_path"], tmp_path / "digits.npz")
    for name in ("config.json",):
        values = json.loads((run / name).read_text())
        values["data_path"] = str(data)
        (run / name).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["data_path"] = str(data)
    torch.save(state, run / "checkpoint.pt")
    return run


def _error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


def test_resume_accepts_the_unchanged_run(capsys, run):
    assert main(["resume", str(run)]) == 0, capsys.readouterr().err


def test_resume_refuses_training_images_changed_under_the_same_labels(capsys, run):
    _digits_npz(json.loads((run / "config.json").read_text())["data_path"], noise_train=True)
    assert "training images differ" in _error(capsys, "resume", run)


@pytest.mark.parametrize("field, value", [("lambda_u", 0.0), ("p_threshold", 0.9), ("alpha", 1.0), ("lr", 0.5)])
def test_resume_refuses_a_hand_edited_config_naming_the_field(capsys, run, field, value):
    values = json.loads((run / "config.json").read_text())
    values[field] = value
    (run / "config.json").write_text(json.dumps(values))
    message = _error(capsys, "resume", run)
    assert f"{field} is {value!r} there" in message and "edited" in message


def test_an_edited_seed_is_named_as_such_not_as_other_test_images(capsys, run):
    values = json.loads((run / "config.json").read_text())
    values["seed"] += 1
    (run / "config.json").write_text(json.dumps(values))
    message = _error(capsys, "resume", run)
    assert "seed is" in message and "test images" not in message


def test_resume_refuses_another_world_size(capsys, run):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 1  # recorded
    state["world_size"] = 2  # as a run trained under torchrun with 2 processes
    torch.save(state, run / "checkpoint.pt")
    assert "trained with 2 process(es) and is resumed with 1" in _error(capsys, "resume", run)


def test_evaluate_takes_the_nets_from_the_checkpoint_not_the_moved_pretrained_file(capsys, tmp_path):
    from cdmix.models import create_model

    weights = tmp_path / "weights.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_channels=1, width=8).state_dict(), weights)
    run = tmp_path / "run"
    cdmix.train(Config(method="standard", epochs=1, pretrained=str(weights), out=str(run), **TINY))
    record = run / "pretrained.json"
    before = (record.read_bytes(), record.stat().st_mtime_ns)
    weights.rename(tmp_path / "moved.pt")
    assert main(["evaluate", str(run)]) == 0, capsys.readouterr().err
    assert "test_acc" in capsys.readouterr().out
    assert (record.read_bytes(), record.stat().st_mtime_ns) == before


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """DivideMix with --warmup auto whose warm-up the epoch cap ends after epoch 3 of 5."""
    out = tmp_path_factory.mktemp("auto") / "run"
    result = cdmix.train(Config(method="dividemix", epochs=5, warmup="auto", warmup_min_steps=43,
                                warmup_max_steps=86, batch_size=32, width=8, progress=False, out=str(out)))
    return result


def test_config_json_records_the_warmup_and_lr_step_that_ran(auto_run):
    saved = json.loads((auto_run.run_dir / "config.json").read_text())
    warmup = auto_run.summary["warmup_epochs"]
    assert saved["warmup"] == warmup == 3 and saved["lr_step"] == warmup + (5 - warmup) // 2
    lrs = [row["lr"] for row in auto_run.metrics]
    assert lrs[saved["lr_step"] - 1] == 0.02 and lrs[saved["lr_step"]] == pytest.approx(0.002)  # the step that ran
    assert cdmix.resume(auto_run.run_dir).summary["epochs_done"] == 5  # and the run still resumes


def test_a_config_json_one_write_behind_the_checkpoint_is_brought_up_to_date(auto_run, tmp_path):
    run = shutil.copytree(auto_run.run_dir, tmp_path / "run")
    values = json.loads((run / "config.json").read_text())
    values.update(warmup="auto", lr_step=None)  # a kill between the checkpoint and config.json
    (run / "config.json").write_text(json.dumps(values))
    cdmix.resume(run)
    assert json.loads((run / "config.json").read_text())["warmup"] == 3


def test_metrics_rows_are_typed_alike_in_memory_and_read_back(auto_run):
    memory, disk = auto_run.metrics, runs.read_metrics(auto_run.run_dir)
    assert [list(r) for r in memory] == [list(r) for r in disk]  # every row holds every column
    for a, b in zip(memory, disk):
        assert all(isinstance(v, float) for v in a.values())
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    assert math.isnan(memory[0]["labeled_net1"])  # a warm-up epoch has no division: NaN, not a missing key


def test_a_log_file_gets_one_line_per_epoch_and_no_progress_bars(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "cdmix", "train", "--method", "dividemix", "--epochs", "2",
                           "--warmup", "1", "--width", "8", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stderr and "%|" not in proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]


def test_time_left_prices_each_phase_by_its_own_recent_epochs():
    from cdmix.engine.console import TimeLeft, left_text

    clock = TimeLeft()
    clock.record("warm-up", 2.0)
    phases = ["warm-up"] * 9 + ["dividemix"] * 90
    assert clock.estimate(phases) == (18.0, 90)  # the DivideMix epochs are not timed yet: not guessed
    assert "360 epoch(s) of a phase not timed yet" in left_text(*clock.estimate(phases * 4))
    clock.record("dividemix", 10.0)
    assert clock.estimate(phases) == (918.0, 0)
    assert left_text(*clock.estimate(phases)) == "(~15m left at this pace)"
    assert left_text(30.0, 0) is None
    clock.record("dividemix", 5000.0)  # a paused epoch: with two timed, their median is still high...
    assert clock.estimate(phases)[0] == 18.0 + 90 * 2505.0
    for _ in range(2):
        clock.record("dividemix", 12.0)
    assert clock.estimate(phases) == (18.0 + 90 * 12.0, 0)  # ...but the median of (10, 5000, 12, 12) is 12
    for seconds in (20.0, 21.0, 22.0, 23.0, 24.0):
        clock.record("dividemix", seconds)
    assert clock.estimate(phases)[0] == 18.0 + 90 * 22.0  # only the last 5 epochs count


def test_a_method_that_is_no_classifier_runs_through_the_engine(tmp_path, monkeypatch):
    """SimCLR's shape: its own evaluation column, best epoch by it, its own files and end text; the
    engine writes no label issues for it."""
    import cdmix.methods
    from cdmix.methods.standard import Standard

    class Pretraining(Standard):
        def evaluation_row(self, sets):
            return {"knn_acc": 10.0 * (1 + len(self.seen))}

        def selection_key(self, sets):
            return "knn_acc"

        def train_epoch(self, ctx):
            self.seen = getattr(self, "seen", []) + [ctx.epoch]
            return {"train_loss": 1.0 / (1 + ctx.epoch)}

        def write_artifacts(self, outputs):
            outputs.write_file("encoder.txt", f"epochs {len(self.seen)}\n")

        def end_of_run_text(self, summary):
            return [f"encoder: {summary['selected_epoch']}"]

    classes = cdmix.methods.method_classes()
    monkeypatch.setattr(cdmix.methods, "method_classes", lambda: {**classes, "standard": Pretraining})
    result = cdmix.train(Config(method="standard", epochs=2, out=str(tmp_path / "run"), **TINY))
    run = tmp_path / "run"
    assert (run / "encoder.txt").read_text() == "epochs 2\n"
    assert not (run / "label_issues.csv").exists() and result.scores is None
    assert [r["knn_acc"] for r in runs.read_metrics(run)] == [20.0, 30.0]
    assert result.summary["selected_by"] == "knn_acc" and result.summary["selected_epoch"] == 2
    assert result.end_text == ["encoder: 2"]


@pytest.mark.slow
def test_a_run_trained_under_torchrun_with_two_processes_refuses_to_resume_with_one(tmp_path):
    """#27 item 10: the world size sets the global batch; the checkpoint records it, resume compares."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cdmix", "train", "--method", "standard", "--epochs", "1", "--batch-size", "16",
                          "--width", "8", "--no-progress", "--device", "cpu", "--out", str(run)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["world_size"] == 2
    one = subprocess.run([sys.executable, "-m", "cdmix", "resume", str(run)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 2 and "trained with 2 process(es) and is resumed with 1" in one.stderr, one.stderr
