"""``cdmix`` command line: train | pretrain | resume | evaluate | noise | presets | issues | prepare | report | compare | bench."""

from __future__ import annotations

import argparse
import logging
import sys

from cdmix.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises ``UserError`` (``error: ...``, exit 2)."""

    def error(self, message: str):
        raise UserError(message)


def _int_or_word(text: str):
    """An ``int | str`` flag (``--warmup 10`` or ``--warmup auto``)."""
    try:
        return int(text)
    except ValueError:
        return text


def _flag_type(annotation: str):
    if "bool" in annotation:
        return bool
    if "int | str" in annotation:
        return _int_or_word
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def add_train_flags(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per Config field, in the field's group, with its help text and choices; ``defaults``:
    the defaults shown where a command's differ from the Config's (``cdmix pretrain``)."""
    from dataclasses import fields

    from cdmix.config import GROUPS, Config

    parser.add_argument("--config", dest="config_file", help="a TOML file of settings (flags override it)")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(str(f.type))
        group = groups[f.metadata["group"]]
        default = (defaults or {}).get(f.name, f.default)
        text = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=text,
                               choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace):
    from dataclasses import fields

    from cdmix.config import Config, build_config

    overrides = {f.name: getattr(args, f.name) for f in fields(Config)}
    return build_config(config_file=args.config_file, **overrides)


def cmd_train(args) -> int:
    from cdmix.engine import train

    return finish(train(config_from_args(args)))


def cmd_pretrain(args) -> int:
    from dataclasses import fields

    from cdmix.config import Config
    from cdmix.pretraining import pretrain_config, run_pretraining

    overrides = {f.name: getattr(args, f.name) for f in fields(Config)}
    return finish(run_pretraining(pretrain_config(config_file=args.config_file, **overrides)).run)


def cmd_resume(args) -> int:
    from cdmix.engine import resume

    return finish(resume(args.run_dir))


def finish(result) -> int:
    from cdmix import distributed

    if distributed.current().is_main:
        print_end(result)
    distributed.cleanup()
    return 0


def print_end(result) -> None:
    if getattr(result, "end_text", None) is not None:  # a method that is no classifier says its own
        print("\n".join(result.end_text))
        return
    from cdmix.report.rundata import selected_test_accuracy

    s = result.summary
    selected = selected_test_accuracy(s)
    if s.get("test_acc_best") is None:
        print("test accuracy: not measured (no test set)")
    elif selected is not None:  # first the figure a paper that selects on validation reports
        print(f"test accuracy: {selected:.2f}% at epoch {s['selected_epoch']}, the epoch the "
              f"{'clean ' if s.get('val_set') else ''}validation set chose (best.pt); on the test set itself: "
              f"best {s['test_acc_best']:.2f}% (epoch {s['test_acc_best_epoch']}, picked on test: optimistic), "
              f"last {s['test_acc_last']:.2f}%")
    else:
        print(f"test accuracy: best {s['test_acc_best']:.2f}% (epoch {s['test_acc_best_epoch']}), "
              f"last {s['test_acc_last']:.2f}%")
    import math

    from cdmix.runs import read_metrics

    last = read_metrics(result.run_dir)[-1]
    prec, rec = last.get("sel_precision_net1"), last.get("sel_recall_net1")
    if prec is not None and not math.isnan(prec):
        print(f"clean selection (net1, last epoch): precision {prec:.3f}, recall {rec:.3f}, "
              f"ROC-AUC {last.get('sel_auc_net1', float('nan')):.3f}")
    print(f"suspected label errors: {result.run_dir / 'label_issues.csv'}  (cdmix issues {result.run_dir})")
    from cdmix.issues import collapse_caution

    caution = collapse_caution(s)
    if caution:
        print(caution)
    elif s.get("collapse_warnings") and s.get("ended_collapsed") is False:
        print(f"note: the {s['collapse_warnings']} collapse warning(s) did not hold to the end: at the end the drop was "
              f"too small, or within chance on {s['num_val'] or s['num_test']} images; the label issues come from "
              f"the final nets (epoch {s['scored_epoch']})")
    print(f"report:      cdmix report {result.run_dir}")
    print(f"tensorboard: tensorboard --logdir {result.run_dir}")


def cmd_evaluate(args) -> int:
    from cdmix.evaluate import evaluate_run

    accs = evaluate_run(args.run_dir, which=args.checkpoint)
    for name, acc in accs.items():
        print(f"{name}: {acc:.2f}%")
    return 0


