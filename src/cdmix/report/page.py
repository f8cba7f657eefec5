"""The one-page HTML report of one or several runs (``cdmix report``): plots embedded, PNGs beside it."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdmix import runs
from cdmix.atomic import atomic_write, refuse_inputs
from cdmix.errors import UserError
from cdmix.report.compare import COMPARE_COLUMNS, DROP_FLAG_POINTS, LEFT_ALIGNED, accuracy_drop, flag_line, summary_row
from cdmix.report.plots import Plot, plot_accuracy_runs, run_plots
from cdmix.report.rundata import (RunData, acc, format_seconds, load_run, num, pct, run_folders, run_names,
                                  selected_test_accuracy)

DEFAULT_PAGE = "report.html"

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1180px;margin:0 auto;padding:18px 28px 40px;background:#fff}
h1{font-size:1.55em;margin:.3em 0 .1em}
h2{font-size:1.25em;border-bottom:2px solid #dde;padding-bottom:4px;margin-top:1.6em}
h3{font-size:1.05em;margin:1.3em 0 .3em}
.sub{color:#667;font-size:.9em;margin:0 0 12px}
table{border-collapse:collapse;font-size:.88em;margin:6px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f3f4f8;font-weight:600;white-space:nowrap}
table.cmp td.num{text-align:right;font-variant-numeric:tabular-nums}table.cmp th{background:#f3f4f8}
tr.flag td{background:#fff4d6}
.grid{display:flex;flex-wrap:wrap;gap:0 24px}.grid table{flex:1 1 340px}
figure{margin:10px 0 22px}figure img{max-width:100%;border:1px solid #e3e3e8}
figcaption{font-size:.85em;color:#444;margin-top:3px}figcaption a{color:#557}
.missing{background:#f6f6f9;border:1px dashed #bbc;padding:10px 14px;color:#555;font-size:.9em}
.warn{background:#fff4d6;border-left:5px solid #e0a100;padding:8px 14px;margin:10px 0}
.note{color:#666;font-size:.85em}
"""


@dataclass
class Report:
    """What ``build_report`` wrote: the page and the PNG files beside it."""

    page: Path
    pngs: list[Path]
    missing: list[str]  # "plot: reason" for every plot left out


# --------------------------------------------------------------------------- what the page says about a run
def key_facts(run: RunData) -> list[tuple[str, str]]:
    s = run.summary
    best_epoch = s.get("test_acc_best_epoch")
    facts = [
        ("run folder", str(run.path.resolve())),
        ("dataset / method", f"{s.get('dataset', '-')} / {s.get('method', '-')}"
                             + (f" (preset {s['preset']})" if s.get("preset") else "")),
        ("model", str((run.config or {}).get("model", "-"))),
        ("epochs", f"{s.get('epochs_done', '-')} of {s.get('epochs', '-')} done"),
        *(pretraining_facts(s) if s.get("pretraining") else [
            ("best test accuracy", f"{acc(s.get('test_acc_best'))}%"
                                   + (f" at epoch {int(best_epoch)}" if isinstance(best_epoch, (int, float)) else "")),
            ("last test accuracy", f"{acc(s.get('test_acc_last'))}%"),
            ("best − last", f"{acc(accuracy_drop(s))} points")]),
        ("noise", "none added: the labels as given, which of them are wrong is unknown"
                  if s.get("noise_source") == "none" else
                  f"{s.get('noise_source', '-')} {s.get('noise_mode') or ''}: nominal "
                  f"{pct(s.get('noise_rate_nominal'))}, actual {pct(s.get('noise_rate_actual'))}".replace("  ", " ")),
        ("samples", f"train {s.get('num_train', '-')}, validation {s.get('num_val', '-')}, "
                    f"test {s.get('num_test', '-')}"),
        ("time", f"{format_seconds(num(s.get('seconds_total')))} on {s.get('device', '-')}"),
        ("collapse warnings", str(s.get("collapse_warnings", "-"))),
    ]
    if s.get("warmup_epochs") is not None:
        facts.insert(4, ("warm-up", f"{s['warmup_epochs']} epoch(s), {s.get('warmup_rule', 'fixed')}"))
    if s.get("selected_by"):
        facts.append(("best.pt chosen by", f"{s['selected_by']} (epoch {int(s.get('selected_epoch', 0))})"))
    selected = selected_test_accuracy(s)
    if selected is not None:  # the figure to set beside a published one selected on validation
        facts.insert(4, ("test accuracy at the selected epoch", f"{acc(selected)}% (epoch {s['selected_epoch']}, "
                                                                 "chosen on validation; compare this with a paper)"))
    return facts


