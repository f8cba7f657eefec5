"""cdmix's label-issue ranking against cleanlab's, on real data with real human label errors.

Data: the 5,551 real CIFAR-10 training images of ../shared/data/cifar10-subset with their real
CIFAR-10N ``worse_label`` labels (39.9% wrong); the true labels only score the rankings.
Both tools use the same network (PreAct ResNet-18 of width ``--width``) for the same ``--epochs``:

- cdmix: ``cdmix.find_label_issues(images, labels, ...)`` (DivideMix, every setting at its default,
  ``--warmup auto``, all samples trained on): the ranking is ``issue_score`` (1 - the final nets'
  probability of the given label, in-sample), the flagged set ``clean_prob < 0.5``;
- cleanlab 2.x (benchmark-only dependency): ``--folds``-fold out-of-fold ``pred_probs`` of
  cross-entropy training (cdmix ``--method standard``, each fold's net predicting its held-out
  quarter), then ``cleanlab.rank.get_label_quality_scores`` (default: self-confidence) for the
  ranking and ``cleanlab.filter.find_label_issues`` (default: prune_by_noise_rate) for the flagged set;
- and, for reference, cleanlab's two functions on cdmix's own (in-sample) ``pred_probs``.

Reported per tool: ROC-AUC of the ranking for the truly mislabeled samples, precision at K (K = the
number truly mislabeled), size / precision / recall of the default flagged set, seconds.

    pip install cleanlab   # benchmark only; not a cdmix dependency
    python benchmarks/label_issues.py --threads 1 --out docs/label_issues.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_small import SHARED, pool2, ranking_quality  # noqa: E402

import cdmix  # noqa: E402


def load_subset(pool: bool) -> dict[str, np.ndarray]:
    subset = np.load(SHARED / "cifar10-subset" / "cifar10_subset.npz")
    human = torch.load(SHARED / "cifar-n" / "CIFAR-10_human.pt", weights_only=False)
    shrink = pool2 if pool else (lambda x: x)
    return {"images": shrink(subset["train_images"]), "labels": np.asarray(human["worse_label"])[subset["train_index"]],
            "true": subset["train_labels"], "test_images": shrink(subset["test_images"]),
            "test_labels": subset["test_labels"]}


def flagged_quality(flagged: np.ndarray, noisy: np.ndarray) -> tuple[int, float, float]:
    n = int(flagged.sum())
    precision = float(noisy[flagged].mean()) if n else float("nan")
    return n, precision, float((flagged & noisy).sum() / max(noisy.sum(), 1))


def out_of_fold_pred_probs(data: dict, folds: int, seed: int, budget: dict,
                           keep: Path | None) -> tuple[np.ndarray, float]:
    """pred_probs of every sample from the CE net trained on the other folds (stratified by given label),
    and the folds' training seconds."""
    from sklearn.model_selection import StratifiedKFold

    labels = data["labels"]
    pred_probs = np.zeros((len(labels), 10), dtype=np.float32)
    seconds = 0.0
    for k, (train, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
        t0 = time.perf_counter()
        out = {"out": str(keep / f"fold{k + 1}")} if keep else {}
        run = cdmix.train(data["images"][train], labels[train], method="standard", val_fraction=0.0, seed=seed,
                          progress=False, class_names=[str(c) for c in range(10)], **budget, **out)
        pred_probs[held] = run.model(data["images"][held])
        seconds += run.summary["seconds_total"]
        print(f"  fold {k + 1}/{folds}: {time.perf_counter() - t0:.0f} s", flush=True)
    return pred_probs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", action="store_true", help="16 px (2x2 mean pooling) instead of 32 px")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: nothing is written)")
    args = parser.parse_args()
    keep = Path(args.keep) if args.keep else None
    try:
        import cleanlab
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        print("cleanlab is not installed: `pip install cleanlab` to run this benchmark (it is not a cdmix "
              "dependency); skipping")
        return
    if not (SHARED / "cifar10-subset").is_dir():
        print(f"skipping: {SHARED / 'cifar10-subset'} is absent")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_subset(args.pool)
    noisy = data["labels"] != data["true"]
    budget = dict(model="preact_resnet18", width=args.width, epochs=args.epochs)
    rows = []

    def row(tool: str, ranking: str, score: np.ndarray, flagged: np.ndarray, seconds: float) -> None:
        auc, p_at_k = ranking_quality(score, noisy)
        n, precision, recall = flagged_quality(flagged, noisy)
        line = (f"| {tool} | {ranking} | {auc:.3f} | {p_at_k:.3f} | {n} | {precision:.3f} | {recall:.3f} | "
                f"{seconds:.0f} |")
        rows.append(line)
        print(line, flush=True)

    print(f"{len(noisy)} training images, {noisy.mean():.1%} mislabeled (K = {int(noisy.sum())})", flush=True)
    if keep and (keep / "cdmix" / "checkpoint.pt").is_file():  # an interrupted benchmark: finish that run
        from cdmix.issues import LabelIssueResult

        result = LabelIssueResult.from_run(cdmix.resume(keep / "cdmix"))
    else:
        _, result = cdmix.find_label_issues(data["images"], data["labels"], seed=args.seed, return_result=True,
                                            test_images=data["test_images"], test_labels=data["test_labels"],
                                            true_labels=data["true"], **budget,
                                            **({"out": str(keep / "cdmix")} if keep else {}))
    summary = result.run.summary
    # Seconds: the runs' own training time (summary.json's seconds_total, summed over a resume) plus
    # the ranking's own time, for every tool alike.
    seconds_cdmix = summary["seconds_total"]
    print(f"cdmix: {seconds_cdmix:.0f} s, test accuracy last {summary['test_acc_last']:.2f}%, warm-up "
          f"{summary.get('warmup_epochs')} epochs ({summary.get('warmup_rule')})", flush=True)
    row("cdmix (DivideMix)", "issue_score", result.issue_score, result.flagged, seconds_cdmix)

    oof, seconds_oof = out_of_fold_pred_probs(data, args.folds, args.seed, budget, keep)
    if keep:
        np.save(keep / "oof_pred_probs.npy", oof)
    oof_acc = float((oof.argmax(1) == data["true"]).mean())
    t1 = time.perf_counter()
    quality = get_label_quality_scores(data["labels"], oof)
    flagged = find_label_issues(data["labels"], oof)
    seconds_cleanlab = time.perf_counter() - t1
    row(f"cleanlab {cleanlab.__version__} ({args.folds}-fold CE)", "1 - self-confidence (OOF)", 1 - quality, flagged,
        seconds_oof + seconds_cleanlab)

    t1 = time.perf_counter()
    quality = get_label_quality_scores(data["labels"], result.pred_probs)
    flagged = find_label_issues(data["labels"], result.pred_probs)
    row(f"cleanlab {cleanlab.__version__} on cdmix's pred_probs", "1 - self-confidence (in-sample)", 1 - quality,
        flagged, seconds_cdmix + time.perf_counter() - t1)

    header = ["| tool | ranking | ROC-AUC | precision@K | flagged | flagged precision | flagged recall | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    notes = ["", f"{len(noisy)} images, {int(noisy.sum())} truly mislabeled ({noisy.mean():.1%}); PreAct ResNet-18 "
             f"width {args.width}, {args.epochs} epochs, {'16' if args.pool else '32'} px, seed {args.seed}. "
             f"Out-of-fold CE accuracy against the true labels: {oof_acc:.1%}; cdmix test accuracy (last epoch): "
             f"{summary['test_acc_last']:.2f}%, warm-up {summary.get('warmup_epochs')} epochs "
             f"({summary.get('warmup_rule')})."]
    table = "\n".join(header + rows + notes)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
