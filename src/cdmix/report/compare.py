"""Run summaries side by side (``cdmix compare``): one row per run, runs that lost accuracy flagged."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdmix.errors import UserError
from cdmix.report.rundata import (RunData, acc, load_run, num, pct, read_summary, run_folders, run_names,
                                  selected_test_accuracy)

DROP_FLAG_POINTS = 2.0  # compare/report flag runs whose best - last test accuracy exceeds this

COMPARE_COLUMNS = ("!", "run", "dataset", "method", "epochs", "selected", "best", "last", "best-last", "noise nominal",
                   "noise actual", "seconds")
LEFT_ALIGNED = {"!", "run", "dataset", "method"}
# Settings that do not change what a run computes (or only where it is written): runs that differ in
# these and the seed are one group in ``compare --plot``.
NOT_A_SETTING = {"seed", "out", "overwrite", "progress", "device", "compile", "data_placement", "eval_batch_size"}


def accuracy_drop(summary: dict[str, Any]) -> float:
    """Best minus last test accuracy in points (NaN when either is unknown)."""
    return num(summary.get("test_acc_best")) - num(summary.get("test_acc_last"))


def summary_row(name: str, summary: dict[str, Any]) -> dict[str, str]:
    """The columns of ``compare`` for one run (strings; '-' where unknown) plus the flag."""
    drop = accuracy_drop(summary)
    done, total = summary.get("epochs_done"), summary.get("epochs")
    epochs = f"{done}/{total}" if done is not None and total is not None else str(done if done is not None else "-")
    seconds = num(summary.get("seconds_total"))
    return {
        "!": "!" if math.isfinite(drop) and drop > DROP_FLAG_POINTS else "",
        "run": name,
        "dataset": str(summary.get("dataset") or "-"),
        "method": str(summary.get("method") or "-"),
        "epochs": epochs,
        "selected": acc(selected_test_accuracy(summary)),
        "best": acc(summary.get("test_acc_best")),
        "last": acc(summary.get("test_acc_last")),
        "best-last": acc(drop),
        "noise nominal": pct(summary.get("noise_rate_nominal")),
        "noise actual": pct(summary.get("noise_rate_actual")),
        "seconds": f"{seconds:.0f}" if math.isfinite(seconds) and seconds >= 100 else
                   (f"{seconds:.1f}" if math.isfinite(seconds) else "-"),
    }


def flag_line(rows: list[dict[str, str]]) -> str:
    """The line under the table: which runs are flagged, and why."""
    flagged = [row["run"] for row in rows if row["!"]]
    if flagged:
        return (f"! best - last > {DROP_FLAG_POINTS:g} points (accuracy fell after the best epoch: a collapse or "
                f"over-fitting to the noisy labels): {', '.join(flagged)}")
    unknown = [row["run"] for row in rows if row["best-last"] == "-"]
    if len(unknown) == len(rows):
        return "no run has a best and a last test accuracy (a `cdmix pretrain` run has none: its kNN accuracy is in " \
               "`cdmix report`)"
    line = f"no run ended more than {DROP_FLAG_POINTS:g} points below its best test accuracy"
    return line + (f" (no test accuracy: {', '.join(unknown)})" if unknown else "")


def format_table(rows: list[dict[str, str]], markdown: bool = False) -> str:
    """``summary_row`` rows as an aligned plain-text (or Markdown) table, then the flag line."""
    if markdown:
        lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |",
                 "|" + "|".join(":-:" if c == "!" else (":--" if c in LEFT_ALIGNED else "--:")
                                for c in COMPARE_COLUMNS) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in COMPARE_COLUMNS) + " |")
        return "\n".join(lines) + "\n\n" + flag_line(rows) + "\n"
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in COMPARE_COLUMNS}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].ljust(widths[c]) if c in LEFT_ALIGNED else values[c].rjust(widths[c])
                         for c in COMPARE_COLUMNS).rstrip()

    out = [line({c: c for c in COMPARE_COLUMNS}), "  ".join("-" * widths[c] for c in COMPARE_COLUMNS)]
    out += [line(row) for row in rows]
    return "\n".join(out) + "\n\n" + flag_line(rows) + "\n"


def compare_runs(run_dirs: Sequence[str | Path] | str | Path, markdown: bool = False) -> str:
    """The summaries of ``run_dirs`` side by side as a plain-text (or Markdown) table.

    Columns: run, dataset, method, epochs (done/planned), "selected": the test accuracy at the epoch a
    validation set chose (the figure to compare with a paper that selects on validation; '-' when the
    test set chose), best and last test accuracy (%), best - last
    (points), noise rate nominal and actual, seconds. Runs whose best - last exceeds 2 points get a
    ``!`` and are named in a line under the table. Raises UserError for a folder that is not a run.
    """
    paths = run_folders(run_dirs)
    rows = [summary_row(name, read_summary(path)) for name, path in zip(run_names(paths), paths)]
    return format_table(rows, markdown=markdown)


def run_setting(run: RunData) -> dict[str, Any]:
    """What makes a run's setting, for :func:`seed_groups`: its config.json without ``NOT_A_SETTING``;
    a field that an older cdmix did not write counts at its default; an automatic warm-up counts as
    "auto", not as the length each seed's run decided (nor the lr step that follows from it)."""
    import json
    from dataclasses import MISSING, fields

    from cdmix.config import Config, after_warmup_midpoint

    defaults = {f.name: f.default for f in fields(Config) if f.default is not MISSING}
    settings = {**json.loads(json.dumps(defaults)), **(run.config or {})}
    warmup = settings.get("warmup")
    if str(run.summary.get("warmup_rule", "")).startswith("auto") and isinstance(warmup, int):
        if settings.get("lr_step") == after_warmup_midpoint(warmup, int(settings["epochs"])):
            settings["lr_step"] = None
        settings["warmup"] = "auto"
    return {k: v for k, v in settings.items() if k not in NOT_A_SETTING}


