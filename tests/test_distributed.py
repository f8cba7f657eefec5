"""torch.distributed under torchrun on CPU (gloo): 2 processes on tiny digits runs."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from cdmix import runs

TINY = ["--no-progress", "--eval-batch-size", "512"]


def _launch(nproc: int, *args: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cdmix", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # never leave a hung rank behind
        raise AssertionError(f"torchrun did not finish in {timeout} s: {proc.communicate()[0][-3000:]}")
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Per-rank batch B/2 on 2 ranks vs batch B on 1: same algorithm, accuracy within 6 points.

    They are not bitwise equal: BatchNorm statistics are per rank (16 vs 32 samples) and each rank
    draws its own crops and flips.
    """
    common = ["train", "--method", "standard", "--epochs", "3", "--noise-rate", "0.2", *TINY]
    one = _launch(1, *common, "--batch-size", "32", "--out", str(tmp_path / "one"))
    two = _launch(2, *common, "--batch-size", "16", "--out", str(tmp_path / "two"))
    _finish(one)
    out = _finish(two)
    assert "(2 processes)" in out and out.count("epoch 3/3") == 1  # rank 0 alone prints
    a, b = runs.read_summary(tmp_path / "one"), runs.read_summary(tmp_path / "two")
    assert a["test_acc_last"] > 60 and b["test_acc_last"] > 60
    assert abs(a["test_acc_last"] - b["test_acc_last"]) <= 6.0


@pytest.mark.slow
def test_dividemix_ranks_agree_and_resume_under_torchrun(tmp_path):
    run = tmp_path / "dm"
    args = ["train", "--epochs", "5", "--warmup", "1", "--batch-size", "16", "--out", str(run), *TINY]
    proc = _launch(2, *args)
    deadline = time.time() + 600  # generous: a loaded CI machine is slow
    while time.time() < deadline:
        metrics = run / "metrics.csv"
        if metrics.is_file() and metrics.read_text().count("\n") >= 3 and (run / "checkpoint.pt").is_file():
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    _finish(_launch(2, "resume", str(run), *[]))
    rows = runs.read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    divided = [r for r in rows if not math.isnan(r.get("division_ranks_agree", float("nan")))]
    assert len(divided) == 4 and all(r["division_ranks_agree"] == 1 for r in divided)
    assert (run / "label_issues.csv").is_file()
    assert runs.read_summary(run)["epochs_done"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["josrc", "hybrid"])
def test_other_methods_run_on_two_processes(tmp_path, method):
    out = _finish(_launch(2, "train", "--method", method, "--epochs", "3", "--warmup", "1", "--batch-size", "16",
                          "--out", str(tmp_path / method), *TINY))
    assert "epoch 3/3" in out
    assert runs.read_summary(tmp_path / method)["epochs_done"] == 3
