"""``cdmix`` command line: train | resume | evaluate | noise | presets | issues | report | compare | bench."""

from __future__ import annotations

import argparse
import sys

from cdmix.errors import UserError

# Help texts of the flags users reach for most; every other Config field gets a flag too.
FLAG_HELP = {
    "dataset": "digits (default, built in) | cifar10 | cifar100 | cifar10n | cifar100n | folder | csv | npz",
    "data_path": "folder with the CIFAR pickles / image folder / CSV file / .npz file",
    "labels": "CIFAR-N label set: worst | aggre | random1 | random2 | random3 (10N), noisy (100N)",
    "label_file": "path of CIFAR-10_human.pt / CIFAR-100_human.pt",
    "download": "download CIFAR / CIFAR-N files when missing (never done without this flag)",
    "image_size": "resize folder/csv images to this size (default 32)",
    "noise_mode": "synthetic noise: sym | sym-exclusive | asym | pairflip",
    "noise_rate": "synthetic noise rate in [0, 1]",
    "noise_file": "read (or write, if missing) the noisy labels as a DivideMix JSON list",
    "val_fraction": "hold out this part of the training data for model selection",
    "open_set_rate": "replace this part of the training images with open-set images",
    "open_set_source": "open-set images: noise | digits | npz:PATH | cifar100:PATH (an .npz or cifar-100-python folder)",
    "method": "standard | dividemix | josrc | hybrid",
    "model": "preact_resnet18 | wrn28 | small_cnn (default: per dataset)",
    "width": "model width (base channels; widen factor for wrn28)",
    "epochs": "number of epochs",
    "warmup": "warm-up epochs (plain cross-entropy)",
    "batch_size": "batch size (DivideMix warm-up uses twice this)",
    "lr": "learning rate",
    "optimizer": "sgd (momentum, DivideMix) | adam (official Jo-SRC CIFAR run)",
    "schedule": "lr schedule: step | cosine",
    "lr_step": "step schedule: lr /10 from this epoch (default epochs // 2)",
    "lambda_u": "weight of the unlabeled loss (DivideMix)",
    "p_threshold": "clean probability threshold of the division",
    "alpha": "MixUp Beta(alpha, alpha)",
    "temperature": "sharpening temperature",
    "loss_history": "average per-sample losses over this many epochs (5 for 90%% noise)",
    "faithful_order": "official train-mode co-guess forwards, one per view (--no-faithful-order batches them)",
    "lambda_cons": "weight of the Jo-SRC consistency loss (hybrid)",
    "on_collapse": "warn | rollback (restore best.pt, cut lr and pseudo-label weight)",
    "seed": "random seed",
    "device": "auto | cpu | cuda",
    "amp": "bf16 autocast (default: on for CUDA, off for CPU)",
    "compile": "torch.compile the models (falls back to eager when unavailable)",
    "sync_bn": "under torchrun: synchronise BatchNorm statistics across ranks (default: per-rank BN)",
    "eval_batch_size": "batch size of the loss and test passes",
    "out": "run folder (default runs/<dataset>-<method>-<time>)",
    "overwrite": "replace an existing run in --out",
    "preset": "a published setting (see `cdmix presets`)",
    "progress": "progress bars (--no-progress: one line per epoch only)",
}


def _flag_type(annotation: str):
    if "bool" in annotation:
        return bool
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from cdmix.config import Config

    parser.add_argument("--config", dest="config_file", help="a TOML file of settings (flags override it)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(str(f.type))
        text = FLAG_HELP.get(f.name, f"(default {f.default})")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


def config_from_args(args: argparse.Namespace):
    from dataclasses import fields

    from cdmix.config import Config, build_config

    overrides = {f.name: getattr(args, f.name) for f in fields(Config)}
    return build_config(config_file=args.config_file, **overrides)


def cmd_train(args) -> int:
    from cdmix.engine import train

    return finish(train(config_from_args(args)))


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
    s = result.summary
    print(f"test accuracy: best {s['test_acc_best']:.2f}% (epoch {s['test_acc_best_epoch'] + 1}), "
          f"last {s['test_acc_last']:.2f}%")
    import math

    from cdmix.runs import read_metrics

    last = read_metrics(result.run_dir)[-1]
    prec, rec = last.get("sel_precision_net1"), last.get("sel_recall_net1")
    if prec is not None and not math.isnan(prec):
        print(f"clean selection (net1, last epoch): precision {prec:.3f}, recall {rec:.3f}, "
              f"ROC-AUC {last.get('sel_auc_net1', float('nan')):.3f}")
    print(f"suspected label errors: {result.run_dir / 'label_issues.csv'}  (cdmix issues {result.run_dir})")
    print(f"report:      cdmix report {result.run_dir}")
    print(f"tensorboard: tensorboard --logdir {result.run_dir}")


def cmd_evaluate(args) -> int:
    from cdmix.evaluate import evaluate_run

    accs = evaluate_run(args.run_dir, which=args.checkpoint)
    for name, acc in accs.items():
        print(f"{name}: {acc:.2f}%")
    return 0


def cmd_noise(args) -> int:
    from cdmix.data.noise import make_noisy_labels, noise_rate_actual, write_noise_file
    from cdmix.data.sources import load_source

    if not 0.0 <= args.noise_rate <= 1.0:
        raise UserError(f"noise rate must be in [0, 1], got {args.noise_rate}")
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
    return 0


def cmd_issues(args) -> int:
    from cdmix.issues import rank_label_issues

    issues = rank_label_issues(args.run_dir, top=args.top)
    header = f"{'rank':>5} {'index':>7} {'given':>6} {'predicted':>9} {'clean_prob':>10}"
    if issues.true_label is not None:
        header += f" {'true':>5}"
    print(header)
    for i in range(len(issues)):
        line = (f"{i + 1:>5} {issues.index[i]:>7} {issues.given_label[i]:>6} {issues.predicted_label[i]:>9} "
                f"{issues.clean_prob[i]:>10.4f}")
        if issues.true_label is not None:
            line += f" {issues.true_label[i]:>5}"
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdmix",
        description="Train image classifiers on noisy labels (DivideMix, Jo-SRC, their hybrid) and "
                    "rank the samples whose labels are probably wrong.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (default: DivideMix on digits with 40%% symmetric noise)",
                       description="Train a model. Settings: defaults < --preset < --config file < flags.")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("issues", help="training samples ranked by how likely their label is wrong")
    p.add_argument("run_dir")
    p.add_argument("--top", type=int, default=20, help="show the K most suspicious (default 20)")
    p.set_defaults(func=cmd_issues)

    from cdmix import bench, report

    report.add_report_parser(sub)
    report.add_compare_parser(sub)
    bench.add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch is saved; continue with `cdmix resume RUN_DIR`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
