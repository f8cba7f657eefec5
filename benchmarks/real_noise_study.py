"""The report's experiment on real human noise (issue #23): CE, DivideMix, Jo-SRC, the faithful
hybrid and hybrid-stable on the real CIFAR-10 subset (5,551 train / 1,017 test) with its CIFAR-10N
``worse_label`` labels, at a budget where CE memorises the noise: PreAct ResNet-18 width 16, the
images 2x2 mean-pooled to 16 px, 150 epochs, ``--val-fraction 0`` (the curves are test curves),
every other setting at cdmix's default (the same for every method).

Runs are long (an hour or more each on one CPU core) and resumable: each is a run folder
``<work>/<method>-s<seed>``; a rerun resumes an unfinished one (``cdmix.resume``) and skips a
finished one. A finished run's ``metrics.csv``, ``summary.json`` and ranking figures are copied to
``--archive`` (committed: run folders are not), so a study split across sessions adds up there.

    python benchmarks/real_noise_study.py --methods hybrid,hybrid-stable --seeds 0 --threads 1
    python benchmarks/real_noise_study.py --report          # table + figure from the archive
    python benchmarks/real_noise_study.py --methods hybrid+per-class --seeds 0   # one stabiliser alone
    python benchmarks/real_noise_study.py --methods dividemix --seeds 0 --set pretrained=ENC --tag encoder
    python benchmarks/real_noise_study.py --teachers WORK/hybrid-s0 WORK/hybrid-stable-s0   # the EMA teachers

The table: best and last test accuracy, best - last, the same with 10-epoch means (the mean of the
last 10 epochs, and the best mean over 10 consecutive epochs minus it: one epoch's accuracy on
1,017 test images moves by about a point), the epochs of any drop of 5+ points from the
best so far, the clean-selection ROC-AUC (first epoch after warm-up, middle, last), the ranking's
ROC-AUC and precision@K from label_issues.csv and the epoch whose nets scored it (the best epoch's
when a run ended collapsed, else the last), minutes per run (its epochs' seconds, a paused epoch
counted at its phase's median); the figure: each method's mean test accuracy curve over its seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_small import cifar10n_subset_npz, ranking_quality  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["standard", "dividemix", "josrc", "hybrid", "hybrid-stable"]
# the ablation: the faithful hybrid plus one of hybrid-stable's stabilisers (its preset value)
STABILISERS = {"hybrid+per-class": "stab_per_class_threshold", "hybrid+gmm-mean": "stab_gmm_running_mean",
               "hybrid+blend": "stab_blend_selection"}
DROP = 5.0  # points below the best so far that count as a drop


def method_settings(name: str) -> dict:
    """Config fields of one study method: the method, plus hybrid-stable's stabilisers (all, or one)."""
    if name == "hybrid-stable" or name in STABILISERS:
        from cdmix.config import load_preset

        stab = {k: v for k, v in load_preset("hybrid-stable").items() if k.startswith("stab_")}
        if name in STABILISERS:
            stab = {STABILISERS[name]: stab[STABILISERS[name]]}
        return {"method": "hybrid", **stab}
    return {"method": name}


def run_one(work: Path, data: Path, name: str, seed: int, epochs: int, width: int, extra: dict, tag: str = "") -> Path:
    """Train (or resume, or skip when finished) one run; returns its folder (``<name>[+<tag>]-s<seed>``)."""
    import cdmix

    run_dir = work / f"{name}{'+' + tag if tag else ''}-s{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file() and (run_dir / "label_issues.csv").is_file():
        if json.loads(summary.read_text()).get("epochs_done") == epochs:
            return run_dir
    t0 = time.perf_counter()
    if (run_dir / "checkpoint.pt").is_file():
        print(f"== resume {run_dir}", flush=True)
        cdmix.resume(run_dir)
    else:
        print(f"== train {run_dir}", flush=True)
        config = cdmix.Config(dataset="npz", data_path=str(data), model="preact_resnet18", width=width,
                              epochs=epochs, val_fraction=0.0, seed=seed, out=str(run_dir), overwrite=True,
                              progress=False, device="cpu", **method_settings(name), **extra)
        cdmix.train(config)
    print(f"   {name} seed {seed}: {time.perf_counter() - t0:.0f} s this part", flush=True)
    return run_dir


