"""The review page (``cdmix issues RUN --html``) used as a practitioner uses it: opened in headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, driven with selenium), thumbnails checked,
rows marked keep / relabel / drop with the page's own controls, the CSV downloaded with its button and
compared with what ``cdmix issues --clean-csv`` writes for the same decisions.

Skipped, with the reason, when selenium, chromium or chromedriver is missing (``.ci/run`` installs
them). ``CDMIX_REVIEW_SCREENSHOT=PATH`` saves a screenshot of the page there (docs/review_page.png).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cdmix.cli import main

CLASSES = ["flower", "temple", "=gray"]  # "=gray": a class (and paths) a spreadsheet would run as a formula
PER_CLASS, SMALL = 9, 2  # per class: crops of real photos (large files) and small 24 px ones
WRONG = {"temple/flower_03.png", "=gray/temple_04.png"}  # files put in another class's folder


def _chrome_paths() -> tuple[str | None, str | None]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    return browser, shutil.which("chromedriver")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    browser, driver = _chrome_paths()
    if browser is None:
        return "no chromium browser found (apt-get install chromium)"
    if driver is None:
        return "no chromedriver found (apt-get install chromium-driver)"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


def _photos() -> dict[str, list[np.ndarray]]:
    """Crops of scikit-learn's two bundled photos (no download): per class, large and small images."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    gray = np.repeat(china.mean(2, keepdims=True).astype(np.uint8)[:, ::-1], 3, axis=2)
    rng = np.random.default_rng(0)
    out = {}
    for name, photo in zip(CLASSES, (flower, china, gray)):
        crops = []
        for k in range(PER_CLASS + SMALL):
            y, x = rng.integers(0, photo.shape[0] - 160), rng.integers(0, photo.shape[1] - 200)
            crops.append(photo[y:y + 160, x:x + 200])
        out[name] = crops
    return out


@pytest.fixture(scope="module")
def review_run(tmp_path_factory):
    """(data folder, run folder, large file names) of one small real run on a folder of photos."""
    from PIL import Image

    base = tmp_path_factory.mktemp("review")
    data, run = base / "data", base / "run"
    large = set()
    for name, crops in _photos().items():
        stem = name.lstrip("=")
        for k, crop in enumerate(crops):
            rel = f"{name}/{stem}_{k:02d}.png"
            wrong = {w.split("/")[1]: w.split("/")[0] for w in WRONG}.get(f"{stem}_{k:02d}.png")
            rel = f"{wrong}/{stem}_{k:02d}.png" if wrong else rel
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(crop)
            if k >= PER_CLASS:
                img = img.resize((24, 24), Image.Resampling.BILINEAR)
            else:
                large.add(rel)
            img.save(data / rel)
    code = main(["train", "--dataset", "folder", "--data-path", str(data), "--epochs", "1", "--width", "2",
                 "--method", "standard", "--image-size", "16", "--val-fraction", "0", "--out", str(run),
                 "--no-progress"])
    assert code == 0
    assert main(["issues", str(run), "--html"]) == 0
    return data, run, large


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    binary, driver_path = _chrome_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400", f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _open(driver, run: Path):
    driver.get((run / "issues.html").resolve().as_uri())
    for old in driver.downloads.iterdir():
        old.unlink()


def _download(driver) -> str:
    """Click the page's download button; the CSV it saved, as text."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.TAG_NAME, "button").click()
    target = driver.downloads / "cleaned_labels.csv"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if target.is_file() and not list(driver.downloads.glob("*.crdownload")):
            return target.read_text(encoding="utf-8")
        time.sleep(0.1)
    raise AssertionError(f"no download in {driver.downloads}: {os.listdir(driver.downloads)}")


def _choose(driver, decisions: dict[int, str]) -> None:
    """Set the select of the cards of training ``index`` -> keep / predicted / drop, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for index, value in decisions.items():
        Select(driver.find_element(By.CSS_SELECTOR, f'select[data-index="{index}"]')).select_by_value(value)


def _clean_csv(run: Path, data: Path, fix: str) -> str:
    """What `cdmix issues --clean-csv` writes, put in the data folder so its paths are written relative
    to the data folder, as the page writes them; Python's csv ends lines with \\r\\n, the page with \\n."""
    out = data / f"clean_{fix}.csv"
    assert main(["issues", str(run), "--clean-csv", str(out), "--fix", fix, "--overwrite"]) == 0
    text = out.read_text(encoding="utf-8").replace("\r\n", "\n")
    out.unlink()
    return text


