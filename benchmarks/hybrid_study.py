"""DivideMix vs Jo-SRC vs the hybrid vs hybrid-stable, and each stabiliser alone on the hybrid.

Two data settings, each with a schedule of 4x its warm-up so the late phase is reached:

* ``digits``: scikit-learn digits (1,347 train / 450 test, 8x8), 50% symmetric noise, small_cnn;
* ``cifar``: real CIFAR-10 images from the subset in ../shared/data with the CIFAR-10N
  ``worse_label`` of those images (about 40% noise), a small PreAct ResNet-18. To fit a 2-core CPU
  budget it uses 120 training images per class and 16 px images (2x2 mean-pooled); all 1,017 test
  images.

Every run is one ``cdmix.train`` call; its result is appended to ``<out>/results.jsonl`` as soon as
it finishes (a rerun skips runs already there), and ``<out>/tables.md`` is rewritten from all
results. Columns: best and last test accuracy, best - last (the collapse measure), the clean
selection ROC-AUC of the last epoch, mean ± std over seeds.

Examples::

    python benchmarks/hybrid_study.py --part digits --out runs/hybrid_study
    python benchmarks/hybrid_study.py --part ablation --out runs/hybrid_study
    python benchmarks/hybrid_study.py --part cifar --out runs/hybrid_study
    python benchmarks/hybrid_study.py --report --out runs/hybrid_study   # tables only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_PER_CLASS = 120  # training images per class taken from the real subset (CPU budget)
CIFAR_SIZE = 16  # images are 2x2 mean-pooled from 32 px (CPU budget)

# One stabiliser at a time on top of the hybrid (values are the ones the study tries).
ABLATION = {
    "temperature_decay": {"stab_temperature_decay": True},
    "teacher_cap 0.9": {"stab_teacher_cap": 0.9},
    "gmm_running_mean (+0.5 blend)": {"stab_gmm_running_mean": True},
    "blend_selection 0.5": {"stab_blend_selection": 0.5},
    "second_warmup 1": {"stab_second_warmup": 1},
    "slow_ema 0.999": {"stab_slow_ema": 0.999},
    "strong_aug": {"stab_strong_aug": True},
    "confidence_penalty 0.1": {"stab_confidence_penalty": 0.1},
    "label_smoothing 0.1": {"stab_label_smoothing": 0.1},
    "per_class_threshold": {"stab_per_class_threshold": True},
    "soft_ood": {"stab_soft_ood": True},
    "swa (last half)": {"stab_swa_start": -1},  # -1: filled in as the middle epoch of the run
}


def stable_settings() -> dict:
    """The stabilisers of the ``hybrid-stable`` preset (the rest of the preset is CIFAR-scale)."""
    from cdmix.config import load_preset

    return {k: v for k, v in load_preset("hybrid-stable").items() if k.startswith("stab_")}


def part_settings(part: str, workdir: Path) -> dict:
    if part in ("digits", "ablation"):
        return dict(dataset="digits", noise_mode="sym", noise_rate=0.5, model="small_cnn", warmup=3, epochs=12,
                    rampup_epochs=3, lambda_u=25.0, schedule="cosine", batch_size=64, lr=0.02)
    if part == "cifar":
        return dict(dataset="npz", data_path=str(cifar10n_npz(workdir)), noise_rate=0.0, model="preact_resnet18",
                    width=8, warmup=3, epochs=12, rampup_epochs=3, lambda_u=25.0, schedule="cosine",
                    batch_size=64, lr=0.02, eval_batch_size=512)
    raise SystemExit(f"unknown part {part}")


def cifar10n_npz(workdir: Path) -> Path:
    """Write (once) the CIFAR-10 subset with CIFAR-10N worst labels as a cdmix ``npz`` dataset."""
    out = workdir / f"cifar10n_worst_subset_{CIFAR_PER_CLASS}x{CIFAR_SIZE}px.npz"
    if out.is_file():
        return out
    import torch

    subset = SHARED / "cifar10-subset" / "cifar10_subset.npz"
    human = SHARED / "cifar-n" / "CIFAR-10_human.pt"
    if not subset.is_file() or not human.is_file():
        raise SystemExit(f"the real data ({subset}, {human}) is absent; the cifar part needs it")
    with np.load(subset) as d:
        arrays = {k: d[k] for k in d.files}
    worse = np.asarray(torch.load(human, weights_only=False)["worse_label"], dtype=np.int64)
    # CPU budget: a fixed class-balanced part of the subset (by true class, seed 0), 2x2 mean-pooled.
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(arrays["train_labels"] == c), CIFAR_PER_CLASS,
                                              replace=False) for c in range(10)]))
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(out, train_images=_pool(arrays["train_images"][keep]),
             train_labels=worse[arrays["train_index"][keep]], train_true_labels=arrays["train_labels"][keep],
             test_images=_pool(arrays["test_images"]), test_labels=arrays["test_labels"])
    return out


def _pool(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x C uint8 -> N x CIFAR_SIZE x CIFAR_SIZE x C by block averaging."""
    f = images.shape[1] // CIFAR_SIZE
    if f <= 1:
        return images
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // f, f, w // f, f, c).astype(np.float64).mean(axis=(2, 4))
    return np.rint(blocks).clip(0, 255).astype(np.uint8)


