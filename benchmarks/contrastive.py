"""Contrastive pretraining on the user's own images (issue #22): does a SimCLR encoder trained on the
training images alone (``cdmix pretrain``, C2D's first stage) make CE and DivideMix better on real
human label noise, and how well does its kNN label disagreement rank the label errors with no
classifier at all?

Data: the real CIFAR-10 subset (5,551 train / 1,017 test, ../shared/data) with its CIFAR-10N
``worse_label`` labels; ``--pool`` 2x2 mean-pools the images to 16 px (the CPU budget). Network: ``--model``
(PreAct ResNet-18 by default; ``resnet18_cifar`` is C2D's) of width ``--width`` for everything. Rows:

- the pretraining run (``--pretrain-epochs`` epochs, batch ``--pretrain-batch``, SupContrast's lr,
  temperature and schedule otherwise): its kNN monitor accuracy and the ranking of its kNN label
  disagreement ("kNN score alone");
- CE and DivideMix from scratch and from the encoder (``--pretrained``), ``--epochs`` epochs each (the
  seed's 20-epoch protocol: every other setting at cdmix's default, 10% validation split), seeds
  ``--seeds``: best and last test accuracy, the ranking's ROC-AUC and precision@K (K = the number
  truly mislabeled) over every training sample;
- cleanlab (``--folds``-fold out-of-fold CE pred_probs from the encoder, self-confidence ranking),
  when cleanlab is installed (benchmark-only dependency).

Every finished row is appended to ``<work>/results.jsonl``; a rerun skips what is there, so a cut
benchmark continues. The table is printed at the end (and written to ``--out``).

    python benchmarks/contrastive.py --pool --width 16 --threads 2 --work runs/contrastive --out docs/contrastive.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_small import SHARED, cifar10n_subset_npz, ranking_quality  # noqa: E402

import cdmix  # noqa: E402


def load_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {r["name"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def record(path: Path, results: dict, row: dict) -> None:
    results[row["name"]] = row
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"  {row}", flush=True)


def ranking_of(run_dir: Path) -> tuple[float, float]:
    issues = cdmix.rank_label_issues(run_dir)
    return ranking_quality(issues.issue_score, issues.given_label != issues.true_label)


def pretrain(args, data: Path, work: Path) -> Path:
    out = work / "encoder"
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("epochs_done") == args.pretrain_epochs:
        return out
    if (out / "checkpoint.pt").is_file():
        cdmix.resume(out)
    else:
        cdmix.pretrain(dataset="npz", data_path=str(data), model=args.model, width=args.width,
                       epochs=args.pretrain_epochs, batch_size=args.pretrain_batch, seed=0, out=str(out),
                       overwrite=True, progress=False)
    return out


def train_row(name: str, data: Path, work: Path, method: str, seed: int, args, pretrained: Path | None) -> dict:
    out = work / name.replace(" ", "_")
    t0 = time.perf_counter()
    if (out / "checkpoint.pt").is_file() and not (out / "label_issues.csv").is_file():
        result = cdmix.resume(out)
    else:
        config = cdmix.Config(dataset="npz", data_path=str(data), model=args.model, width=args.width,
                              epochs=args.epochs, method=method, seed=seed, out=str(out), overwrite=True,
                              progress=False, pretrained=None if pretrained is None else str(pretrained))
        result = cdmix.train(config)
    auc, p_at_k = ranking_of(out)
    return {"name": name, "best": result.test_acc_best, "last": result.test_acc_last, "auc": auc,
            "p_at_k": p_at_k, "warmup": result.summary.get("warmup_epochs"),
            "seconds": time.perf_counter() - t0}


def cleanlab_row(name: str, data_path: Path, work: Path, args, pretrained: Path) -> dict | None:
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        print("cleanlab is not installed (`pip install cleanlab`): no cleanlab row", flush=True)
        return None
    from label_issues import out_of_fold_pred_probs

    with np.load(data_path) as d:
        data = {"images": d["train_images"], "labels": d["train_labels"], "true": d["train_true_labels"]}
    budget = dict(model=args.model, width=args.width, epochs=args.epochs, pretrained=str(pretrained))
    t0 = time.perf_counter()
    pred_probs, _ = out_of_fold_pred_probs(data, args.folds, 0, budget, work / "cleanlab")
    quality = get_label_quality_scores(data["labels"], pred_probs)
    auc, p_at_k = ranking_quality(1 - quality, data["labels"] != data["true"])
    return {"name": name, "auc": auc, "p_at_k": p_at_k, "seconds": time.perf_counter() - t0}


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(results: dict, seeds: list[int]) -> str:
    lines = ["| row | seeds | test acc best | test acc last | ranking ROC-AUC | precision@K | warm-up | "
             "seconds/run |", "|---|---|---|---|---|---|---|---|"]
    pre = results.get("pretraining")
    if pre:
        lines.append(f"| SimCLR pretraining (kNN monitor {pre['knn_acc']:.2f}%) | 0 | - | - | - | - | - | "
                     f"{pre['seconds']:.0f} |")
    knn = results.get("kNN score alone")
    if knn:
        lines.append(f"| kNN label disagreement alone (no classifier) | 0 | - | - | {knn['auc']:.3f} | "
                     f"{knn['p_at_k']:.3f} | - | 0 |")
    for method in ("standard", "dividemix"):
        for start in ("scratch", "encoder"):
            rows = [results[n] for n in (f"{method} {start} s{s}" for s in seeds) if n in results]
            if rows:
                warm = sorted({r["warmup"] for r in rows if r["warmup"] is not None})
                lines.append(f"| {method} from {start} | {len(rows)} | {fmt([r['best'] for r in rows])} | "
                             f"{fmt([r['last'] for r in rows])} | {fmt([r['auc'] for r in rows], 3)} | "
                             f"{fmt([r['p_at_k'] for r in rows], 3)} | {', '.join(map(str, warm)) or '-'} | "
                             f"{np.mean([r['seconds'] for r in rows]):.0f} |")
    clean = results.get("cleanlab encoder")
    if clean:
        lines.append(f"| cleanlab, 4-fold CE from the encoder | 0 | - | - | {clean['auc']:.3f} | "
                     f"{clean['p_at_k']:.3f} | - | {clean['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", action="store_true", help="16 px (2x2 mean pooling) instead of 32 px")
    parser.add_argument("--model", default="preact_resnet18", help="every row's network (resnet18_cifar: C2D's)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=50)
    parser.add_argument("--pretrain-batch", type=int, default=256)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--methods", default="standard,dividemix")
    parser.add_argument("--no-cleanlab", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", default="runs/contrastive")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if not (SHARED / "cifar10-subset").is_dir():
        print(f"skipping: {SHARED / 'cifar10-subset'} is absent")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.jsonl"
    results = load_results(results_path)
    data = work / "cifar10n_worst_subset.npz"
    if not data.is_file():
        data = cifar10n_subset_npz(work, args.pool)
    seeds = [int(s) for s in args.seeds.split(",")]
    if "pretraining" not in results:
        t0 = time.perf_counter()
        encoder = pretrain(args, data, work)
        summary = json.loads((encoder / "summary.json").read_text())
        record(results_path, results, {"name": "pretraining", "knn_acc": summary.get("knn_acc_last", summary.get(
            "knn_acc")), "seconds": time.perf_counter() - t0})
    encoder = work / "encoder"
    if "kNN score alone" not in results:
        auc, p_at_k = ranking_of(encoder)
        record(results_path, results, {"name": "kNN score alone", "auc": auc, "p_at_k": p_at_k})
    for seed in seeds:
        for method in args.methods.split(","):
            for start, pretrained in (("scratch", None), ("encoder", encoder)):
                name = f"{method} {start} s{seed}"
                if name not in results:
                    print(f"== {name}", flush=True)
                    record(results_path, results, train_row(name, data, work, method, seed, args, pretrained))
    if not args.no_cleanlab and "cleanlab encoder" not in results:
        row = cleanlab_row("cleanlab encoder", data, work, args, encoder)
        if row:
            record(results_path, results, row)
    text = (f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; {'16' if args.pool else '32'} "
            f"px, {args.model} width {args.width}, {args.epochs} epochs; pretraining {args.pretrain_epochs} "
            f"epochs, batch {args.pretrain_batch}\n\n" + table(results, seeds))
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
