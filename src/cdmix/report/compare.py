"""Run summaries side by side (``cdmix compare``): one row per run, runs that lost accuracy flagged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdmix.report.rundata import acc, num, pct, read_summary, run_folders, run_names, selected_test_accuracy

DROP_FLAG_POINTS = 2.0  # compare/report flag runs whose best - last test accuracy exceeds this

COMPARE_COLUMNS = ("!", "run", "dataset", "method", "epochs", "selected", "best", "last", "best-last", "noise nominal",
                   "noise actual", "seconds")
LEFT_ALIGNED = {"!", "run", "dataset", "method"}


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
    return f"no run ended more than {DROP_FLAG_POINTS:g} points below its best test accuracy"


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