def pretraining_facts(s: dict) -> list[tuple[str, str]]:
    """What a `cdmix pretrain` run has instead of test accuracies: no classifier was trained."""
    return [("kNN accuracy (last)", f"{acc(s.get('knn_acc_last'))}% (test images against the training images' "
                                    "given labels, in the encoder's feature space; no classifier was trained)")]


def run_warnings(run: RunData) -> list[str]:
    s = run.summary
    out = []
    drop = accuracy_drop(s)
    if math.isfinite(drop) and drop > DROP_FLAG_POINTS:
        out.append(f"the last test accuracy is {drop:.2f} points below the best: the run lost accuracy after "
                   f"its best epoch (collapse or over-fitting to the noisy labels)")
    if num(s.get("collapse_warnings")) > 0:
        out.append(f"{int(s['collapse_warnings'])} collapse warning(s) during training (see the ✕ marks)")
    done, total = s.get("epochs_done"), s.get("epochs")
    if isinstance(done, int) and isinstance(total, int) and done < total:
        out.append(f"the run stopped after {done} of {total} epochs (continue it with `cdmix resume {run.path}`)")
    return out


# --------------------------------------------------------------------------- HTML pieces
def _html_table(pairs: list[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f'<table class="{cls}">{body}</table>'


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _figure_html(plot: Plot, heading: str = "h3") -> str:
    title = f"<{heading}>{html.escape(plot.title)}</{heading}>"
    if plot.png is None:
        return f'{title}<div class="missing" id="missing-{plot.key}">Not drawn: {html.escape(plot.missing)}.</div>'
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'{title}<figure id="plot-{html.escape(plot.file)}"><img alt="{html.escape(plot.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(plot.caption)} '
            f'<a href="{html.escape(plot.file)}">{html.escape(plot.file)}</a></figcaption></figure>')


def _compare_html(run_list: list[RunData]) -> str:
    rows = [summary_row(run.name, run.summary) for run in run_list]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COMPARE_COLUMNS)
    body = ""
    for row in rows:
        cells = "".join(f'<td{"" if c in LEFT_ALIGNED else " class=num"}>{html.escape(row[c])}</td>'
                        for c in COMPARE_COLUMNS)
        body += f'<tr{" class=flag" if row["!"] else ""}>{cells}</tr>'
    return (f'<table class="cmp"><tr>{head}</tr>{body}</table><p class="note">{html.escape(flag_line(rows))}. '
            f"Accuracy in %, best − last in points, seconds of training.</p>")


def _run_section(run: RunData, plots: list[Plot], heading: str) -> str:
    parts = [f'<div class="warn">⚠ {html.escape(warning)}</div>' for warning in run_warnings(run)]
    parts.append(_html_table(key_facts(run)))
    parts.extend(f'<p class="note">{html.escape(note)}</p>' for note in run.notes)
    parts.extend(_figure_html(p, heading) for p in plots)
    parts.append(f"<{heading}>Resolved config and summary</{heading}>")
    config_table = (_html_table([(k, _value_text(v)) for k, v in sorted(run.config.items())])
                    if run.config else '<div class="missing">no config.json</div>')
    summary_table = _html_table([(k, _value_text(v)) for k, v in sorted(run.summary.items())])
    parts.append(f'<div class="grid"><div><p class="note">{runs.CONFIG}: every setting of the run, as it ran'
                 f'</p>{config_table}</div><div><p class="note">{runs.SUMMARY}</p>{summary_table}</div></div>')
    return "\n".join(parts)


