"""Issue #27, the output side: what `issues`, `predict` and `report` write and print never destroys a
file, never lets a name from the data act as code (HTML, spreadsheet formula, terminal sequence), and
every damaged input (model.json, an image, a weights file) gets one line, no traceback.

One tiny run (1 epoch, width 2, 16 px) on a folder whose class and file names are hostile; tests that
change it work on a copy.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmix.cli import main
from cdmix.errors import UserError

CLASSES = ["$\\frac{$", "<!--<script>", "=SUM(1+1)"]
ESC_NAME = "\x1b]0;pwned\x07\x1b[31mred.png"  # retitles the terminal and turns it red when printed raw
FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, out, err, *words):
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(data folder, run folder): 3 classes named as in CLASSES, 20 digit images each; in each class one
    file named like a formula, one named with terminal escape sequences, one beginning with @ and -."""
    from PIL import Image

    from cdmix.data.sources import load_source

    raw = load_source("digits", "unused")
    base = tmp_path_factory.mktemp("hostile")
    data = base / "data"
    for label, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(raw.train_labels == label)[:20]):
            special = {0: "=HYPERLINK(x).png", 1: ESC_NAME, 2: "@cmd.png", 3: "-2+3.png"}
            Image.fromarray(raw.train_images[i][..., 0]).save(data / name / special.get(k, f"{k:02d}.png"))
    run = base / "run"
    code = main(["train", "--dataset", "folder", "--data-path", str(data), "--epochs", "1", "--width", "2",
                 "--method", "standard", "--image-size", "16", "--out", str(run), "--no-progress"])
    assert code == 0
    return data, run


@pytest.fixture
def run_copy(hostile, tmp_path):
    """A copy of the run (its data folder copied too and named in its config.json)."""
    data, run = hostile
    new_data, new_run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, new_data)
    shutil.copytree(run, new_run)
    config = json.loads((new_run / "config.json").read_text())
    config["data_path"] = str(new_data)
    (new_run / "config.json").write_text(json.dumps(config, indent=2))
    return new_data, new_run


def _n_train(run: Path) -> int:
    """How many training images the run scored (the rows of its label_issues.csv)."""
    from cdmix.issues import rank_label_issues

    return len(rank_label_issues(run))


def _cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def _formula_cells(text: str) -> list[str]:
    """Cells a spreadsheet would run as formulas (a plain number such as -1 is not one)."""
    return [c for c in _cells(text) if c.startswith(FORMULA_CHARS) and not NUMBER.fullmatch(c)]


# --------------------------------------------------------------------------- 1: data loss
@pytest.mark.parametrize("own", ["config.json", "summary.json", "label_issues.csv"])
def test_outputs_refuse_the_runs_own_files(capsys, run_copy, own):
    data, run = run_copy
    before = (run / own).read_bytes()
    image = next((data / CLASSES[0]).glob("0*.png"))
    for argv in (["issues", run, "--clean-csv", run / own], ["issues", run, "--html", run / own],
                 ["issues", run, "--clean-csv", run / own, "--overwrite"],
                 ["predict", run, image, "--csv", run / own, "--overwrite"]):
        _one_line_error(*_run_main(capsys, *argv), own)
        assert (run / own).read_bytes() == before


def test_outputs_refuse_the_runs_training_csv_and_its_images(capsys, run_copy, tmp_path):
    data, run = run_copy
    # the run as if it had been made from a CSV file (what `check_output` reads: config.json's data_path)
    source = tmp_path / "train.csv"
    source.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},x\n" for p in sorted(data.rglob("*.png"))))
    before = source.read_bytes()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dataset": "csv", "data_path": str(source)}))
    image = next((data / CLASSES[0]).glob("0*.png"))
    for argv in (["issues", run, "--clean-csv", source, "--overwrite"],
                 ["issues", run, "--html", source, "--overwrite"],
                 ["predict", run, image, "--csv", source, "--overwrite"], ["report", run, "--out", source]):
        _one_line_error(*_run_main(capsys, *argv), str(source), "data the run was made from")
        assert source.read_bytes() == before
    # an image predict reads is never its output, --overwrite or not
    pixels = image.read_bytes()
    _one_line_error(*_run_main(capsys, "predict", run, image, "--csv", image, "--overwrite"), "input")
    assert image.read_bytes() == pixels