def cmd_noise(args) -> int:
    import os
    from pathlib import Path

    from cdmix.config import bounds_error
    from cdmix.data.noise import make_noisy_labels, noise_rate_actual, write_noise_file
    from cdmix.data.sources import load_source
    from cdmix.runs import refuse_run_file

    for name in ("noise_rate", "seed"):  # the same bounds as the train flags
        problem = bounds_error(name, getattr(args, name))
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {problem}")
    if Path(args.output).is_dir() or args.output.endswith(("/", os.sep)):
        raise UserError(f"{args.output} is a folder; give the name of the JSON file to write")
    refuse_run_file(args.output, "output")
    raw = load_source(args.dataset, args.data_path, download=args.download, seed=args.seed)
    if raw.train_true_labels is not None:
        raise UserError(f"{args.dataset} already carries human label noise; synthetic noise files are "
                        "for clean datasets (digits, cifar10, cifar100, folder, csv, npz)")
    noisy = make_noisy_labels(raw.train_labels, raw.num_classes, args.noise_mode, args.noise_rate,
                              args.seed, dataset=args.dataset)
    write_noise_file(args.output, noisy)
    print(f"wrote {args.output}: {len(noisy)} labels, {args.noise_mode} noise nominal "
          f"{args.noise_rate:.1%}, actual {noise_rate_actual(noisy, raw.train_labels):.1%}")
    return 0


def cmd_presets(args) -> int:
    from cdmix.config import preset_info, preset_names

    names = preset_names()
    print(f"{'preset':34s} {'published (best/last)':24s} setting")
    for name in names:
        info = preset_info(name)["info"]
        print(f"{name:34s} {info.get('published', '-'):24s} {info.get('description', '')}")
        if "backbone" in info or "weights" in info:  # the real-world presets: what network and weights file
            print(f"{'':34s} backbone: {info.get('backbone', '-')}; weights: {info.get('weights', '-')}")
        if "compare" in info:  # which of a run's figures the published one is
            print(f"{'':34s} compare the published figure with: {info['compare']}")
    return 0


def cmd_issues(args) -> int:
    from cdmix.issues import collapse_caution, format_table, one_class_caution, rank_label_issues
    from cdmix.runs import read_summary
    from cdmix.safetext import printable

    if args.top is not None and args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    # Both outputs are checked before either is written: a refusal leaves nothing half done.
    page_path = clean_path = None
    if args.html is not None:
        from cdmix.report.review import review_page_path

        page_path = review_page_path(args.run_dir, args.html or None, args.overwrite)
    if args.clean_csv:
        from cdmix.atomic import check_output

        clean_path = check_output(args.clean_csv, "--clean-csv", overwrite=args.overwrite, run_dir=args.run_dir)
        if page_path is not None and clean_path.resolve() == page_path.resolve():
            raise UserError(f"--html and --clean-csv name the same file {clean_path}; give two file names")
    if page_path is not None:
        from cdmix.report.review import write_review_page

        page = write_review_page(args.run_dir, page_path, top=args.top or 100, overwrite=args.overwrite)
        print(f"wrote {printable(page)}\nopen it in a browser: {printable(page.resolve().as_uri())}")
    if clean_path is not None:
        from cdmix.issues import write_cleaned_csv
        from cdmix.report.review import run_class_names, run_data_root

        all_issues = rank_label_issues(args.run_dir)
        n = write_cleaned_csv(clean_path, all_issues, run_class_names(args.run_dir), args.fix,
                              run_data_root(args.run_dir), run_dir=args.run_dir, overwrite=args.overwrite)
        flagged = int(all_issues.flagged.sum())
        what = "left out" if args.fix == "drop" else "relabelled with the predicted class"
        print(f"wrote {printable(clean_path)}: {n} labels ({flagged} flagged samples {what})")
    if args.html is None and not args.clean_csv or args.top is not None:
        from cdmix.issues import score_note

        shown = rank_label_issues(args.run_dir, top=args.top or 20)
        summary = read_summary(args.run_dir)
        notes = [line for line in (score_note(summary), collapse_caution(summary), one_class_caution(shown)) if line]
        table = format_table(shown)
        for line in notes + table:
            print(line)
    return 0


