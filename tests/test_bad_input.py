"""End to end, as a hostile or careless user (#15): planted payloads, shared and damaged run folders,
changed data, edited configs, a GPU run on a CPU machine. Every fault is one `error:` line, exit 2."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import cdmix
from cdmix import runs
from cdmix.cli import main
from cdmix.config import Config
from cdmix.data.types import RawData
from cdmix.engine import PreparedData, check_input_size, check_labels, resume_run
from cdmix.errors import UserError


def _digits_npz(path, change_test=False, change_train=False):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = slice(0, 1200), slice(1200, 1500)
    test_images = images[test].copy()
    train_labels = labels[train].copy()
    if change_test:
        test_images[0, 0, 0] ^= 1  # one pixel of one test image
    if change_train:
        train_labels[:5] = (train_labels[:5] + 1) % 10
    np.savez(path, train_images=images[train], train_labels=train_labels, test_images=test_images,
             test_labels=labels[test])
    return path


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory, one_thread):
    """A finished 2-epoch standard run on digits stored as an .npz file (the user's own data)."""
    folder = tmp_path_factory.mktemp("bad_input")
    data = _digits_npz(folder / "digits.npz")
    cdmix.train(Config(dataset="npz", data_path=str(data), method="standard", epochs=2, width=8, batch_size=64,
                       out=str(folder / "run"), progress=False))
    return folder / "run"


@pytest.fixture
def run(npz_run, tmp_path):
    """A private copy of the run to damage."""
    return shutil.copytree(npz_run, tmp_path / "run")


def _fails(capsys, *argv, message=""):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], lines
    return lines[-1]


def _edit_config(run, **changes):
    values = json.loads((run / "config.json").read_text())
    values.update(changes)
    (run / "config.json").write_text(json.dumps(values))


# ---------------------------------------------------------------- 1. untrusted files run no code
@pytest.mark.parametrize("name, argv", [
    ("checkpoint.pt", ["evaluate"]),
    ("best.pt", ["evaluate", "--checkpoint", "best"]),
    ("checkpoint.pt", ["resume"]),
])
def test_payload_in_a_run_checkpoint_does_not_run(capsys, run, tmp_path, name, argv, plant_payload):
    mark = tmp_path / "payload-ran"
    plant_payload(run / name, mark)
    _fails(capsys, argv[0], run, *argv[1:], message="could run code")
    assert not mark.exists()


def test_payload_in_best_pt_does_not_run_on_rollback(run, tmp_path, plant_payload):
    trainer = resume_run(run)
    try:
        mark = tmp_path / "payload-ran"
        plant_payload(run / "best.pt", mark)
        with pytest.raises(UserError, match="could run code"):
            trainer.rollback({})
        assert not mark.exists()
    finally:
        trainer.release_lock()


# ---------------------------------------------------------------- 3. one run folder, one process
def test_a_second_process_on_the_same_run_folder_is_refused(capsys, run):
    with runs.RunLock(run):
        _fails(capsys, "resume", run, message="is in use by another cdmix run (pid ")
        _fails(capsys, "train", "--out", run, "--overwrite", "--method", "standard", "--epochs", "1", "--no-progress",
               message="is in use by another cdmix run")
    assert (run / "checkpoint.pt").is_file()  # the holder's files are untouched


# ---------------------------------------------------------------- 4. outputs never land on the run
def test_report_output_never_replaces_the_runs_files(capsys, run, tmp_path):
    summary = (run / "summary.json").read_bytes()
    _fails(capsys, "report", run, "--out", run / "summary.json", message="the run's own summary.json")
    assert (run / "summary.json").read_bytes() == summary
    _fails(capsys, "report", run, "--out", tmp_path / "no-such-folder", message="end it with /")
    assert not (tmp_path / "no-such-folder").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "new-folder") + "/"]) == 0
    assert (tmp_path / "new-folder" / "report.html").is_file()


def test_noise_output_that_is_a_folder_or_a_run_file(capsys, run, tmp_path):
    _fails(capsys, "noise", tmp_path, message="is a folder")
    _fails(capsys, "noise", f"{tmp_path}/missing/", message="is a folder")
    assert not (tmp_path / "missing").exists()
    _fails(capsys, "noise", run / "config.json", message="the run's own config.json")
    _fails(capsys, "noise", tmp_path / "n.json", "--seed", "-3", message="--seed must be in [0, 4294967295]")


# ---------------------------------------------------------------- 5. silent wrong results
@pytest.mark.parametrize("change, message", [
    ("test", "test images or labels differ"),
    ("train", "no longer matches the labels"),
])
def test_evaluate_refuses_data_changed_since_training(capsys, run, tmp_path, change, message):
    changed = _digits_npz(tmp_path / "changed.npz", change_test=change == "test", change_train=change == "train")
    _edit_config(run, data_path=str(changed))
    _fails(capsys, "evaluate", run, message=message)


def test_checkpoint_of_another_method_is_refused(capsys, run):
    _edit_config(run, method="dividemix")
    _fails(capsys, "evaluate", run, message="written by a run with method 'standard'")
    _fails(capsys, "resume", run, message="written by a run with method 'standard'")