def test_outputs_ask_for_overwrite_before_replacing_a_file(capsys, run_copy, tmp_path):
    data, run = run_copy
    image = next((data / CLASSES[0]).glob("0*.png"))
    for name, argv in (("clean.csv", ["issues", run, "--clean-csv"]), ("page.html", ["issues", run, "--html"]),
                       ("pred.csv", ["predict", run, image, "--csv"])):
        target = tmp_path / name
        target.write_text("precious\n")
        _one_line_error(*_run_main(capsys, *argv, target), "exists", "--overwrite")
        assert target.read_text() == "precious\n"
        code, out, err = _run_main(capsys, *argv, target, "--overwrite")
        assert code == 0, err
        assert target.read_text() != "precious\n" and not list(tmp_path.glob(f".{name}.*.tmp"))
    # the run's own review page is the --html default and is replaced without asking
    for _ in range(2):
        code, out, err = _run_main(capsys, "issues", run, "--html")
        assert code == 0, err
    assert (run / "issues.html").is_file()


# --------------------------------------------------------------------------- 3: JSON embedded in the page
def _embedded_json(page: str) -> str:
    start = page.index('<script type="application/json" id="all">') + len('<script type="application/json" id="all">')
    return page[start:page.index("</script>", start)]


def test_review_page_json_cannot_leave_its_script_block(capsys, run_copy):
    _, run = run_copy
    code, out, err = _run_main(capsys, "issues", run, "--html")
    assert code == 0, err
    page = (run / "issues.html").read_text()
    text = _embedded_json(page)
    assert "<" not in text and ">" not in text and "&" not in text  # no <!--, <script, </script in the block
    assert json.loads(text)["classes"] == CLASSES
    assert page.count("<script") == 2 and "<!--" not in page.replace("&lt;!--", "")


# --------------------------------------------------------------------------- 4: CSV formula injection
def test_label_issues_csv_is_spreadsheet_safe_and_reads_back_as_it_was(hostile):
    from cdmix.issues import rank_label_issues

    data, run = hostile
    text = (run / "label_issues.csv").read_text()
    assert not _formula_cells(text)
    assert "'=SUM(1+1)/=HYPERLINK(x).png" in text and ",'=SUM(1+1)," in text
    from cdmix.runs import read_labels

    issues = rank_label_issues(run)
    trained = read_labels(run)["train_ids"]  # the training images' names as the run saved them (labels.npz)
    assert sorted(issues.ids) == sorted(trained) and len(set(issues.ids)) == len(issues)
    assert set(issues.given_class) == set(CLASSES) and "=SUM(1+1)/=HYPERLINK(x).png" in set(issues.ids)


def test_clean_csv_is_spreadsheet_safe_and_trains_on_the_same_files_and_classes(capsys, hostile, tmp_path):
    from cdmix.data.sources import load_source
    from cdmix.issues import rank_label_issues, write_cleaned_csv

    data, run = hostile
    clean = tmp_path / "clean.csv"
    code, out, err = _run_main(capsys, "issues", run, "--clean-csv", clean, "--fix", "relabel")
    assert code == 0, err
    assert not _formula_cells(clean.read_text()) and len(clean.read_text().splitlines()) == _n_train(run) + 1
    # every given label kept (nothing flagged), so every class and every hostile name is in the file
    issues = rank_label_issues(run)
    issues.clean_prob[:] = 1.0
    kept = tmp_path / "kept.csv"
    write_cleaned_csv(kept, issues, CLASSES, "drop", data)
    text = kept.read_text()
    assert not _formula_cells(text) and "./" in text and ",'=SUM(1+1)" in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == _n_train(run)
    paths = [(tmp_path / r["path"]).resolve() for r in rows]  # "./=SUM(1+1)/..." is the same file
    assert sorted(p.relative_to(data.resolve()).as_posix() for p in paths) == sorted(issues.ids)
    raw = load_source("csv", str(kept), image_size=16)
    assert list(raw.class_names) == CLASSES  # "'=SUM(1+1)" is read back as "=SUM(1+1)"