def archive_run(run_dir: Path, archive: Path) -> None:
    """Copy what the table and figure need (small files) into the archive."""
    import cdmix

    dest = archive / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "summary.json", "config.json"):
        shutil.copyfile(run_dir / name, dest / name)
    with np.load(run_dir / "division.npz") as z:  # the last division, small: float32, compressed
        np.savez_compressed(dest / "division.npz", **{k: z[k].astype(np.float32) if z[k].dtype == np.float64 else z[k]
                                                      for k in z.files})
    issues = cdmix.rank_label_issues(run_dir)
    auc, p_at_k = ranking_quality(issues.issue_score, issues.given_label != issues.true_label)
    (dest / "ranking.json").write_text(json.dumps({"ranking_auc": auc, "precision_at_k": p_at_k}) + "\n")


def read_rows(path: Path) -> list[dict[str, float]]:
    with path.open() as fh:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(fh)]


def drops(test: list[float]) -> list[int]:
    """1-based epochs where the test accuracy first falls DROP points below the best so far (once per fall)."""
    out, best, down = [], -1.0, False
    for epoch, acc in enumerate(test, start=1):
        if acc >= best:
            best, down = acc, False
        elif best - acc >= DROP and not down:
            out.append(epoch)
            down = True
        elif best - acc < DROP:
            down = False
    return out


def selection_auc(rows: list[dict[str, float]]) -> list[float]:
    """The clean selection ROC-AUC of each epoch (net 1, else the method's one column); NaN in warm-up."""
    keys = [k for k in rows[0] if k.startswith("sel_auc")]
    key = "sel_auc_net1" if "sel_auc_net1" in keys else (keys[0] if keys else None)
    return [r.get(key, math.nan) if key else math.nan for r in rows]


def smoothed_best(test: list[float], window: int = 10) -> float:
    """The best mean test accuracy over ``window`` consecutive epochs: on 1,017 test images one epoch's
    accuracy moves by about a point, so a single best epoch is partly noise."""
    return float(np.convolve(test, np.ones(window) / window, "valid").max())


def run_minutes(rows: list[dict[str, float]]) -> float:
    """Minutes of training: the sum of the epochs' seconds, where an epoch over 3x the median of its phase
    (warm-up or after) counts as that median: it was paused (SIGSTOP to free a core), not slow."""
    seconds = np.array([r["seconds"] for r in rows])
    phase = np.array([math.isnan(a) for a in selection_auc(rows)])
    for part in (phase, ~phase):
        if part.any():
            median = np.median(seconds[part])
            seconds[part] = np.where(seconds[part] > 3 * median, median, seconds[part])
    return float(seconds.sum() / 60)