def cmd_predict(args) -> int:
    from cdmix.atomic import check_output
    from cdmix.predict import describe, image_files, load_model, predict_files
    from cdmix.safetext import neutralise_cell, neutralise_path, printable

    if args.csv:  # before any work: never a run's file, its data or one of the images, nor an existing file
        check_output(args.csv, "--csv", overwrite=args.overwrite, run_dir=args.run_dir,
                     inputs=image_files(args.images))
    model = load_model(args.run_dir)
    files, probs = predict_files(model, args.images)
    rows = describe(probs, model.class_names)
    names = [printable(f) for f in files]
    classes = [printable(row["class"]) for row in rows]
    width = max(len(n) for n in names)
    print(f"{'image':<{width}}  {'predicted':<12}  prob")
    for name, cls, row in zip(names, classes, rows):
        print(f"{name:<{width}}  {cls:<12}  {row['prob']:.3f}")
    if args.csv:
        import csv
        import io

        from cdmix.atomic import atomic_write

        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["path", "label", "prob", *(neutralise_cell(c) for c in model.class_names)])
        for path, row, p in zip(files, rows, probs):
            writer.writerow([neutralise_path(str(path)), neutralise_cell(row["class"]), f"{row['prob']:.6f}",
                             *(f"{v:.6f}" for v in p)])
        atomic_write(args.csv, out.getvalue())
        print(f"wrote {printable(args.csv)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cdmix",
        description="Train image classifiers on noisy labels (DivideMix, Jo-SRC, their hybrid) and "
                    "rank the samples whose labels are probably wrong.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (default: DivideMix on digits with 40%% symmetric noise)",
                       description="Train a model. Settings: defaults < --preset < --config file < flags.")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    from cdmix.simclr_defaults import PRETRAIN_DEFAULTS

    p = sub.add_parser(
        "pretrain", help="SimCLR pretraining of an encoder on the training images, labels unused (C2D); then "
                         "cdmix train --pretrained RUN_DIR",
        description="Self-supervised SimCLR pretraining on the training split's images (never the test split; the "
                    "labels are not used for training): NT-Xent on two augmented views, SupContrast's settings "
                    "(batch 1024, lr 0.5, temperature 0.5, its cosine schedule, SGD 0.9, weight decay 1e-4) and "
                    f"{PRETRAIN_DEFAULTS['epochs']} epochs unless a --preset (simclr-cifar10, simclr-cifar100: "
                    "SupContrast's 1000) or a flag says otherwise. The same data flags as train. The run folder holds "
                    "encoder.safetensors and encoder.json; a kNN monitor of the test split is logged (knn_acc) and "
                    "label_issues.csv ranks the samples by kNN label disagreement in the encoder's feature space "
                    "(cdmix issues RUN_DIR). Resume a stopped run with cdmix resume RUN_DIR.")
    add_train_flags(p, PRETRAIN_DEFAULTS)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("resume", help="continue a run from its last completed epoch")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("evaluate", help="test accuracy of a run's saved checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("noise", help="write a synthetic noise file (DivideMix JSON format)")
    p.add_argument("output", help="JSON file to write")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-path", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--noise-mode", default="sym")
    p.add_argument("--noise-rate", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_noise)

    p = sub.add_parser("presets", help="list the published settings with the accuracy they should reach")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("issues", help="training samples ranked by how likely their label is wrong",
                       description="Print the most suspicious training samples (rank, index, the path or id where "
                                   "the data has one, given and predicted class, clean_prob, issue_score); write a "
                                   "review page with thumbnails (--html) or the cleaned labels (--clean-csv).")
    p.add_argument("run_dir")
    p.add_argument("--top", type=int, default=None,
                   help="the K most suspicious (default 20 printed, 100 on the --html page)")
    p.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                   help="write the review page of the top suspects as thumbnails (default RUN_DIR/issues.html)")
    p.add_argument("--clean-csv", metavar="PATH", help="write the cleaned labels as a CSV (path,label for "
                   "folder/csv data, a --dataset csv source; else index,label)")
    p.add_argument("--fix", choices=("drop", "relabel"), default="drop",
                   help="--clean-csv: leave the flagged samples (clean_prob < 0.5) out, or give them the "
                        "predicted class (default drop)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --html / --clean-csv file (never a file of a run, nor its data)")
    p.set_defaults(func=cmd_issues)

    p = sub.add_parser("predict", help="classify images with a finished run's nets",
                       description="Classify image files or folders of them with the final nets of a run "
                                   "(mean softmax of its nets), decoded and resized as its training images were.")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--csv", help="also write path,label,prob and every class's probability to this CSV")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --csv file (never a file of a run, its data, nor an image)")
    p.set_defaults(func=cmd_predict)

    add_prepare_parser(sub)
    add_report_parsers(sub)
    return parser


