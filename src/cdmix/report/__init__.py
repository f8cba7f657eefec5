"""See a run at a glance: a one-page report (``cdmix report``) and a side-by-side table (``cdmix compare``).

``make_report(run_dirs, out=None)`` writes one self-contained HTML page: every plot is embedded as
a base64 PNG, so the page opens offline and can be sent as a single file. The same PNGs are also
written beside the page, named ``<page stem>-<plot>.png`` (``report-accuracy.png``, ...).

Where the page goes:
  * one run: ``RUN_DIR/report.html`` (PNGs ``RUN_DIR/report-*.png``);
  * several runs: ``./report.html`` in the current folder unless ``out`` is given. The page then has
    one accuracy plot with a line per run, the comparison table, and a section per run with its own
    plots (PNGs ``report-<run>-*.png``).
``out`` may be a file or an existing folder (the page is then ``out/report.html``). An existing page
and its PNGs are replaced.

Plots: accuracy, selection, warmup (the automatic warm-up's separation curve), loss_hist (with the
GMM fit), training, seconds, confusion (see ``cdmix.report.plots``).

``write_review_page`` (``cdmix issues RUN --html``, ``cdmix.report.review``) writes the review page of the
top suspected label errors: thumbnails, given and predicted class, and a cleaned-labels download.

``compare_runs(run_dirs, markdown=False)`` returns the summaries side by side as a plain-text (or
Markdown) table and flags (``!``) every run whose best test accuracy is more than 2 points above
its last one: such a run lost accuracy after its best epoch (a late collapse, or over-fitting to
the noisy labels).

The parts: ``rundata`` reads a run folder, ``plots`` draws, ``page`` writes the HTML page, ``compare``
makes the table.
"""

from cdmix.report.compare import DROP_FLAG_POINTS, compare_runs, summary_row
from cdmix.report.page import Report, build_report, make_report
from cdmix.report.plots import MAX_TOP, Plot, default_top, run_plots
from cdmix.report.review import write_review_page
from cdmix.report.rundata import RunData, load_run, run_names

__all__ = ["DROP_FLAG_POINTS", "MAX_TOP", "Plot", "Report", "RunData", "build_report", "compare_runs", "default_top",
           "load_run", "make_report", "run_names", "run_plots", "summary_row", "write_review_page"]