def seed_groups(runs_data: list[RunData]) -> list[tuple[str, list[RunData]]]:
    """Runs whose setting (:func:`run_setting`) agrees apart from the seed, in first-seen order,
    each as (label, runs). The label is what the group's run names share, a trailing seed tag
    (``-s``, ``_seed``) cut off (``hybrid-s0`` and ``hybrid-s1``: ``hybrid``); a run without config.json
    is a group of its own."""
    keyed: dict[str, list[RunData]] = {}
    for run in runs_data:
        key = repr(sorted(run_setting(run).items())) if run.config else f"run:{run.path}"
        keyed.setdefault(key, []).append(run)
    groups = []
    for members in keyed.values():
        label = members[0].name
        if len(members) > 1:
            shared = re.sub(r"[-_ .]*(seed|s)?[-_ .]*$", "", os.path.commonprefix([m.name for m in members]))
            label = shared or " / ".join(m.name for m in members)
        groups.append((label, members))
    return groups


def plot_runs(run_dirs: Sequence[str | Path] | str | Path, out: str | Path, title: str = "",
              overwrite: bool = False) -> Path:
    """``cdmix compare --plot``: write the test-accuracy curves of ``run_dirs`` to the PNG ``out``, runs
    that differ only in the seed averaged (:func:`seed_groups`, ``plots.plot_accuracy_groups``).
    Raises UserError when no run has test accuracy per epoch, or for an ``out`` that is not a new .png
    file (an existing one only with ``overwrite``; never a run's own file)."""
    from cdmix.atomic import atomic_write, check_output
    from cdmix.report.plots import plot_accuracy_groups

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--plot {out}: give a .png file name (the figure is a PNG)")
    check_output(out, "--plot", overwrite=overwrite)
    paths = run_folders(run_dirs)
    runs_data = [load_run(path, name, curves_only=True) for path, name in zip(paths, run_names(paths))]
    plot = plot_accuracy_groups(seed_groups(runs_data), title)
    if plot.png is None:
        raise UserError(f"nothing to plot: {plot.missing} (a `cdmix pretrain` run has no test accuracy per epoch; "
                        "`cdmix report` draws its kNN accuracy)")
    atomic_write(out, plot.png)
    return out