def add_prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="decode an image folder, csv or npz once into an image store (for data that does not fit "
                        "in memory, or large images); train on it with --dataset store --data-path STORE",
        description="Decode every image of SOURCE (a folder with one sub-folder per class, optionally under "
                    "train/ and test/; a path,label[,split] CSV; or an npz) into STORE: the short side resized to "
                    "--size, the center square kept, one memory-mappable uint8 array. Unreadable images are skipped "
                    "and listed in STORE/skipped.txt. A killed build continues where it stopped when run again; a "
                    "finished store is never rebuilt.")
    p.add_argument("source", metavar="SOURCE", help="image folder, .csv or .npz file")
    p.add_argument("--out", required=True, metavar="STORE", help="the store folder to write (new, or unfinished)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256: 224 px training crops)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the number of cores)")
    p.add_argument("--dataset", choices=("folder", "csv", "npz"), default=None,
                   help="what SOURCE is (default: from the path)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    import time

    from cdmix.data.sources import prepare_store
    from cdmix.data.store import SKIPPED

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be 1 or more, got {args.workers}")
    t0 = time.perf_counter()
    try:
        store = prepare_store(args.source, args.out, args.size, workers=args.workers, kind=args.dataset,
                              progress=args.progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the decoded images are kept; run the same command again to finish {args.out}",
              file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    skipped = store.skipped_count()
    print(f"{store.path}: {len(store) - skipped} images at {store.size}px, {len(store.class_names)} classes"
          + (f", {skipped} unreadable skipped (listed in {store.path / SKIPPED})" if skipped else "")
          + ("  (complete already: reused, nothing decoded)" if store.reused else f"  [{seconds:.1f}s]"))
    print(f"train on it: cdmix train --dataset store --data-path {store.path}")
    return 0


# ----- report | compare | bench: parsers that import nothing heavy; each command imports what it runs
def add_report_parsers(sub) -> None:
    p = sub.add_parser(
        "report", help="one-page HTML report of a run (plots, config, summary); several runs side by side",
        description="Write a self-contained HTML page (plots embedded, opens offline) and its PNGs beside it. "
                    "One run: RUN_DIR/report.html. Several runs: ./report.html unless --out is given.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="cdmix run folder(s)")
    p.add_argument("--out", help="the HTML file to write (or a folder to write report.html in)")
    p.add_argument("--top", type=int, default=None,
                   help="samples in the confusion matrix of the most suspicious (default 10%%, at most 200)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare", help="summaries of runs side by side; flags runs that ended > 2 points below their best",
        description="Print the summaries of the runs as a table: dataset, method, epochs, the test accuracy at the "
                    "epoch a validation set chose ('selected'), best and last test "
                    "accuracy, best - last, noise rate nominal and actual, seconds. Runs whose best - last exceeds "
                    "2 points are marked '!'. --plot also draws their test-accuracy curves in one figure, runs "
                    "that differ only in the seed averaged (mean line, min-max band).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="cdmix run folder(s)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--plot", metavar="FILE.png", help="also write the runs' test-accuracy curves to this PNG: one "
                   "line per group of runs whose config.json differs only in the seed, their mean")
    p.add_argument("--title", default="", help="the --plot figure's title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.set_defaults(func=cmd_compare)

    # No option prefix: every argument, --help included, goes on to benchmarks/bench.py.
    p = sub.add_parser(
        "bench", add_help=False, prefix_chars="+",
        help="speed of one warm-up + one DivideMix epoch against the official-style pipeline (from a checkout: "
             "runs ./benchmarks/bench.py; `cdmix bench --help` lists its flags)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)


def cmd_report(args) -> int:
    from cdmix.report import build_report

    report = build_report(args.run_dirs, args.out, args.top)
    print(f"wrote {report.page}")
    print(f"  and {len(report.pngs)} plot(s) beside it: {', '.join(p.name for p in report.pngs)}")
    for line in report.missing:
        print(f"  not drawn: {line}")
    print(f"open it in a browser: {report.page.resolve().as_uri()}")
    return 0


def cmd_compare(args) -> int:
    from cdmix.report import compare_runs
    from cdmix.report.compare import plot_runs

    print(compare_runs(args.run_dirs, markdown=args.markdown), end="")
    if args.plot:
        print(f"figure: {plot_runs(args.run_dirs, args.plot, args.title, overwrite=args.overwrite)}")
    return 0


def cmd_bench(args) -> int:
    """Run the benchmark of the repository checkout in the current folder (``benchmarks/bench.py``), or
    of the folder ``$CDMIX_BENCHMARKS``; the benchmark is not part of the installed package."""
    import importlib.util
    import os
    from pathlib import Path

    folder = Path(os.environ.get("CDMIX_BENCHMARKS", "benchmarks")).resolve()
    script = folder / "bench.py"
    if not script.is_file():
        raise UserError(f"no {script}: the benchmark is not installed with cdmix; run `cdmix bench` from the root "
                        "of a checkout of the repository (or `python benchmarks/bench.py ...` there)")
    spec = importlib.util.spec_from_file_location("cdmix_benchmarks_bench", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.main(args.bench_args, prog="cdmix bench")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now; warnings as ``warning: ...``, notes as they are."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)

    def format(self, record: logging.LogRecord) -> str:
        from cdmix.safetext import printable

        text = printable(record.getMessage(), keep="\n")  # a file name's ESC[... is shown, not run
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging() -> None:
    """cdmix's messages (logger "cdmix") as lines on stderr."""
    logger = logging.getLogger("cdmix")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UserError as exc:
        from cdmix.safetext import printable

        print(f"error: {printable(exc)}", file=sys.stderr)  # names from the data: no control characters
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch is saved; continue with `cdmix resume RUN_DIR`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
