"""A user's own image folder with real label errors, as a new user would run cdmix on it.

Builds a folder of real CIFAR-10 images (../shared/data/cifar10-subset) of ``--classes`` classes,
``--per-class`` images each, and moves ``--flip`` of them into a wrong class's folder (the file name
keeps the class it belongs to). Then runs ``cdmix train --dataset folder`` with the README's
"Your own data" recipe for CE and DivideMix, and scores each run's label_issues.csv by path: how
many of the flipped training images are among the top K rows (K = their number; precision at K),
the ROC-AUC of the ranking, and seconds.

    python benchmarks/own_folder.py --per-class 100 --threads 1

With ``--work DIR`` the folder and the runs live there instead of a temporary folder, and a rerun with
the same arguments resumes an unfinished run (``cdmix.resume``) and re-scores a finished one, so a long
benchmark can be split across sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_small import SHARED, parse_settings, ranking_quality  # noqa: E402

import cdmix  # noqa: E402
from cdmix.data.sources import CIFAR10_NAMES  # noqa: E402

CLASSES = (0, 3, 8)  # airplane, cat, ship


def make_folder(root: Path, per_class: int, flip: float, seed: int) -> set[str]:
    """Write the folder; returns the relative paths of the flipped images."""
    from PIL import Image

    subset = np.load(SHARED / "cifar10-subset" / "cifar10_subset.npz")
    rng = np.random.default_rng(seed)
    names = [CIFAR10_NAMES[c] for c in CLASSES]
    flipped = set()
    for k, c in enumerate(CLASSES):
        idx = rng.choice(np.flatnonzero(subset["train_labels"] == c), per_class, replace=False)
        wrong = set(rng.choice(per_class, int(round(flip * per_class)), replace=False).tolist())
        for j, i in enumerate(idx):
            folder = names[(k + 1 + rng.integers(0, len(names) - 1)) % len(names)] if j in wrong else names[k]
            (root / folder).mkdir(parents=True, exist_ok=True)
            name = f"{folder}/{names[k]}_{j:04d}.png"
            Image.fromarray(subset["train_images"][i]).save(root / name)
            if j in wrong:
                flipped.add(name)
    return flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--flip", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default="standard,dividemix")
    parser.add_argument("--pretrain-epochs", type=int, default=0,
                        help="first `cdmix pretrain` on the folder for this many epochs, then a kNN-alone row and "
                             "every method from the encoder too (0: from scratch only)")
    parser.add_argument("--pretrain-batch", type=int, default=256)
    parser.add_argument("--start", choices=("both", "scratch", "encoder"), default="both",
                        help="which trained rows: from scratch, from the encoder (needs --pretrain-epochs), or both "
                        "(with --work, two processes can run one each)")
    parser.add_argument("--work", default=None, help="keep the folder and runs here and resume them (default: a "
                        "temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="another Config field for every run (e.g. --set warmup_min_steps=100)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = parse_settings(args.set)
    with (contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory()) as tmp:
        root = Path(tmp) / "my_images"
        flipped = load_or_make_folder(root, args.per_class, args.flip, args.seed)
        n = args.per_class * len(CLASSES)
        print(f"{n} images of {len(CLASSES)} classes, {len(flipped)} in a wrong class folder", flush=True)
        print("| images | method | epochs | warm-up (auto) | flipped (train) | precision@K | ROC-AUC | flagged | "
              "flagged precision | test acc last | scored with epoch | seconds |\n" + "|---" * 12 + "|", flush=True)
        starts: list[tuple[str, str | None]] = [("", None)]
        if args.pretrain_epochs:
            t0 = time.perf_counter()
            encoder = finished(Path(tmp) / "encoder", args.pretrain_epochs) or cdmix.pretrain(
                dataset="folder", data_path=str(root), width=args.width, epochs=args.pretrain_epochs,
                batch_size=args.pretrain_batch, seed=args.seed, out=str(Path(tmp) / "encoder"), progress=False)
            row(n, f"kNN alone ({args.pretrain_epochs} pretraining epochs)", args.pretrain_epochs, encoder.run_dir,
                encoder.summary, flipped, time.perf_counter() - t0, test_acc=None)
            starts.append((" from encoder", str(encoder.run_dir)))
        if args.start != "both":
            starts = [s for s in starts if (s[1] is None) == (args.start == "scratch")]
        for method in args.methods.split(","):
            for label, pretrained in starts:
                t0 = time.perf_counter()
                epochs = args.epochs or 100
                out = Path(tmp) / f"{method}{label.replace(' ', '_')}"
                result = finished(out, epochs) or cdmix.train(cdmix.Config(
                    dataset="folder", data_path=str(root), method=method, width=args.width, epochs=epochs,
                    val_fraction=0.0, seed=args.seed, out=str(out), progress=False, pretrained=pretrained, **extra))
                row(n, method + label, epochs, result.run_dir, result.summary, flipped, time.perf_counter() - t0,
                    test_acc=result.test_acc_last)


def load_or_make_folder(root: Path, per_class: int, flip: float, seed: int) -> set[str]:
    """The folder of an earlier run of this benchmark under ``--work`` (its flipped.json), else a new one."""
    record = root.parent / "flipped.json"
    if record.is_file() and root.is_dir():
        return set(json.loads(record.read_text()))
    flipped = make_folder(root, per_class, flip, seed)
    record.write_text(json.dumps(sorted(flipped)))
    return flipped


def finished(run_dir: Path, epochs: int):
    """The result of ``run_dir``: resumed when cut short, read back when finished, None when absent."""
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("epochs_done") == epochs \
            and (run_dir / "label_issues.csv").is_file():
        data = json.loads(summary.read_text())
        return SimpleNamespace(run_dir=run_dir, summary=data, test_acc_last=data.get("test_acc_last"))
    if (run_dir / "checkpoint.pt").is_file():
        return cdmix.resume(run_dir)
    return None


def row(n: int, name: str, epochs: int, run_dir: Path, summary: dict, flipped: set[str], seconds: float,
        test_acc: float | None) -> None:
    """One table row: how the run's label_issues.csv ranks the flipped files."""
    issues = cdmix.rank_label_issues(run_dir)
    wrong = np.asarray([i in flipped for i in issues.ids])
    auc, p_at_k = ranking_quality(issues.issue_score, wrong)
    flagged = issues.flagged
    print(f"| {n} | {name} | {epochs} | {summary.get('warmup_epochs') or '-'} | "
          f"{int(wrong.sum())} | {p_at_k:.2f} | {auc:.3f} | {int(flagged.sum())} | "
          f"{wrong[flagged].mean() if flagged.any() else float('nan'):.2f} | "
          f"{'-' if test_acc is None else f'{test_acc:.1f}'} | {summary.get('scored_epoch', '-')} | {seconds:.0f} |",
          flush=True)


if __name__ == "__main__":
    main()