@needs_browser
def test_every_thumbnail_decodes_and_names_show(review_run, browser):
    from selenium.webdriver.common.by import By

    from cdmix.issues import rank_label_issues

    data, run, large = review_run
    issues = rank_label_issues(run)
    _open(browser, run)
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert len(cards) == len(issues)  # every training image (fewer than the top 100)
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('.card img')].map(i => [i.complete, i.naturalWidth, i.naturalHeight,"
        " i.className, i.closest('.card').querySelector('.id').textContent]);")
    assert len(sizes) == len(issues)
    for complete, width, height, kind, name in sizes:
        assert complete and width > 0 and height > 0, name
        if name in large:  # the user's 200 x 160 photo, downscaled once to fit 128 px: not the 16 px copy
            assert (kind, width, height) == ("original", 128, 102), name
        else:  # a 24 px file, enlarged without smoothing
            assert kind == "pixels" and width == 96, name
    shown = {c.find_element(By.CSS_SELECTOR, ".id").text for c in cards}
    assert shown == set(issues.ids)  # every path, as the user named it
    given = [c.find_element(By.CSS_SELECTOR, ".given").text for c in cards]
    predicted = [c.find_element(By.CSS_SELECTOR, ".pred").text for c in cards]
    # "0 flower": the label and its class name, in rank order
    assert given == [f"{v} {n}" for v, n in zip(issues.given_label, issues.given_class)]
    assert predicted == [f"{v} {n}" for v, n in zip(issues.predicted_label, issues.predicted_class)]
    assert {g.split(" ", 1)[1] for g in given} == set(CLASSES)
    if os.environ.get("CDMIX_REVIEW_SCREENSHOT"):
        browser.save_screenshot(os.environ["CDMIX_REVIEW_SCREENSHOT"])


@needs_browser
def test_download_equals_clean_csv_for_the_same_decisions(review_run, browser):
    from cdmix.issues import rank_label_issues
    from cdmix.safetext import neutralise_cell, neutralise_path

    data, run, _ = review_run
    issues = rank_label_issues(run)
    flagged = [int(i) for i in issues.index[issues.flagged]]
    unflagged = [int(i) for i in issues.index[~issues.flagged]]
    assert flagged and len(unflagged) >= 2 and (issues.given_label != issues.predicted_label)[issues.flagged].any()
    # As the page opens: flagged images "drop", the rest "keep" -- what --fix drop writes.
    _open(browser, run)
    dropped = _download(browser)
    assert dropped == _clean_csv(run, data, "drop")
    # Every flagged image relabelled with the predicted class: --fix relabel.
    _open(browser, run)
    _choose(browser, {i: "predicted" for i in flagged})
    relabel = _download(browser)
    assert relabel == _clean_csv(run, data, "relabel") and relabel != dropped
    # A user's own mix: the first flagged image kept after all, an unflagged one dropped, another relabelled.
    decisions = {i: "predicted" for i in flagged}
    decisions[flagged[0]] = "keep"
    decisions.update({unflagged[0]: "drop", unflagged[1]: "predicted"})
    _open(browser, run)
    _choose(browser, decisions)
    mixed = list(csv.reader(io.StringIO(_download(browser))))
    classes = list(issues.given_class)  # per row of label_issues.csv, given and predicted class names
    by_index = {int(i): (g, p, name) for i, g, p, name in zip(issues.index, classes, issues.predicted_class,
                                                             issues.ids)}
    expected = [["path", "label"]]
    for index in sorted(by_index):
        given, predicted, name = by_index[index]
        choice = decisions.get(index, "drop" if index in flagged else "keep")
        if choice != "drop":
            expected.append([neutralise_path(name), neutralise_cell(predicted if choice == "predicted" else given)])
    assert mixed == expected
    # the spreadsheet-safe cells of the =gray class, as --clean-csv writes them
    assert any(row[0].startswith("./=gray/") for row in mixed[1:]) and ["'=gray"] == sorted(
        {row[1] for row in mixed[1:] if "gray" in row[1]})


def test_thumbnails_fall_back_to_the_stored_copy_when_the_original_changed(review_run, tmp_path):
    """A file whose size or change time differs from the store's record (or that is gone) is shown from
    the store, never a newer file under the old name."""
    from cdmix.data.sources import load_source
    from cdmix.report.review import _originals

    data, run, large = review_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy, symlinks=True)
    import json

    config = json.loads((run / "config.json").read_text())
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    (run_copy / "config.json").write_text(json.dumps({**config, "data_path": str(copy)}))
    raw = load_source("folder", str(copy), image_size=16, progress=False)
    names = sorted(large)[:3]
    os.utime(copy / names[0], ns=(1, 1))  # touched back in time: the store recorded another time
    (copy / names[1]).unlink()
    shown = _originals(run_copy, raw, np.asarray(names))
    assert shown[0] is None and shown[1] is None
    assert shown[2] is not None and shown[2][0].startswith("data:image/jpeg;base64,") and shown[2][1]