def variants(part: str, settings: dict) -> list[tuple[str, dict]]:
    if part == "ablation":
        out = []  # the baseline is the digits part's "hybrid" row
        for name, extra in ABLATION.items():
            extra = dict(extra)
            if extra.get("stab_swa_start") == -1:
                extra["stab_swa_start"] = settings["epochs"] // 2
            out.append((f"hybrid + {name}", {"method": "hybrid", **extra}))
        return out
    stable = stable_settings()
    if "stab_swa_start" in stable and stable["stab_swa_start"] > 0:
        stable["stab_swa_start"] = settings["epochs"] // 2
    return [("dividemix", {"method": "dividemix"}), ("josrc", {"method": "josrc"}),
            ("hybrid", {"method": "hybrid"}), ("hybrid-stable", {"method": "hybrid", **stable})]


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(part: str, name: str, seed: int, settings: dict, extra: dict, workdir: Path) -> dict:
    import cdmix

    run_dir = tempfile.mkdtemp(prefix="run_", dir=workdir)
    config = cdmix.Config(**settings, **extra, seed=seed, out=run_dir, overwrite=True, progress=False,
                          device="cpu")
    t0 = time.perf_counter()
    result = cdmix.train(config)
    rows = result.metrics
    last = rows[-1]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"part": part, "name": name, "seed": seed, "best": result.test_acc_best, "last": result.test_acc_last,
            "auc_last": last.get("sel_auc_net1", float("nan")),
            "collapse_flags": int(sum(r.get("collapse", 0) for r in rows)),
            "seconds": time.perf_counter() - t0, "settings": {**settings, **extra}}


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(results: list[dict], part: str, title: str) -> str:
    rows = [r for r in results if r["part"] == part]
    if part == "ablation" and rows:
        seeds = {r["seed"] for r in rows}
        rows = [r for r in results if r["part"] == "digits" and r["name"] == "hybrid" and r["seed"] in seeds] + rows
    if not rows:
        return ""
    names = list(dict.fromkeys(r["name"] for r in rows))
    lines = [f"### {title}", "", "| method | seeds | best | last | best − last | selection AUC (last epoch) | "
             "min/run |", "|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in rows if r["name"] == name]
        lines.append(f"| {name} | {len(rs)} | {fmt([r['best'] for r in rs])} | {fmt([r['last'] for r in rs])} | "
                     f"{fmt([r['best'] - r['last'] for r in rs])} | {fmt([r['auc_last'] for r in rs], 3)} | "
                     f"{np.mean([r['seconds'] for r in rs]) / 60:.1f} |")
    return "\n".join(lines) + "\n"


def write_tables(results: list[dict], out: Path) -> None:
    parts = [("digits", "digits, 50% symmetric noise (small_cnn, 12 epochs, warm-up 3)"),
             ("cifar", f"CIFAR-10 real images ({10 * CIFAR_PER_CLASS} train, 1,017 test, {CIFAR_SIZE} px), "
                       "CIFAR-10N worst labels (PreAct ResNet-18 width 8, 12 epochs, warm-up 3)"),
             ("ablation", "ablation on digits 50% sym: each stabiliser alone on top of the hybrid")]
    text = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
            f"{_threads()}, python {platform.python_version()}", ""]
    text += [table(results, part, title) for part, title in parts]
    (out / "tables.md").write_text("\n".join(t for t in text if t is not None))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["digits", "cifar", "ablation"], action="append")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ablation-seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", action="append", help="run only these variant names")
    parser.add_argument("--out", default="runs/hybrid_study")
    parser.add_argument("--report", action="store_true", help="only rewrite tables.md from results.jsonl")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = load_results(results_path)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report:
        for part in args.part or ["digits", "ablation", "cifar"]:
            settings = part_settings(part, out)
            # seed-major, so a cut-short study still has every variant at the first seeds
            for seed in range(args.ablation_seeds if part == "ablation" else args.seeds):
                for name, extra in variants(part, settings):
                    if args.only and name not in args.only:
                        continue
                    if any(r["part"] == part and r["name"] == name and r["seed"] == seed for r in results):
                        continue
                    print(f"== {part} {name} seed {seed}", flush=True)
                    record = run_one(part, name, seed, settings, extra, out)
                    results.append(record)
                    with results_path.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                    print(f"   best {record['best']:.2f} last {record['last']:.2f} auc {record['auc_last']:.3f} "
                          f"({record['seconds']:.0f}s)", flush=True)
                    write_tables(results, out)
    write_tables(results, out)
    print((out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