def load_archive(archive: Path) -> dict[str, list[dict]]:
    """method -> runs (rows, summary, ranking) from the archive's finished runs."""
    out: dict[str, list[dict]] = {}
    for folder in sorted(p for p in archive.iterdir() if (p / "ranking.json").is_file()):
        name = folder.name.rsplit("-s", 1)[0]
        out.setdefault(name, []).append({"seed": folder.name.rsplit("-s", 1)[1],
                                         "rows": read_rows(folder / "metrics.csv"),
                                         "summary": json.loads((folder / "summary.json").read_text()),
                                         **json.loads((folder / "ranking.json").read_text())})
    return out


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| method | seeds | best | last | best − last | last 10 epochs | best − last, 10-epoch means | "
             "drops ≥ 5 pts (epoch) | selection AUC first / mid / last | ranking ROC-AUC | precision@K | "
             "ranked by the nets of epoch | min/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = [*METHODS, *STABILISERS]
    for name in [m for m in order if m in runs] + [m for m in runs if m not in order]:
        rs = runs[name]
        tests = [[r["test_acc"] for r in run["rows"]] for run in rs]
        best = [max(t) for t in tests]
        last = [t[-1] for t in tests]
        last10 = [float(np.mean(t[-10:])) for t in tests]
        smooth_drop = [smoothed_best(t) - x for t, x in zip(tests, last10)]
        aucs = [[a for a in selection_auc(run["rows"]) if not math.isnan(a)] for run in rs]
        first = [a[0] if a else math.nan for a in aucs]
        mid = [a[len(a) // 2] if a else math.nan for a in aucs]
        end = [a[-1] if a else math.nan for a in aucs]
        drop_text = "; ".join(f"s{run['seed']}: {', '.join(map(str, drops(t))) or 'none'}" for run, t in zip(rs, tests))
        minutes = [run_minutes(run["rows"]) for run in rs]
        lines.append(f"| {name} | {', '.join(run['seed'] for run in rs)} | {fmt(best)} | {fmt(last)} | "
                     f"{fmt([b - x for b, x in zip(best, last)])} | {fmt(last10)} | {fmt(smooth_drop)} | {drop_text} | "
                     f"{fmt(first, 3)} / {fmt(mid, 3)} / {fmt(end, 3)} | {fmt([r['ranking_auc'] for r in rs], 3)} | "
                     f"{fmt([r['precision_at_k'] for r in rs], 3)} | "
                     f"{', '.join(str(run['summary'].get('scored_epoch', '-')) for run in rs)} | {fmt(minutes, 0)} |")
    return "\n".join(lines)


def blend_table(archive: Path, weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> str:
    """The last division of every archived run that scored both the JS clean likelihood and the loss
    GMM, re-blended at each weight w (``(1 - w)·GMM + w·JS``, threshold ``(1 - w)·p_threshold + w·tau``,
    one global threshold): the score's ROC-AUC for the clean samples, and the labeled set's size,
    precision and recall; then the set the run itself kept (per-class thresholds, when on)."""
    from sklearn.metrics import roc_auc_score

    from cdmix.selection import blend_clean_prob

    lines = ["| run | JS weight w | score ROC-AUC | labeled | precision | recall |", "|---|---|---|---|---|---|"]
    for folder in sorted(p for p in archive.iterdir() if (p / "division.npz").is_file()):
        with np.load(folder / "division.npz") as z:
            if "gmm_prob" not in z.files or "js_clean_likelihood" not in z.files:
                continue
            clean, gmm, js, kept = ~z["is_noisy"].astype(bool), z["gmm_prob"], z["js_clean_likelihood"], z["selected"]
        config = json.loads((folder / "config.json").read_text())
        tau = read_rows(folder / "metrics.csv")[-1]["tau_clean"]
        for w in weights:
            score = blend_clean_prob(gmm, js, w)
            chosen = score > (1 - w) * config["p_threshold"] + w * tau
            lines.append(f"| {folder.name} | {w:g} | {roc_auc_score(clean, score):.3f} | {chosen.sum():,} | "
                         f"{clean[chosen].mean():.3f} | {chosen[clean].mean():.3f} |")
        kept = kept.astype(bool)
        rule = "per-class thresholds" if config.get("stab_per_class_threshold") else "global threshold"
        lines.append(f"| {folder.name} | as run ({rule}) | - | {kept.sum():,} | {clean[kept].mean():.3f} | "
                     f"{kept[clean].mean():.3f} |")
    return "\n".join(lines)


def teacher_stats(logits: np.ndarray, given: np.ndarray, true: np.ndarray, temperature: float) -> dict[str, float]:
    """What a hybrid's teachers tell the nets, from their averaged logits (N x C): the mean top
    probability before and after the pseudo-labels' sharpening (``p ** (1/T)`` renormalised), how often
    the argmax is the given label and the true one, and on the wrongly labeled images how often it
    follows the wrong label and how often it finds the true one."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sharp = p ** (1.0 / temperature)
    sharp /= sharp.sum(1, keepdims=True)
    guess, wrong = p.argmax(1), given != true
    return {"confidence": float(p.max(1).mean()), "sharpened": float(sharp.max(1).mean()),
            "agrees_given": float((guess == given).mean()), "accuracy": float((guess == true).mean()),
            "wrong_follows_given": float((guess[wrong] == given[wrong]).mean()),
            "wrong_finds_true": float((guess[wrong] == true[wrong]).mean())}


def teacher_table(run_dirs: list[Path], batch: int = 128) -> str:
    """``teacher_stats`` of each hybrid run's EMA teachers in its best.pt and checkpoint.pt (the best and
    the last epoch), on the training images without augmentation, forwarded as training does
    (``teacher_logits``: train-mode BN, here batches of ``batch`` in a seeded order)."""
    import torch

    from cdmix.data.batches import DeviceImages
    from cdmix.methods.averaging import teacher_logits
    from cdmix.predict import load_model
    from cdmix.runs import load_checkpoint

    lines = ["| run | epoch | teacher top prob | sharpened (T) | agrees with the given label | accuracy (true labels) | "
             "wrong labels: follows the given | wrong labels: finds the true |", "|---|---|---|---|---|---|---|---|"]
    for run in map(Path, run_dirs):
        model = load_model(run)  # the run's nets, rebuilt from model.json; the teachers' weights go into them
        config = json.loads((run / "config.json").read_text())
        with np.load(config["data_path"]) as data:
            images, given, true = data["train_images"], data["train_labels"], data["train_true_labels"]
        device_images = DeviceImages(model.prepare(images), model.mean, model.std, "cpu")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config["seed"]))
        for name in ("best.pt", "checkpoint.pt"):
            state = load_checkpoint(run / name)
            teachers = state["method"]["extra"]["teachers"]
            logits = torch.zeros(len(images), len(model.class_names))
            for net, sd in zip(model.nets, teachers):
                net.load_state_dict(sd)
                for chunk in order.split(batch):
                    logits[chunk] += teacher_logits(net, device_images.batch(chunk, augment=False)) / len(teachers)
            st = teacher_stats(logits.numpy(), given, true, config["temperature"])
            lines.append(f"| {run.name} | {state['epoch'] + 1} | {st['confidence']:.3f} | {st['sharpened']:.3f} "
                         f"({config['temperature']:g}) | {st['agrees_given']:.3f} | {st['accuracy']:.3f} | "
                         f"{st['wrong_follows_given']:.3f} | {st['wrong_finds_true']:.3f} |")
    return "\n".join(lines)


def figure(archive: Path, path: Path) -> None:
    """Every method's mean test-accuracy curve over its seeds: ``cdmix compare --plot`` of the archived runs."""
    from cdmix.report.compare import plot_runs

    order = {name: i for i, name in enumerate([*METHODS, *STABILISERS])}
    folders = sorted((p for p in archive.iterdir() if (p / "ranking.json").is_file()),
                     key=lambda p: (order.get(p.name.rsplit("-s", 1)[0], len(order)), p.name))
    plot_runs(folders, path, title="CIFAR-10N worst, real 5.5k subset, 16 px, PreAct ResNet-18 width 16",
              overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}, or an ablation: {', '.join(STABILISERS)}")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--work", default="runs/real_noise_study", help="run folders (not committed)")
    parser.add_argument("--archive", default=str(ROOT / "docs" / "real_noise_study"),
                        help="finished runs' metrics (committed)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Config field for every run (JSON value), e.g. --set pretrained=ENC")
    parser.add_argument("--tag", default="", help="appended to the run folders' method name (+TAG), e.g. "
                        "--tag encoder with --set pretrained=ENC, so those runs are rows of their own")
    parser.add_argument("--report", action="store_true", help="only the table and figure from the archive")
    parser.add_argument("--teachers", nargs="+", metavar="RUN_DIR",
                        help="only the EMA teachers' table (teacher_table) of these hybrid run folders")
    args = parser.parse_args(argv)
    if args.teachers:
        print(teacher_table(args.teachers))
        return 0
    archive, work = Path(args.archive), Path(args.work)
    if args.set and not args.tag:
        raise SystemExit("--set changes the runs: give --tag too, so they neither resume nor replace the plain ones")
    archive.mkdir(parents=True, exist_ok=True)
    if not args.report:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "cifar10n_worst_subset.npz"
        if not data.is_file():
            data = cifar10n_subset_npz(work, pool=True)
        extra = {k: json.loads(v) if v[:1] in "0123456789-[{\"" or v in ("true", "false", "null") else v
                 for k, v in (item.split("=", 1) for item in args.set)}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in args.methods.split(","):
                if name not in METHODS and name not in STABILISERS:
                    raise SystemExit(f"unknown method {name}; one of {', '.join([*METHODS, *STABILISERS])}")
                run_dir = run_one(work, data, name, seed, args.epochs, args.width, extra, args.tag)
                archive_run(run_dir, archive)
    runs = load_archive(archive)
    if not runs:
        print("no finished runs in the archive yet")
        return 0
    text = table(runs)
    figure(archive, archive / "test_accuracy.png")
    blends = blend_table(archive)
    (archive / "table.md").write_text(f"machine: {platform.machine()}, python {platform.python_version()}\n\n"
                                      + text + "\n\nThe last division re-blended (`blend_table`):\n\n" + blends + "\n")
    print(text + "\n\n" + blends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
