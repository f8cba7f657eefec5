"""The run report (cdmix report) and run comparison (cdmix compare), made from a tiny real run."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cdmix
from cdmix import cli
from cdmix.errors import UserError
from cdmix.report import build_report, compare_runs, make_report, run_names

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ("accuracy", "selection", "warmup", "loss_hist", "training", "seconds", "confusion")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DivideMix run on digits: 2 warm-up epochs, then 3 epochs with a division (true labels known).
    The warm-up is automatic with its step floor and ceiling at 2 epochs (19 steps each), so it ends after 2."""
    out = tmp_path_factory.mktemp("tiny_run")
    cdmix.train(cdmix.Config(dataset="digits", epochs=5, warmup="auto", warmup_min_steps=38, warmup_max_steps=38,
                             batch_size=32, out=str(out), progress=False))
    return out


@pytest.fixture(scope="module")
def report(run_dir: Path):
    return build_report([run_dir])


@pytest.fixture(scope="module")
def stripped_copy(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the run that lost its division, label issues, config and selection columns, and whose
    summary says it ended 5 points below its best (what a late collapse looks like)."""
    copy = tmp_path_factory.mktemp("copies") / "collapsed_copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt", "events.*", "report*"))
    for name in ("division.npz", "label_issues.csv", "config.json"):
        (copy / name).unlink()
    with (run_dir / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [c for c in rows[0] if not c.startswith("sel_")]
    with (copy / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keep, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = json.loads((copy / "summary.json").read_text())
    summary["test_acc_best"] = summary["test_acc_last"] + 5.0
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def _distinct_colours(pixels: np.ndarray) -> int:
    packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    return len(np.unique(packed))


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def assert_nontrivial_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    pixels = _pixels(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300, f"{path.name} is tiny: {pixels.shape}"
    colours = _distinct_colours(pixels)
    assert colours > 16, f"{path.name} has only {colours} colours"
    assert pixels.std() > 10, f"{path.name} is nearly one colour (std {pixels.std():.1f})"
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3  # matplotlib decodes it too


# --------------------------------------------------------------------------- one run
def test_report_draws_every_plot_and_references_it(run_dir: Path, report) -> None:
    assert report.page == run_dir / "report.html"
    assert report.missing == []
    assert sorted(p.name for p in report.pngs) == sorted(f"report-{key}.png" for key in ALL_PLOTS)
    page = report.page.read_text()
    for png in report.pngs:
        assert png.parent == run_dir
        assert png.name in page, f"the page does not link {png.name}"
        embedded = base64.b64encode(png.read_bytes()).decode()
        assert f"data:image/png;base64,{embedded}" in page, f"the page does not embed {png.name}"
    assert page.count("data:image/png;base64,") == len(ALL_PLOTS)
    assert "http://" not in page and "https://" not in page  # opens offline: nothing to fetch


def test_every_plot_is_a_valid_nontrivial_png(report) -> None:
    for png in report.pngs:
        assert_nontrivial_png(png)


def test_page_holds_config_and_summary(run_dir: Path, report) -> None:
    page = report.page.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['test_acc_best']:.2f}%" in page and f"{summary['test_acc_last']:.2f}%" in page
    assert "nominal 40.0%" in page and f"actual {100 * summary['noise_rate_actual']:.1f}%" in page
    for key in ("p_threshold", "lambda_u", "warmup", "noise_rate_actual", "seconds_total"):
        assert f"<th>{key}</th>" in page
    assert "Not drawn" not in page
    # two nets, an unlabeled loss and a warm-up: the captions name them
    assert "dashed: net2" in page and "λu_eff × Lu" in page and "the model predicts another class" in page


def test_make_report_returns_the_page_and_takes_a_folder_as_out(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cdmix.report import page as page_module, plots

    monkeypatch.setattr(page_module, "run_plots", lambda run, top=None: [plots.plot_accuracy(run)])
    page = make_report(str(run_dir), out=tmp_path)
    assert page == tmp_path / "report.html" and page.is_file()
    assert (tmp_path / "report-accuracy.png").is_file()


def test_tensorboard_events_hold_the_division(run_dir: Path) -> None:
    """The live view shows the split: per-sample loss and clean-probability histograms, GMM means."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    histograms = events.Tags()["histograms"]
    for net in ("net1", "net2"):
        assert f"division/loss_{net}" in histograms and f"division/clean_prob_{net}" in histograms
        assert {f"division/gmm_means_{net}_0", f"division/gmm_means_{net}_1"} <= set(events.Tags()["scalars"])
    loss = events.Histograms("division/loss_net1")
    assert [h.step for h in loss] == [3, 4, 5]  # every epoch after the 2 warm-up epochs (1-based steps)
    assert loss[-1].histogram_value.num == len(np.load(run_dir / "division.npz")["loss_net1"])


# --------------------------------------------------------------------------- several runs, missing parts
def test_report_of_several_runs_and_a_run_missing_parts(run_dir: Path, stripped_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "both.html"
    report = build_report([run_dir, stripped_copy], out=out)
    assert report.page == out
    page = out.read_text()
    names = run_names([run_dir, stripped_copy])
    assert names == [run_dir.name, "collapsed_copy"]
    assert f"{out.stem}-accuracy.png" in page  # one accuracy plot with a line per run
    for png in report.pngs:
        assert png.name in page
        assert_nontrivial_png(png)
    # 1 overview + 7 plots of the full run + 5 of the copy (no division.npz, no label_issues.csv)
    assert len(report.pngs) == 13
    assert len(report.missing) == 2 and all(line.startswith("collapsed_copy") for line in report.missing)
    assert page.count('class="missing"') >= 3  # two plots and the config table, said on the page
    assert "no division.npz" in page and "no label_issues.csv" in page
    assert "5.00 points below the best" in page  # the warning banner of the collapsed copy


def test_report_default_page_for_several_runs_is_in_the_current_folder(
        run_dir: Path, stripped_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from cdmix.report import page as page_module

    monkeypatch.setattr(page_module, "run_plots", lambda run, top=None: [])
    page = make_report([run_dir, stripped_copy])
    assert page == tmp_path / "report.html" and page.is_file()


# --------------------------------------------------------------------------- compare
def test_compare_lists_both_runs_and_flags_the_drop(run_dir: Path, stripped_copy: Path) -> None:
    text = compare_runs([run_dir, stripped_copy])
    lines = text.splitlines()
    header = lines[0].split()
    for column in ("run", "dataset", "method", "epochs", "best", "last", "best-last", "seconds"):
        assert column in header
    assert "noise nominal" in lines[0] and "noise actual" in lines[0]
    row_full = next(line for line in lines if run_dir.name in line and not line.startswith("!"))
    row_copy = next(line for line in lines if "collapsed_copy" in line and not line.startswith("! best"))
    assert row_copy.startswith("!") and not row_full.startswith("!")
    assert re.search(r"\b5\.00\b", row_copy) and "digits" in row_full and "dividemix" in row_full
    assert "40.0%" in row_full
    assert lines[-1].startswith("! best - last > 2 points") and lines[-1].endswith("collapsed_copy")

    markdown = compare_runs([run_dir, stripped_copy], markdown=True)
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[1].startswith("|:-:|")
    assert table[3].startswith("| ! | collapsed_copy |") and table[2].startswith("|  | ")


def test_compare_without_a_drop_flags_nothing(run_dir: Path) -> None:
    text = compare_runs(run_dir)
    assert "no run ended more than 2 points below" in text
    lines = text.splitlines()
    assert lines[0].startswith("!  run") and lines[1].startswith("-  ---")
    assert lines[2].startswith(f"   {run_dir.name}")


def test_compare_flag_line_names_runs_without_test_accuracy() -> None:
    """A pretraining run has no test accuracy: the line under the table must not claim it held."""
    from cdmix.report.compare import flag_line, summary_row

    encoder = summary_row("enc", {"method": "simclr", "epochs_done": 5})
    assert flag_line([encoder]).startswith("no run has a best and a last test accuracy")
    held = summary_row("ce", {"test_acc_best": 50.0, "test_acc_last": 49.5})
    assert flag_line([held, encoder]) == ("no run ended more than 2 points below its best test accuracy "
                                          "(no test accuracy: enc)")
    fell = summary_row("dm", {"test_acc_best": 50.0, "test_acc_last": 40.0})
    assert flag_line([held, fell, encoder]).endswith(": dm")


def test_cli_compare_and_report(run_dir: Path, stripped_copy: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["compare", "--markdown", str(run_dir), str(stripped_copy)]) == 0
    assert "| ! | collapsed_copy |" in capsys.readouterr().out
    out = tmp_path / "sub" / "copy.html"
    assert cli.main(["report", str(stripped_copy), "--out", str(out), "--top", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "not drawn: collapsed_copy loss_hist" in printed
    assert (tmp_path / "sub" / "copy-selection.png").is_file()


# --------------------------------------------------------------------------- bad input
def test_bad_run_dirs_are_user_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    no_metrics = tmp_path / "no_metrics"
    no_metrics.mkdir()
    shutil.copy(run_dir / "summary.json", no_metrics / "summary.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    for bad in (tmp_path / "missing", empty, a_file, no_metrics, broken):
        with pytest.raises(UserError):
            make_report([bad], out=tmp_path / "x.html")
    for bad in (tmp_path / "missing", empty, a_file, broken):
        with pytest.raises(UserError):
            compare_runs([run_dir, bad])
    with pytest.raises(UserError):
        compare_runs([])
    assert cli.main(["report", str(empty)]) == 2
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("error: ") == 2
    assert not (tmp_path / "x.html").exists()


def test_run_names_are_unique() -> None:
    assert run_names(["a/run", "b/run", "c/other"]) == ["a/run", "b/run", "other"]
    assert run_names(["a/run", "a/run"]) == ["a/run#1", "a/run#2"]


# --------------------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian chromium is not installed (apt-get install chromium); "
                                                  "the headless-browser rendering of report.html is not checked")
def test_report_renders_in_headless_chromium(report, tmp_path: Path) -> None:
    shot = tmp_path / "screenshot.png"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
               report.page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    pixels = _pixels(shot)
    assert pixels.shape[:2] == (2400, 1280)
    # The page shows its plots: many colours, and the blue of the accuracy line (matplotlib C0) is on it.
    assert _distinct_colours(pixels) > 200
    blue = np.all(np.abs(pixels.astype(int) - [31, 119, 180]) < 12, axis=-1)
    assert blue.sum() > 500, "the screenshot shows no plot lines"


def test_the_warmup_plot_says_why_it_is_absent(tmp_path: Path) -> None:
    from cdmix.report.plots import plot_warmup
    from cdmix.report.rundata import RunData

    def missing(summary: dict) -> str:
        return plot_warmup(RunData(path=tmp_path, name="r", summary=summary, metrics=[{"epoch": 1}])).missing

    assert missing({"method": "standard"}) == "standard has no automatic warm-up"  # not "a fixed warm-up"
    assert "fixed warm-up" in missing({"method": "dividemix", "warmup_epochs": 10, "warmup_rule": "fixed"})


def test_a_run_on_the_users_own_labels_says_no_noise_was_added(tmp_path: Path) -> None:
    from cdmix.report.page import key_facts
    from cdmix.report.rundata import RunData

    summary = {"noise_source": "none", "noise_mode": "none", "noise_rate_nominal": None, "noise_rate_actual": None}
    facts = dict(key_facts(RunData(path=tmp_path, name="mine", summary=summary, metrics=[])))
    assert facts["noise"].startswith("none added: the labels as given")


# --------------------------------------------------------------------------- compare --plot: seeds averaged
def _seed_copy(run_dir: Path, folder: Path, seed: int, shift: float, **settings) -> Path:
    """A copy of the run as if trained with another seed (its test accuracy shifted by ``shift``) or,
    with ``settings``, with other settings."""
    copy = folder / f"{settings and 'other' or 'm'}-s{seed}"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt", "events.*", "report*"))
    config = json.loads((copy / "config.json").read_text())
    config.update(seed=seed, out=str(copy), **settings)
    (copy / "config.json").write_text(json.dumps(config))
    with (copy / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["test_acc"] = f"{float(row['test_acc']) + shift}"
    with (copy / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:len(rows) - (seed == 1)])  # seed 1 is one epoch shorter
    return copy


def test_compare_plot_averages_the_seeds_of_one_setting(run_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from cdmix.report.compare import seed_groups
    from cdmix.report.plots import mean_curve
    from cdmix.report.rundata import load_run, column

    runs = [_seed_copy(run_dir, tmp_path, 0, 0.0), _seed_copy(run_dir, tmp_path, 1, 4.0),
            _seed_copy(run_dir, tmp_path, 0, 1.0, lambda_u=0.0)]
    data = [load_run(p) for p in runs]
    groups = seed_groups(data)
    assert [(label, [r.name for r in members]) for label, members in groups] == [("m", ["m-s0", "m-s1"]),
                                                                               ("other-s0", ["other-s0"])]
    x, mean, low, high, count = mean_curve(groups[0][1])
    base = column(load_run(run_dir).metrics, "test_acc")
    assert count == 2 and len(x) == len(base) - 1 and x[0] == 1  # the epochs both seeds have
    np.testing.assert_allclose(mean, base[:-1] + 2.0)
    np.testing.assert_allclose(low, base[:-1]) and np.testing.assert_allclose(high, base[:-1] + 4.0)

    png = tmp_path / "curves.png"
    assert cli.main(["compare", *map(str, runs), "--plot", str(png), "--title", "two settings"]) == 0
    assert f"figure: {png}" in capsys.readouterr().out
    assert_nontrivial_png(png)
    # An existing file needs --overwrite; a name that is not .png and a run's own file are refused.
    assert cli.main(["compare", str(runs[0]), "--plot", str(png)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["compare", str(runs[0]), "--plot", str(png), "--overwrite"]) == 0
    assert cli.main(["compare", str(runs[0]), "--plot", str(tmp_path / "curves.jpg")]) == 2
    assert cli.main(["compare", str(runs[0]), "--plot", str(runs[0] / "metrics.csv")]) == 2
    assert capsys.readouterr().err.count("error: ") == 2


def test_compare_plot_groups_seeds_whose_auto_warmup_or_cdmix_version_differ(run_dir: Path, tmp_path: Path) -> None:
    """Seeds of one setting stay one curve when their automatic warm-ups end at different epochs (config.json
    records each run's decision) or when one run was written by an older cdmix (a field it lacks is at its
    default); a fixed warm-up of another length is another setting."""
    from cdmix.config import after_warmup_midpoint
    from cdmix.report.compare import seed_groups
    from cdmix.report.rundata import load_run

    base = json.loads((run_dir / "config.json").read_text())
    assert json.loads((run_dir / "summary.json").read_text())["warmup_rule"].startswith("auto")
    later = after_warmup_midpoint(base["warmup"] + 1, base["epochs"])
    auto_s1 = _seed_copy(run_dir, tmp_path, 1, 0.0)
    config = json.loads((auto_s1 / "config.json").read_text())
    config.update(warmup=base["warmup"] + 1, lr_step=later)  # this seed's warm-up ended one epoch later
    del config["knn_k"]  # written by a cdmix from before the kNN scores: knn_k at its default
    (auto_s1 / "config.json").write_text(json.dumps(config))
    fixed = _seed_copy(run_dir, tmp_path, 2, 0.0, warmup=base["warmup"] + 1, lr_step=later)
    summary = json.loads((fixed / "summary.json").read_text())
    (fixed / "summary.json").write_text(json.dumps({**summary, "warmup_rule": "fixed"}))
    runs = [_seed_copy(run_dir, tmp_path, 0, 0.0), auto_s1, fixed]
    groups = seed_groups([load_run(p) for p in runs])
    assert [[r.name for r in members] for _, members in groups] == [["m-s0", "m-s1"], ["other-s2"]]
    config["knn_k"] = base["knn_k"] + 1  # a setting that differs splits them
    (auto_s1 / "config.json").write_text(json.dumps(config))
    assert len(seed_groups([load_run(p) for p in runs[:2]])) == 2
