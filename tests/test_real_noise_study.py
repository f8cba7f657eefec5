"""The real-noise study's bookkeeping (benchmarks/real_noise_study.py): what its table says about runs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark is part of the checkout, not of the package

import real_noise_study as study  # noqa: E402


def test_drops_count_each_fall_of_five_points_once() -> None:
    # falls 5 below the best at epoch 3, stays down, recovers at 5, falls again at 7 below the new best
    assert study.drops([50, 52, 47, 46, 53, 50, 48, 47.9]) == [3, 7]
    assert study.drops([40, 41, 42]) == []


def test_smoothed_best_is_the_best_window_mean() -> None:
    assert study.smoothed_best([1, 2, 3, 10, 0], window=2) == pytest.approx(6.5)
    assert study.smoothed_best([5.0] * 10) == pytest.approx(5.0)


def test_run_minutes_counts_a_paused_epoch_at_its_phases_median() -> None:
    warmup = [{"seconds": 10.0, "sel_auc_net1": math.nan} for _ in range(3)]
    after = [{"seconds": s, "sel_auc_net1": 0.8} for s in (60.0, 62.0, 5000.0, 61.0)]
    # 3 x 10 warm-up + 60 + 62 + (paused: median 61.5) + 61
    assert study.run_minutes(warmup + after) == pytest.approx((30 + 60 + 62 + 61.5 + 61) / 60)


def test_ablation_methods_are_the_hybrid_with_one_preset_stabiliser() -> None:
    full = study.method_settings("hybrid-stable")
    stabilisers = {k: v for k, v in full.items() if k.startswith("stab_")}
    assert full["method"] == "hybrid" and len(stabilisers) == len(study.STABILISERS)
    for name, field in study.STABILISERS.items():
        assert study.method_settings(name) == {"method": "hybrid", field: stabilisers[field]}
    assert study.method_settings("dividemix") == {"method": "dividemix"}


def test_set_without_tag_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--tag"):
        study.main(["--set", "pretrained=ENC", "--work", str(tmp_path / "w"), "--archive", str(tmp_path / "a")])


def write_run(folder: Path, test_acc: list[float], seconds: float, ranking: float) -> None:
    folder.mkdir(parents=True)
    with (folder / "metrics.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "test_acc", "seconds", "sel_auc_net1"])
        for epoch, acc in enumerate(test_acc):
            writer.writerow([epoch, acc, seconds, "" if epoch < 2 else 0.5 + epoch / 100])
    (folder / "summary.json").write_text(json.dumps({"scored_epoch": len(test_acc)}))
    (folder / "ranking.json").write_text(json.dumps({"ranking_auc": ranking, "precision_at_k": ranking - 0.1}))


def test_table_rows_average_the_seeds_of_a_method(tmp_path: Path) -> None:
    write_run(tmp_path / "josrc-s0", [40, 50, 44] + [45] * 10, 60.0, 0.8)
    write_run(tmp_path / "josrc-s1", [40, 48, 42] + [43] * 10, 180.0, 0.7)
    write_run(tmp_path / "hybrid+per-class-s0", [30, 35, 36] + [37] * 10, 30.0, 0.6)
    text = study.table(study.load_archive(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()[2:]}
    assert list(rows) == ["josrc", "hybrid+per-class"]  # the study's methods first, then the ablation
    josrc = rows["josrc"]
    assert josrc[1] == "0, 1" and josrc[2] == "49.00 ± 1.00" and josrc[3] == "44.00 ± 1.00"
    assert josrc[4] == "5.00 ± 0.00"  # best - last
    # last 10 epochs: all 45 (43); best 10-epoch mean: epochs 2-11 of seed 0 = (50 + 44 + 8 x 45) / 10
    assert josrc[5] == "44.00 ± 1.00" and josrc[6] == "0.40 ± 0.00"
    assert josrc[7] == "s0: 3; s1: 3"  # 44 is 6 below 50, 42 is 6 below 48: a drop at epoch 3
    assert josrc[-1].rstrip(" |") == "26 ± 13"  # 13 epochs x 60 s and x 180 s
    assert rows["hybrid+per-class"][9] == "0.600"


def test_blend_table_reblends_the_last_division_at_each_js_weight(tmp_path: Path) -> None:
    import numpy as np

    folder = tmp_path / "hybrid-stable-s0"
    folder.mkdir()
    (folder / "metrics.csv").write_text("epoch,test_acc,tau_clean\n1,40.0,0.5\n2,41.0,0.9\n")  # tau: the last row's
    (folder / "config.json").write_text(json.dumps({"p_threshold": 0.5, "stab_per_class_threshold": True}))
    # 4 clean then 2 noisy; the GMM ranks them perfectly, the JS likelihood ranks one noisy sample first
    noisy = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    gmm = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    js = np.array([0.95, 0.92, 0.5, 0.4, 0.99, 0.3])
    np.savez(folder / "division.npz", is_noisy=noisy, gmm_prob=gmm, js_clean_likelihood=js,
             selected=np.array([1, 1, 1, 0, 0, 0], dtype=bool))
    (tmp_path / "josrc-s0").mkdir()
    np.savez(tmp_path / "josrc-s0" / "division.npz", is_noisy=noisy, clean_prob=gmm)  # no blend: no rows
    lines = study.blend_table(tmp_path, weights=(0.0, 1.0)).splitlines()[2:]
    cells = [line.strip("| ").split(" | ") for line in lines]
    assert [c[1] for c in cells] == ["0", "1", "as run (per-class thresholds)"]
    # w = 0: the GMM alone, threshold 0.5: the 4 clean ones, a perfect ranking
    assert cells[0][2:] == ["1.000", "4", "1.000", "1.000"]
    # w = 1: the JS likelihood alone (4 of its 8 clean-noisy pairs in order), threshold tau = 0.9:
    # two clean and one noisy kept
    assert cells[1][2] == "0.500" and cells[1][3:] == ["3", "0.667", "0.500"]
    assert cells[2][3:] == ["3", "1.000", "0.750"]


def test_teacher_stats_of_hand_made_logits() -> None:
    import numpy as np

    # 4 images, 2 classes; the teacher says class 0 for the first three, class 1 for the last
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    given = np.array([0, 1, 1, 1])
    # image 1 is wrongly labeled 1 (the teacher finds its true 0); image 2 is labeled right, the teacher misses it
    true = np.array([0, 0, 1, 1])
    st = study.teacher_stats(logits, given, true, temperature=0.5)
    p0 = 1 / (1 + np.exp(-2.0))
    assert st["confidence"] == pytest.approx((2 * p0 + 1 / (1 + np.exp(-1.0)) + 1 / (1 + np.exp(-3.0))) / 4)
    # sharpening with T = 0.5 squares and renormalises: it raises the top probability
    assert st["sharpened"] > st["confidence"]
    assert st["agrees_given"] == pytest.approx(2 / 4) and st["accuracy"] == pytest.approx(3 / 4)
    assert st["wrong_follows_given"] == 0.0 and st["wrong_finds_true"] == 1.0


def test_teacher_table_reads_the_best_and_last_teachers_of_a_real_hybrid_run(tmp_path: Path, capsys) -> None:
    import numpy as np

    import cdmix

    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(3), 20)
    given = np.where(rng.random(60) < 0.3, (true + 1) % 3, true)
    images = (rng.random((60, 8, 8, 3)) * 60 + true[:, None, None, None] * 60).astype(np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, train_images=images, train_labels=given, train_true_labels=true, test_images=images[:15],
             test_labels=true[:15])
    run = tmp_path / "hybrid-s0"
    cdmix.train(cdmix.Config(dataset="npz", data_path=str(data), method="hybrid", model="preact_resnet18",
                             width=2, epochs=3, warmup=1, batch_size=16, val_fraction=0.0, out=str(run),
                             progress=False, device="cpu"))
    assert study.main(["--teachers", str(run)]) == 0
    out = capsys.readouterr().out  # the training's own lines first, then the table
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| hybrid-s0 |")]
    summary = json.loads((run / "summary.json").read_text())
    assert [r[1] for r in rows] == [str(summary["test_acc_best_epoch"]), "3"]  # best.pt, then checkpoint.pt
    for r in rows:
        top, sharpened = float(r[2]), float(r[3].split()[0])
        assert 1 / 3 <= top <= sharpened <= 1.0 and 0.0 <= float(r[5]) <= 1.0