def test_resume_without_metrics_history_is_refused(capsys, run):
    (run / "metrics.csv").unlink()
    _fails(capsys, "resume", run, message="history is lost")


def test_test_labels_missing_from_training_and_huge_label_ids_warn(caplog):
    images = np.zeros((6, 8, 8, 1), np.uint8)
    raw = RawData(train_images=images, train_labels=np.array([0, 1, 0, 1, 0, 999_999]), test_images=images[:3],
                  test_labels=np.array([0, 1, 7]), class_names=[str(i) for i in range(1_000_000)],
                  mean=(0.5,), std=(0.2,))
    check_labels(PreparedData(raw, {}, np.arange(6), np.arange(0)))
    assert "1 test image(s) have label(s) no training image has (7)" in caplog.text
    assert "the labels go up to 999999 but only 3 different labels occur" in caplog.text


def test_images_too_small_for_the_model_are_refused_before_training():
    images = np.zeros((4, 4, 4, 3), np.uint8)
    raw = RawData(images, np.arange(4) % 2, images, np.arange(4) % 2, ["a", "b"], (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(UserError, match="4px images are too small for josrc_cnn"):
        check_input_size(Config(model="josrc_cnn"), raw)
    check_input_size(Config(model="small_cnn"), raw)


# ---------------------------------------------------------------- 6. a GPU run on a CPU-only machine
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_evaluates_and_resumes_on_the_cpu(capsys, run):
    # device and amp are the machine's to decide: a resume compares every other field with the checkpoint
    _edit_config(run, device="cuda", amp=True)
    code = main(["evaluate", str(run)])
    captured = capsys.readouterr()
    assert code == 0 and "test_acc" in captured.out, captured.err
    assert "trained on cuda, which this machine does not have; using the CPU" in captured.err
    done = runs.read_summary(run)["epochs_done"]
    code = main(["resume", str(run), ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert runs.read_summary(run)["epochs_done"] == done


# ---------------------------------------------------------------- 7. damaged run files
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _wrong_shape(run):
    state = runs.load_checkpoint(run / "checkpoint.pt")
    net = state["method"]["nets"][0]
    key = next(iter(net))
    net[key] = torch.zeros(3, 3)
    runs.atomic_torch_save(state, run / "checkpoint.pt")


@pytest.mark.parametrize("damage, argv, message", [
    (lambda r: (r / "labels.npz").unlink(), ["evaluate"], "has no labels.npz"),
    (lambda r: (r / "labels.npz").unlink(), ["resume"], "has no labels.npz"),
    (lambda r: _truncate(r / "labels.npz"), ["resume"], "labels.npz is damaged or truncated"),
    (lambda r: (r / "label_issues.csv").write_text("rank,index,given_label\n1,x,3\n"), ["issues"],
     "the index column"),
    (lambda r: (r / "label_issues.csv").write_bytes(b"\xff\xfe\x00\x01"), ["issues"], "not a readable CSV"),
    (lambda r: (r / "summary.json").write_bytes(b"\x89PNG\x00\x01"), ["report"], "summary.json is not text"),
    (lambda r: (r / "summary.json").write_bytes(b"\x89PNG\x00\x01"), ["compare"], "summary.json is not text"),
    (_wrong_shape, ["evaluate"], "does not fit this run's model"),
    (lambda r: _truncate(r / "checkpoint.pt"), ["evaluate"], "damaged or truncated"),
    (lambda r: (r / "metrics.csv").write_text("epoch,test_acc\n1,50\nlast,60\n"), ["resume"],
     "epoch 'last' is not a whole number"),
    (lambda r: (r / "metrics.csv").write_text("epoch,test_acc\n1,50\nlast,60\n"), ["report"],
     "epoch 'last' is not a whole number"),
    (lambda r: (r / "config.json").write_bytes(b"\x00\xff"), ["evaluate"], "cannot read run config"),
])
def test_damaged_run_files_are_one_line_errors(capsys, run, damage, argv, message):
    damage(run)
    _fails(capsys, argv[0], run, *argv[1:], message=message)


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, npz_run, one_thread):
    import errno
    import os

    from cdmix import atomic

    replace, calls = os.replace, []

    def full_on_second_checkpoint(src, dst):
        calls.append(str(dst))
        if str(dst).endswith("checkpoint.pt") and sum(c.endswith("checkpoint.pt") for c in calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full_on_second_checkpoint)
    config = json.loads((npz_run / "config.json").read_text())
    out = tmp_path / "full"
    with pytest.raises(UserError, match=f"cannot write {out / 'checkpoint.pt'}: No space left on device"):
        cdmix.train(Config(dataset="npz", data_path=config["data_path"], method="standard", epochs=2, width=8,
                           out=str(out), progress=False))
    assert runs.load_checkpoint(out / "checkpoint.pt")["epoch"] == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(atomic.os, "replace", replace)
    assert cdmix.resume(out).summary["epochs_done"] == 2  # resumes from the kept checkpoint, folder unlocked


# ---------------------------------------------------------------- 8. smaller
def test_run_files_follow_the_umask_and_kills_leave_no_temporary_files(npz_run, run):
    modes = {p.name: p.stat().st_mode & 0o777 for p in npz_run.iterdir() if p.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half")
    cdmix.resume(run)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