def test_predict_csv_is_spreadsheet_safe(capsys, hostile, tmp_path):
    data, run = hostile
    out_csv = tmp_path / "pred.csv"
    code, out, err = _run_main(capsys, "predict", run, data / "=SUM(1+1)", "--csv", out_csv)
    assert code == 0, err
    text = out_csv.read_text()
    assert not _formula_cells(text) and "'=SUM(1+1)" in text.splitlines()[0]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert all(Path(r["path"]).is_file() for r in rows) and len(rows) == 20


def test_review_page_download_is_spreadsheet_safe(capsys, run_copy, tmp_path):
    """The page's download button (JavaScript, run here in node) writes the same safe cells."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from cdmix.report.review import SCRIPT

    _, run = run_copy
    code, out, err = _run_main(capsys, "issues", run, "--html")
    assert code == 0, err
    page = (run / "issues.html").read_text()
    script = (f"const ALL = JSON.parse({json.dumps(_embedded_json(page))});\n{SCRIPT}\n"
              "process.stdout.write(cleanedCsv(ALL, {}));")
    result = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not _formula_cells(result.stdout)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == _n_train(run) and {r["label"] for r in rows} == {"$\\frac{$", "<!--<script>", "'=SUM(1+1)"}
    assert "./=SUM(1+1)/=HYPERLINK(x).png" in {r["path"] for r in rows}


def test_neutralised_cells_round_trip():
    from cdmix.safetext import neutralise_cell, neutralise_path, restore_cell

    for text in ["=1+1", "+x", "-2+3", "@cmd", "\tx", "\rx", "'quoted", "''", "-1", "+0.5", "plain", "", "'tis"]:
        assert restore_cell(neutralise_cell(text)) == text
        assert not neutralise_cell(text).startswith(FORMULA_CHARS) or neutralise_cell(text) in ("-1", "+0.5")
    assert restore_cell("'tis") == "'tis"  # a quote cdmix did not add stays
    assert neutralise_path("=a/b.png") == "./=a/b.png" and neutralise_path("/abs/=a.png") == "/abs/=a.png"


# --------------------------------------------------------------------------- 6: terminal control sequences
def test_issues_and_predict_print_no_control_characters(capsys, hostile):
    data, run = hostile
    for argv in (["issues", run, "--top", "60"], ["predict", run, data]):
        code, out, err = _run_main(capsys, *argv)
        assert code == 0, err
        assert "\x1b" not in out + err and "\x07" not in out + err
        assert "\\x1b]0;pwned\\x07\\x1b[31mred.png" in out  # shown, escaped
    # an error or a warning naming such a file is escaped too
    code, out, err = _run_main(capsys, "predict", run, data / "missing" / ESC_NAME)
    assert "\x1b" not in err and "\\x1b]0;pwned" in _one_line_error(code, out, err)
    import logging

    logging.getLogger("cdmix").warning(f"skipped {ESC_NAME}")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "skipped \\x1b]0;pwned" in err


# --------------------------------------------------------------------------- 8: thumbnails of other images
def test_review_page_draws_no_thumbnails_when_the_data_changed(capsys, run_copy):
    data, run = run_copy
    code, out, err = _run_main(capsys, "issues", run, "--html")
    assert code == 0, err
    assert (run / "issues.html").read_text().count("data:image/png;base64,") == _n_train(run)
    first = sorted((data / CLASSES[0]).glob("0*.png"))[0]
    first.rename(first.with_name("zz.png"))  # the sorted order, so every later index, moves
    code, out, err = _run_main(capsys, "issues", run, "--html")
    assert code == 0, err
    page = (run / "issues.html").read_text()
    assert "data:image/png;base64," not in page and 'id="no-thumbnails"' in page
    assert "no thumbnails" in err and len(err.strip().splitlines()) == 1


def test_review_page_draws_no_thumbnails_when_a_training_image_was_replaced(capsys, run_copy):
    from PIL import Image

    from cdmix.issues import rank_label_issues

    data, run = run_copy
    target = data / rank_label_issues(run).ids[0]  # the first thumbnail's image, same name, other pixels
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(noise).save(target)
    code, out, err = _run_main(capsys, "issues", run, "--html")
    assert code == 0, err
    page = (run / "issues.html").read_text()
    assert "data:image/png;base64," not in page and "training images differ" in page


# --------------------------------------------------------------------------- 13, 17, 5: model.json and predict
@pytest.mark.parametrize("change, words", [
    ({"std": [0.0, 0.0, 0.0]}, "std"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"mean": [float("nan")] * 3}, "mean"),
    ({"nets": None}, "nets"),
    ({"num_classes": "3"}, "num_classes"),
    ({"class_names": ["a"]}, "class_names"),
    ({"nets": []}, "nets"),
    ({"image_size": 10 ** 7}, "image_size"),
    ({"in_channels": 2}, "in_channels"),
    ({"model": None}, "model"),
    ({"nets": ["../x.safetensors"]}, "outside the run folder"),
    ({"num_classes": 4, "class_names": ["a", "b", "c", "d"]}, "does not fit"),
])
def test_a_tampered_model_json_is_one_line(capsys, run_copy, change, words):
    data, run = run_copy
    spec = json.loads((run / "model.json").read_text())
    (run.parent / "x.safetensors").write_bytes((run / "net1.safetensors").read_bytes())  # a real net, outside the run
    for key, value in change.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    (run / "model.json").write_text(json.dumps(spec))
    _one_line_error(*_run_main(capsys, "predict", run, data / CLASSES[0]), "model.json" if words != "does not fit"
                    else "net1", words)


def test_predict_names_a_damaged_image_and_refuses_a_decompression_bomb(capsys, hostile, tmp_path, monkeypatch):
    from PIL import Image

    data, run = hostile
    image = next((data / CLASSES[0]).glob("0*.png")).read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image[: len(image) // 2])
    _one_line_error(*_run_main(capsys, "predict", run, truncated), str(truncated))
    bomb = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is then a bomb, as 20000 x 20000 is by default
    _one_line_error(*_run_main(capsys, "predict", run, bomb), str(bomb), "pixels")


# --------------------------------------------------------------------------- 16, 7: --pretrained weights
def test_pretrained_weights_with_nan_or_inf_are_refused(tmp_path):
    from cdmix.models import create_model
    from cdmix.models.pretrained import load_pretrained

    net = create_model("small_cnn", num_classes=3, in_channels=3, width=2)
    for bad in (float("nan"), float("inf")):
        state = {k: v.clone() for k, v in net.state_dict().items()}
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key].view(-1)[0] = bad
        path = tmp_path / "w.pt"
        torch.save(state, path)
        with pytest.raises(UserError, match=f"NaN or infinite.*{key}"):
            load_pretrained(net, path)
    torch.save(net.state_dict(), tmp_path / "ok.pt")
    load_pretrained(net, tmp_path / "ok.pt")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_huge_sparse_weights_file_is_refused_before_it_is_hashed(tmp_path, monkeypatch, suffix):
    from cdmix.models import create_model
    from cdmix.models import pretrained

    def no_hashing(path):
        raise AssertionError("the file was hashed before its structure was checked")

    monkeypatch.setattr(pretrained, "sha256_file", no_hashing)
    path = tmp_path / f"big{suffix}"
    with open(path, "wb") as fh:
        fh.truncate(4 << 30)  # 4 GB of zeros, sparse: costs no disk
    net = create_model("small_cnn", num_classes=3, in_channels=3, width=2)
    with pytest.raises(UserError, match="cannot read weights file.*(damaged|neither)"):
        pretrained.load_pretrained(net, path)


# --------------------------------------------------------------------------- 19: $ in plot labels
def test_report_draws_class_names_with_dollar_signs(capsys, run_copy):
    _, run = run_copy
    code, out, err = _run_main(capsys, "report", run)
    assert code == 0, err
    assert (run / "report-confusion.png").is_file()
    assert not [line for line in out.splitlines() if "not drawn" in line and "confusion" in line]
