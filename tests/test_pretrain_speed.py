"""benchmarks/pretrain_speed.py (SimCLR epoch vs pure compute, #22) and benchmarks/hybrid_epoch.py (#23's
epoch-time step of benchmarks/gpu_check.sh) at toy sizes: they run, time what they say and write their files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks are part of the checkout, not of the package

import hybrid_epoch  # noqa: E402
import pretrain_speed  # noqa: E402


def test_pretrain_speed_tiny_run_writes_its_figures(tmp_path, capsys):
    threads = torch.get_num_threads()
    out_json, out_md = tmp_path / "p.json", tmp_path / "p.md"
    try:
        result = pretrain_speed.main(["--threads", "1", "--images", "64", "--test", "16", "--size", "16",
                                      "--width", "2", "--batch", "32", "--repeats", "2", "--json", str(out_json),
                                      "--markdown", str(out_md)])
    finally:
        torch.set_num_threads(threads)
    assert result["steps_per_epoch"] == 2 and result["repeats_done"] == 2
    for key in ("epoch", "pure", "views", "monitor"):
        assert len(result["wall_samples"][key]) == 2 and result["seconds"][key] > 0
    assert result["ratio_epoch_over_pure"] == result["seconds"]["epoch"] / result["seconds"]["pure"]
    assert result["host_memory_reuse"] and result["amp"] is False
    assert json.loads(out_json.read_text())["repeats_done"] == 2
    table = out_md.read_text()
    assert "| epoch (`SimCLR.train_epoch`) |" in table and "epoch / pure compute:" in table
    assert "epoch / pure compute:" in capsys.readouterr().out


def test_pretrain_speed_epoch_batches_are_the_methods():
    """The pure-compute steps have the shapes of the epoch's own batches (a last partial batch included)."""
    args = argparse.Namespace(images=70, test=10, size=16, device="cpu", width=2, batch=32, amp=None,
                              compile=False, no_host_reuse=True)
    method, _, _ = pretrain_speed.build(args)
    assert [len(b) for b in pretrain_speed.epoch_batches(method)] == [32, 32, 6]


def test_hybrid_epoch_summary_prices_the_protocol():
    rows = [{"epoch": "1", "seconds": "10"}, {"epoch": "2", "seconds": "50", "labeled_used_net1": "30000"},
            {"epoch": "3", "seconds": "40", "labeled_used_net1": "31000"}]
    args = argparse.Namespace(images=50000, protocol_epochs=120, protocol_warmup=10)
    result = hybrid_epoch.summarise(rows, 1, args)
    assert result["seconds_per_hybrid_epoch"] == 40  # the last hybrid epoch: the first pays autotuning
    assert result["protocol_hours"] == (10 * 10 + 110 * 40) / 3600
    assert "protocol_hours" not in hybrid_epoch.summarise(rows[:1], 1, args)  # no hybrid epoch: no estimate


def test_hybrid_epoch_data_is_learnable_colour_classes(tmp_path):
    path = tmp_path / "d.npz"
    hybrid_epoch.write_npz(path, 200, 50, 8)
    with np.load(path) as data:
        x, y = data["train_images"], data["train_labels"]
        assert x.shape == (200, 8, 8, 3) and x.dtype == np.uint8 and data["test_images"].shape == (50, 8, 8, 3)
    means = x.reshape(200, -1, 3).mean(1)
    same = [np.abs(means[y == c] - means[y == c].mean(0)).max() for c in np.unique(y)]
    assert max(same) < 30  # each class one colour, up to the pixel noise averaged over 64 pixels
