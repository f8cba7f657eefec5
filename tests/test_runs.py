"""The run folder (#15): safe checkpoints, the folder lock, --overwrite, damaged run files."""

import collections
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cdmix import runs
from cdmix.errors import UserError


def test_checkpoint_round_trip_gives_back_numpy_state_and_rng_exactly(tmp_path):
    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()  # a cached Gaussian in the numpy state
    net = torch.nn.Linear(2, 3).state_dict()
    state = {
        "epoch": 4, "method": {"nets": [net], "last_division": {"clean_prob": np.linspace(0, 1, 7),
                                                                "selected": np.array([True, False]),
                                                                "means": np.float64(0.25)},
                               "extra": {"loss_history": [[np.arange(3, dtype=np.float32)], []],
                                         "gmm_state": {"means": [0.1, 0.9], "n": np.int64(5)}}},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state()},
        "best_acc": 51.5, "last_selected": None, "config": {"method": "dividemix", "width": None},
    }
    path = tmp_path / "checkpoint.pt"
    runs.atomic_torch_save(state, path)
    torch.load(path, weights_only=True)  # the file itself is plain data
    back = runs.load_checkpoint(path)
    division = back["method"]["last_division"]
    assert division["clean_prob"].dtype == np.float64 and np.array_equal(division["clean_prob"], np.linspace(0, 1, 7))
    assert division["selected"].dtype == bool and isinstance(division["means"], np.float64)
    assert back["method"]["extra"]["loss_history"][0][0].dtype == np.float32
    assert isinstance(back["method"]["extra"]["gmm_state"]["n"], np.int64)
    assert isinstance(back["method"]["nets"][0], collections.OrderedDict)
    assert all(torch.equal(net[k], back["method"]["nets"][0][k]) for k in net)
    expected = (random.random(), np.random.standard_normal())
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    assert (random.random(), np.random.standard_normal()) == expected


def test_checkpoint_refuses_objects_it_cannot_store_safely(tmp_path):
    with pytest.raises(TypeError, match="method.extra"):
        runs.atomic_torch_save({"epoch": 0, "method": {"extra": {1, 2}}}, tmp_path / "c.pt")
    with pytest.raises(TypeError, match="object"):
        runs.atomic_torch_save({"epoch": 0, "method": np.array([None])}, tmp_path / "c.pt")


def test_planted_checkpoint_payload_does_not_run(tmp_path, plant_payload):
    path, mark = tmp_path / "checkpoint.pt", tmp_path / "ran"
    plant_payload(path, mark)
    with pytest.raises(UserError, match="could run code"):
        runs.load_checkpoint(path)
    assert not mark.exists()


def test_damaged_checkpoint_error_never_suggests_deleting(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runs.atomic_torch_save({"epoch": 0, "method": {}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged or truncated") as info:
        runs.load_checkpoint(path)
    assert "overwrite" not in str(info.value) and "best.pt may still be intact" in str(info.value)


def _make_run(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"dataset": "digits", "method": "standard", "seed": 0}))
    for name in ("checkpoint.pt", "metrics.csv", "summary.json", "events.out.tfevents.1.host.2.0", "report.html",
                 "report-accuracy.png", ".checkpoint.pt.abc123.tmp"):
        (folder / name).write_text("x")
    return folder


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a cdmix run folder") as info:
            runs.prepare_run_dir(folder, overwrite=overwrite)
        assert "--overwrite" not in str(info.value)
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    run = _make_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "plots").mkdir()
    (run / "plots" / "summary.json").write_text("mine")
    with pytest.raises(UserError, match="already holds a run"):
        runs.prepare_run_dir(run, overwrite=False)
    lock = runs.prepare_run_dir(run, overwrite=True)
    lock.release()
    assert sorted(p.name for p in run.iterdir()) == [".cdmix.lock", "README.txt", "notes.txt", "plots"]
    assert (run / "plots" / "summary.json").read_text() == "mine"


def test_a_folder_left_with_only_temporary_files_is_reused_and_cleaned(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")
    runs.prepare_run_dir(folder, overwrite=False).release()
    assert sorted(p.name for p in folder.iterdir()) == [".cdmix.lock", "README.txt"]


def test_stale_temporary_files_are_removed_but_not_the_users(tmp_path):
    run = _make_run(tmp_path / "run")
    (run / ".notes.txt.abc.tmp").write_text("mine")
    runs.remove_stale_temp_files(run)
    names = {p.name for p in run.iterdir()}
    assert ".checkpoint.pt.abc123.tmp" not in names and ".notes.txt.abc.tmp" in names


def test_the_lock_says_who_holds_it(tmp_path):
    with runs.RunLock(tmp_path):
        with pytest.raises(UserError, match=f"in use by another cdmix run \\(pid {os.getpid()} on host"):
            runs.RunLock(tmp_path)
    runs.RunLock(tmp_path).release()  # free again once released


def test_the_lock_of_another_process_is_respected_and_freed_when_it_dies(tmp_path):
    code = ("import sys, time; from cdmix import runs; lock = runs.RunLock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid} "):
            runs.RunLock(tmp_path)
    finally:
        holder.kill()  # like kill -9: the lock goes with the process
        holder.wait()
    runs.RunLock(tmp_path).release()


def test_outputs_may_not_replace_a_runs_own_files(tmp_path):
    run = _make_run(tmp_path / "run")
    with pytest.raises(UserError, match="the run's own summary.json"):
        runs.refuse_run_file(run / "summary.json")
    runs.refuse_run_file(run / "my-report.html")
    runs.refuse_run_file(tmp_path / "summary.json")  # not in a run folder: the user's own name


def test_damaged_run_files_are_one_line_errors(tmp_path):
    run = _make_run(tmp_path / "run")
    (run / "metrics.csv").write_text("epoch,test_acc\n1,50\nthree,60\n")
    with pytest.raises(UserError, match="line 3: epoch 'three' is not a whole number"):
        runs.read_metrics(run)
    with pytest.raises(UserError, match="line 3"):
        runs.MetricsLog(run, start_epoch=2, tensorboard=False)
    (run / "metrics.csv").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="not a readable CSV"):
        runs.read_metrics(run)
    (run / "summary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(UserError, match="summary.json is not text"):
        runs.read_summary(run)
    (run / "summary.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="does not hold a cdmix summary"):
        runs.read_summary(run)
    with pytest.raises(UserError, match="has no labels.npz"):
        runs.read_labels(run)
    np.savez(run / "labels.npz", train_labels=np.arange(1000))
    (run / "labels.npz").write_bytes((run / "labels.npz").read_bytes()[:300])
    with pytest.raises(UserError, match="damaged or truncated"):
        runs.read_labels(run)


def test_resume_without_the_metrics_history_is_refused(tmp_path):
    run = _make_run(tmp_path / "run")
    (run / "metrics.csv").unlink()
    with pytest.raises(UserError, match="holds 0 of the 3 completed epoch"):
        runs.MetricsLog(run, start_epoch=3, tensorboard=False)
    (run / "metrics.csv").write_text("epoch,test_acc\n3,50\n")
    with pytest.raises(UserError, match="holds 1 of the 3 completed epoch"):
        runs.MetricsLog(run, start_epoch=3, tensorboard=False)


def test_lock_file_holder_line_is_rewritten(tmp_path):
    with runs.RunLock(tmp_path):
        first = (tmp_path / runs.LOCK).read_text()
    time.sleep(0.01)
    with runs.RunLock(tmp_path):
        assert (tmp_path / runs.LOCK).read_text().count("\n") == 1 and first.startswith("pid ")
