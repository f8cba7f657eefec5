"""CE (standard) vs DivideMix on small real data at the defaults: same model, epochs and seeds, no
per-setting tuning (the warm-up is ``--warmup auto``, every other setting is cdmix's default).

Settings: digits with 40%, 60% and 80% symmetric and 40% asymmetric noise (every setting at its
default: 40 epochs, small_cnn, 10% validation split), and the real CIFAR-10 subset
(../shared/data/cifar10-subset, 32 px) with the real CIFAR-10N worse_label labels, at a CPU budget
(PreAct ResNet-18 of width ``--cifar-width``, ``--cifar-epochs`` epochs; the same for both methods).
Prints a table of test accuracy (best, last; mean ± std over seeds) and how well each run's
label-issue ranking (label_issues.csv's issue_score, every training sample, validation part
included) finds the truly mislabeled samples: ROC-AUC and precision at K (K = number truly
mislabeled). For CE that is the ranking of its own final net (1 - probability of the given label).

    python benchmarks/accuracy_small.py --seeds 3 --threads 1 --out docs/accuracy_small.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import cdmix
from cdmix.config import Config

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; on the GPU machine a git-ignored copy in the checkout (shared/data).
SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data") if p.is_dir()),
              ROOT.parent / "shared" / "data")


def pool2(images: np.ndarray) -> np.ndarray:
    """2x2 mean pooling of uint8 N x H x W x C images (32 px -> 16 px), rounded."""
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // 2, 2, w // 2, 2, c).astype(np.float32).mean(axis=(2, 4))
    return np.round(blocks).astype(np.uint8)


def cifar10n_subset_npz(folder: Path, pool: bool) -> Path:
    """The real CIFAR-10 subset with its real CIFAR-10N worse_label labels, as an npz source."""
    subset = np.load(SHARED / "cifar10-subset" / "cifar10_subset.npz")
    human = torch.load(SHARED / "cifar-n" / "CIFAR-10_human.pt", weights_only=False)
    index = subset["train_index"]
    path = folder / "cifar10n_worst_subset.npz"
    shrink = pool2 if pool else (lambda x: x)
    np.savez(path, train_images=shrink(subset["train_images"]), train_labels=np.asarray(human["worse_label"])[index],
             train_true_labels=subset["train_labels"], test_images=shrink(subset["test_images"]),
             test_labels=subset["test_labels"])
    return path


def settings(folder: Path, quick: bool, pool: bool, cifar_width: int, cifar_epochs: int) -> list[tuple[str, dict]]:
    """(name, Config fields) of each setting: only the data, the noise and (CIFAR) the CPU budget."""
    digits = dict(dataset="digits", **({"epochs": 12} if quick else {}))
    out = [(f"digits {mode} {rate:.0%}", dict(digits, noise_mode=mode, noise_rate=rate))
           for mode, rate in (("sym", 0.4), ("sym", 0.6), ("sym", 0.8), ("asym", 0.4))]
    if (SHARED / "cifar10-subset").is_dir():
        size = "16 px" if pool else "32 px"
        out.append((f"CIFAR-10N worst (real 5.5k subset, {size})",
                    dict(dataset="npz", data_path=str(cifar10n_subset_npz(folder, pool)), model="preact_resnet18",
                         width=cifar_width, epochs=4 if quick else cifar_epochs)))
    return out


def parse_settings(items: list[str]) -> dict:
    """``--set FIELD=VALUE`` items as Config fields: JSON values (numbers, true/false, null, lists), else strings."""
    def value_of(text: str):
        try:
            return json.loads(text)
        except ValueError:
            return text

    return {key: value_of(value) for key, value in (item.split("=", 1) for item in items)}


def ranking_quality(issue_score: np.ndarray, noisy: np.ndarray) -> tuple[float, float]:
    """ROC-AUC of ``issue_score`` for the truly mislabeled samples, and precision at K = their number."""
    if not 0 < noisy.sum() < len(noisy):
        return float("nan"), float("nan")
    order = np.argsort(-issue_score, kind="stable")
    return float(roc_auc_score(noisy, issue_score)), float(noisy[order[: int(noisy.sum())]].mean())


def run_one(folder: Path, name: str, method: str, seed: int, values: dict) -> dict:
    tag = "-".join(f"{k}{v}" for k, v in sorted(values.items()) if k not in ("dataset", "data_path"))
    out = folder / f"{name.split()[0]}-{tag}-{method}-{seed}"
    t0 = time.perf_counter()
    result = cdmix.train(Config(method=method, seed=seed, out=str(out), progress=False, **values))
    issues = cdmix.rank_label_issues(result.run_dir)
    noisy = issues.given_label != issues.true_label
    auc, p_at_k = ranking_quality(issues.issue_score, noisy)
    return {"best": result.test_acc_best, "last": result.test_acc_last, "auc": auc, "p_at_k": p_at_k,
            "warmup": result.summary.get("warmup_epochs"), "seconds": time.perf_counter() - t0}


def fmt(values: list[float], digits: int = 2) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short schedules (a smoke test of the benchmark)")
    parser.add_argument("--only", default=None, help="run only settings whose name contains this text")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--pool", action="store_true",
                        help="CIFAR at 16 px (2x2 mean pooling of the real images): 4x cheaper on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cifar-width", type=int, default=8, help="PreAct ResNet-18 width for CIFAR (default 8)")
    parser.add_argument("--cifar-epochs", type=int, default=20, help="epochs for CIFAR (default 20)")
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--methods", default="standard,dividemix", help="comma-separated (default both)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Config field for every run, e.g. --set class_floor=0 (an ablation; repeatable)")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (seeds seed-start .. +seeds-1)")
    args = parser.parse_args()
    extra = parse_settings(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = ["| setting | method | test acc best | test acc last | issue ranking ROC-AUC | precision@K | "
             "warm-up epochs | seconds/run |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name, values in settings(folder, args.quick, args.pool, args.cifar_width, args.cifar_epochs):
            if args.only and args.only not in name:
                continue
            for method in args.methods.split(","):
                results = [run_one(folder, name, method, seed, {**values, **extra})
                           for seed in range(args.seed_start, args.seed_start + args.seeds)]
                warmups = sorted({r["warmup"] for r in results if r["warmup"] is not None})
                label = " ".join([method, *args.set])
                line = (f"| {name} | {label} | {fmt([r['best'] for r in results])} | "
                        f"{fmt([r['last'] for r in results])} | {fmt([r['auc'] for r in results], 3)} | "
                        f"{fmt([r['p_at_k'] for r in results], 3)} | {', '.join(map(str, warmups)) or '-'} | "
                        f"{np.mean([r['seconds'] for r in results]):.0f} |")
                lines.append(line)
                print(line, flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
