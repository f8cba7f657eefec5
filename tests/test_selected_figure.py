"""The figure to set beside a published one (issue #25.2): where a validation set chose best.pt, the
test accuracy at that epoch is what `cdmix train` prints first, what the report and `cdmix compare`
show, and what `cdmix presets` says the Clothing1M figure is compared with."""

import json

import pytest

from cdmix.cli import main
from cdmix.report.compare import compare_runs
from cdmix.report.rundata import selected_test_accuracy


def run(capsys, tmp_path, name, *flags):
    out = tmp_path / name
    code = main(["train", "--method", "standard", "--epochs", "3", "--width", "4", "--out", str(out), *flags])
    assert code == 0
    return out, capsys.readouterr().out, json.loads((out / "summary.json").read_text())


def compare_cell(run_dir, column):
    """One cell of `cdmix compare --markdown` for one run."""
    lines = compare_runs([run_dir], markdown=True).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    values = [c.strip() for c in lines[2].strip("|").split("|")]
    return values[header.index(column)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("selected")


def test_validation_selected_run_prints_the_selected_epochs_test_accuracy_first(capsys, runs):
    out, text, summary = run(capsys, runs, "val", "--val-fraction", "0.2")
    assert summary["selected_by"] == "val_acc"
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    selected = summary["test_at_selected_epoch"]["test_acc"]
    assert selected_test_accuracy(summary) == selected
    line = next(line for line in text.splitlines() if line.startswith("test accuracy:"))
    assert line.startswith(f"test accuracy: {selected:.2f}% at epoch {summary['selected_epoch']}, the epoch the "
                           "validation set chose") and "picked on test" in line and len(rows) == 3
    assert compare_cell(out, "selected") == f"{selected:.2f}"


def test_test_selected_run_has_no_selected_figure(capsys, runs):
    out, text, summary = run(capsys, runs, "noval", "--val-fraction", "0")
    assert summary["selected_by"] == "test_acc" and selected_test_accuracy(summary) is None
    assert "test_at_selected_epoch" not in summary
    assert any(line.startswith(f"test accuracy: best {summary['test_acc_best']:.2f}%") for line in text.splitlines())
    assert compare_cell(out, "selected") == "-"


def test_presets_say_which_figure_the_published_one_is(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("dividemix-clothing1m "))
    following = next(line for line in lines[at + 1:] if "compare the published figure with" in line)
    assert "clean validation set chose" in following