# --------------------------------------------------------------------------- the page
def _page_path(paths: list[Path], out: str | Path | None) -> Path:
    if out is None:
        return paths[0] / DEFAULT_PAGE if len(paths) == 1 else Path.cwd() / DEFAULT_PAGE
    page = Path(out)
    if page.is_dir() or str(out).endswith(("/", os.sep)):  # a folder, made when missing
        page = page / DEFAULT_PAGE
    elif not page.exists() and not page.suffix:
        raise UserError(f"--out {out} does not exist; end it with / to have the folder made, or give a file "
                        f"name ending .html")
    runs.refuse_run_file(page)
    for path in paths:  # nor the data a run was made from (its training CSV, ...)
        refuse_inputs(page, "--out", path)
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder {page.parent} for --out: {exc.strerror or exc}") from None
    return page


def _named(plots: list[Plot], prefix: str) -> list[Plot]:
    for plot in plots:
        plot.file = f"{prefix}-{plot.key}.png"
    return plots


def build_report(run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None,
                 top: int | None = None) -> Report:
    """Write the report page and its PNGs (see ``cdmix.report``); ``top``: samples in the confusion matrix."""
    paths = run_folders(run_dirs)
    if top is not None and top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    run_list = [load_run(path, name) for path, name in zip(paths, run_names(paths))]
    page = _page_path(paths, out)
    stem = page.stem
    stamp = time.strftime("%Y-%m-%d %H:%M")
    single = len(run_list) == 1
    title = f"cdmix report: {run_list[0].name if single else f'{len(run_list)} runs'}"
    where = f"{html.escape(str(run_list[0].path.resolve()))} · " if single else ""
    parts = [f"<h1>{html.escape(title)}</h1><p class=sub>{where}made {stamp} by <code>cdmix report</code></p>"]
    sections: list[tuple[str, list[Plot]]] = []
    if not single:
        overview = _named([plot_accuracy_runs(run_list)], stem)
        sections.append(("all runs", overview))
        parts += ["<h2>Summaries side by side</h2>", _compare_html(run_list), _figure_html(overview[0], "h2")]
    slugs: list[str] = []
    for run in run_list:
        prefix = stem
        if not single:  # a heading and a file-name part per run
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name).strip("_") or "run"
            while slug in slugs:
                slug += "_"
            slugs.append(slug)
            prefix = f"{stem}-{slug}"
            parts.append(f'<h2 id="run-{html.escape(slug)}">{html.escape(run.name)}</h2>')
        plots = _named(run_plots(run, top), prefix)
        parts.append(_run_section(run, plots, "h2" if single else "h3"))
        sections.append((run.name, plots))
    body = "\n".join(parts)
    page_html = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                 f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
                 f"<body><main>\n{body}\n</main></body></html>\n")
    pngs, missing = [], []
    for name, plots in sections:
        for plot in plots:
            if plot.png is None:
                missing.append(f"{name} {plot.key}: {plot.missing}")
                continue
            path = page.parent / plot.file
            atomic_write(path, plot.png)
            pngs.append(path)
    atomic_write(page, page_html)
    return Report(page, pngs, missing)


def make_report(run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None,
                top: int | None = None) -> Path:
    """Write the one-page HTML report of one or several runs; returns the page's path.

    run_dirs: a run folder or a list of them. out: the page (default RUN_DIR/report.html for one run,
    ./report.html for several); the PNGs are written beside it. top: how many of the most suspicious
    samples the confusion matrix uses (default 10%, at most 200). Raises UserError for a folder that
    is not a cdmix run.
    """
    return build_report(run_dirs, out, top).page
