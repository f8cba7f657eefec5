"""The review page of a run's suspected label errors (``cdmix issues RUN --html``).

One self-contained HTML file: the top suspects as image thumbnails (the user's own file downscaled
once to ``ORIGINAL_THUMB`` px when it is still there and unchanged, else the store's training copy),
each with its rank, where it
lives in the user's data (path or id, else its index), the given class, the nets' predicted class
and the scores; a choice per image (keep the given label, use the predicted one, or drop the
image); and a button that downloads the labels of the whole training set with those choices
applied, as a CSV (``path,label`` for folder/csv data, so it is a ``--dataset csv`` source).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np

from cdmix import runs
from cdmix.atomic import atomic_write, check_output
from cdmix.errors import UserError
from cdmix.safetext import json_for_html, printable

logger = logging.getLogger("cdmix")

THUMB = 96  # thumbnail side in pixels (small images are enlarged without smoothing)
# An original image file larger than this is shown downscaled once to fit it (JPEG), instead of the
# store's copy at the training size (often 32 px: a blur of the user's photo).
ORIGINAL_THUMB = 128

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1280px;margin:0 auto;padding:16px 24px 40px;background:#fff}
h1{font-size:1.45em;margin:.3em 0 .2em}.sub{color:#667;font-size:.9em;margin:0 0 10px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{width:200px;border:1px solid #dde;border-radius:6px;padding:8px;font-size:.82em;background:#fafbfc}
.card.flagged{border-color:#e0a100;background:#fffaf0}
.card img{width:128px;height:128px;object-fit:contain;display:block;margin:0 auto 6px;border:1px solid #ccd;
background:#fff}.card img.pixels{image-rendering:pixelated}
.given{color:#b3261e;font-weight:600}.pred{color:#1b6e20;font-weight:600}.id{color:#555;word-break:break-all}
.card select{width:100%;margin-top:4px}.bar{position:sticky;top:0;background:#fff;padding:8px 0;z-index:1}
button{font-size:1em;padding:5px 12px}.note{color:#666;font-size:.85em}
"""

SCRIPT = """
// cleanedCsv(ALL, choice): the CSV text (header first); cells spreadsheet-safe as cdmix.safetext writes
// them: a path beginning with = + - @ tab or CR becomes ./path, any other such cell gets a ' before it.
const FORMULA = /^[=+\\-@\\t\\r]/, NUMBER = /^[+-]?(\\d+(\\.\\d*)?|\\.\\d+)([eE][+-]?\\d+)?$/;
function cell(v) { return (FORMULA.test(v) || v.startsWith("'")) && !NUMBER.test(v) ? "'" + v : v; }
function pathCell(v) { return FORMULA.test(v) ? './' + v : v; }
function quote(v) { return /[",\\r\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function cleanedCsv(ALL, choice) {
  const header = ALL.files ? 'path,label' : (ALL.ids ? 'id,label' : 'index,label');
  const lines = [header];
  for (let i = 0; i < ALL.labels.length; i++) {
    let label = ALL.classes[ALL.labels[i]];
    const c = choice[i];
    if (c === 'drop') continue;
    if (c === 'predicted') label = ALL.classes[ALL.predicted[i]];
    const name = ALL.ids ? (ALL.files ? pathCell(ALL.ids[i]) : cell(ALL.ids[i])) : String(i);
    lines.push(quote(name) + ',' + quote(cell(label)));
  }
  return lines.join('\\n') + '\\n';
}
function download() {
  const ALL = JSON.parse(document.getElementById('all').textContent);
  const choice = {};
  document.querySelectorAll('select[data-index]').forEach(s => { choice[s.dataset.index] = s.value; });
  const blob = new Blob([cleanedCsv(ALL, choice)], {type: 'text/csv'});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob); a.download = 'cleaned_labels.csv'; a.click();
}
"""


def _config(run_dir: Path) -> dict:
    path = run_dir / runs.CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not a cdmix run folder (no {runs.CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}); the file is damaged") from None


def run_class_names(run_dir: str | Path) -> list[str]:
    """The class names a run saved in labels.npz (numbers as text when it has none)."""
    path = Path(run_dir) / runs.LABELS
    if not path.is_file():
        raise UserError(f"{run_dir} has no {runs.LABELS}; is it a cdmix run folder?")
    with np.load(path, allow_pickle=False) as npz:
        if "class_names" in npz.files:
            return [str(c) for c in npz["class_names"]]
        return [str(i) for i in range(int(npz["train_labels"].max()) + 1)]


def run_data_root(run_dir: str | Path) -> Path | None:
    """The folder the ``id`` paths of a folder / csv run are relative to (None for other data)."""
    config = _config(Path(run_dir))
    data_path = Path(config.get("data_path") or ".").expanduser()
    if config.get("dataset") == "folder":
        return data_path
    if config.get("dataset") == "csv":
        return data_path.parent
    return None


def _thumbnail(image: np.ndarray) -> str:
    """A base64 PNG of one uint8 H x W x C image, enlarged to about THUMB pixels."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    scale = max(1, THUMB // max(img.size))
    if scale > 1:
        img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _original_thumbnail(path: Path) -> tuple[str, bool]:
    """(a data URL of the image file ``path`` to show, whether it is a photo downscaled once to fit
    ``ORIGINAL_THUMB`` (JPEG) rather than a small image enlarged without smoothing (PNG)); decoded
    as the store decodes (EXIF rotation, RGB, the pixel cap); raises on an unreadable file."""
    from PIL import Image, ImageOps

    from cdmix.data.decode import max_decoded_pixels, to_rgb

    with Image.open(path) as img:
        img.draft("RGB", (ORIGINAL_THUMB, ORIGINAL_THUMB))  # JPEG: decode at the smallest scale >= the thumbnail
        if img.width * img.height > max_decoded_pixels(ORIGINAL_THUMB):
            raise ValueError(f"{img.width} x {img.height} pixels")
        img = to_rgb(ImageOps.exif_transpose(img))
    if max(img.size) <= ORIGINAL_THUMB:
        return "data:image/png;base64," + _thumbnail(np.asarray(img)), False
    img.thumbnail((ORIGINAL_THUMB, ORIGINAL_THUMB), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), True


def _originals(run_dir: Path, raw, ids: np.ndarray | None) -> list[tuple[str, bool] | None]:
    """Per name of ``ids``: ``_original_thumbnail`` of the user's file (folder / csv data) when it is
    still there with the size and change time the image store recorded for it, else None (the
    store's copy is shown instead)."""
    import os

    from cdmix.data.store import SAMPLES, Samples, StoreView, _changed_ns

    root = run_data_root(run_dir)
    if ids is None or root is None or not isinstance(raw.train_images, StoreView):
        return [None] * (0 if ids is None else len(ids))
    samples = Samples.read_csv(Path(raw.train_images.reader.path).parent / SAMPLES)
    recorded = {n: (b, m) for n, b, m in zip(samples.names, samples.bytes, samples.mtimes)}
    found: list[tuple[str, bool] | None] = []
    for name in ids:
        try:
            stat = os.stat(root / str(name))
            if recorded.get(str(name)) != (stat.st_size, _changed_ns(stat)):
                raise ValueError("changed since the store was built")
            found.append(_original_thumbnail(root / str(name)))
        except Exception:  # gone, changed or unreadable: the store's copy is shown
            found.append(None)
    return found


def _train_images(run_dir: Path, index: np.ndarray, ids: np.ndarray | None
                  ) -> tuple[np.ndarray | None, list[tuple[str, bool] | None], str]:
    """The run's training images at ``index`` (its data read again, as training read it), with
    ``_originals`` of ``ids``, or None, [] and why not: the data cannot be read, or it is not what the
    run was trained on (another number of images, labels, test split (``cdmix.engine.check_data_unchanged``),
    or other names at ``index`` than ``ids``, the ids of label_issues.csv): a thumbnail must show the
    image named under it."""
    from types import SimpleNamespace

    from cdmix.data.sources import load_source
    from cdmix.engine import check_data_unchanged

    c = _config(run_dir)
    try:
        raw = load_source(c["dataset"], c["data_path"], labels=c.get("labels"), label_file=c.get("label_file"),
                          image_size=c.get("image_size"), seed=c.get("seed", 0), progress=False,
                          extra_data_path=c.get("extra_data_path"), clean_train=bool(c.get("clean_train")),
                          hf_image_column=c.get("hf_image_column") or "image",
                          hf_label_column=c.get("hf_label_column") or "label")
        if len(raw.train_labels) <= int(index.max(initial=0)):
            raise UserError(f"the data has changed ({len(raw.train_labels)} training images now)")
        check_data_unchanged(run_dir, SimpleNamespace(raw=raw), training=True)  # the training images too
    except UserError as exc:
        return None, [], str(exc)
    saved = runs.read_labels(run_dir)
    now = None if raw.train_ids is None else np.asarray(raw.train_ids, dtype=str)
    before = saved.get("train_ids")
    if (before is not None and (now is None or not np.array_equal(np.asarray(before, dtype=str), now))) or (
            ids is not None and (now is None or not np.array_equal(now[index], np.asarray(ids, dtype=str)))):
        return None, [], ("the data's file names differ from those the run was trained on (files renamed, added or "
                      "removed since training)")
    order = np.argsort(index)
    images = np.asarray(raw.train_images[index[order]])
    out = np.empty_like(images)
    out[order] = images
    return out, _originals(run_dir, raw, ids), ""


def _img_tag(original: tuple[str, bool] | None, stored: np.ndarray) -> str:
    """The card's picture: the original file's thumbnail, else the store's copy enlarged."""
    url, photo = original if original is not None else ("data:image/png;base64," + _thumbnail(stored), False)
    return f'<img alt="" class="{"original" if photo else "pixels"}" src="{url}">'


def review_page_path(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Where ``write_review_page`` writes (``out``, ``out/issues.html`` for a folder, default
    ``RUN_DIR/issues.html``), checked by ``atomic.check_output``: never a file of a run or the data the
    run was made from; an existing file other than the run's own review page only with ``overwrite``."""
    run_dir = Path(run_dir)
    path = Path(out) if out else run_dir / runs.ISSUES_PAGE
    if path.is_dir():
        path = path / runs.ISSUES_PAGE
    return check_output(path, "--html", overwrite=overwrite, run_dir=run_dir,
                        replaceable=run_dir / runs.ISSUES_PAGE)


def write_review_page(run_dir: str | Path, out: str | Path | None = None, top: int = 100,
                      overwrite: bool = False) -> Path:
    """Write the review page of the ``top`` most suspicious samples; returns its path
    (default ``RUN_DIR/issues.html``, replaced when it exists; another existing file only with
    ``overwrite``, see ``review_page_path``)."""
    from cdmix.issues import collapse_caution, display_names, rank_label_issues, score_note

    run_dir = Path(run_dir)
    path = review_page_path(run_dir, out, overwrite)
    issues = rank_label_issues(run_dir)
    class_names = run_class_names(run_dir)
    k = min(top, len(issues))
    images, originals, why_not = _train_images(run_dir, issues.index[:k], None if issues.ids is None else issues.ids[:k])
    if images is None:
        logger.warning(printable(f"the review page has no thumbnails: {why_not}"))
    given, predicted, true = display_names(issues)
    cards = []
    for i in range(k):
        where = html.escape(str(issues.ids[i])) if issues.ids is not None else f"index {issues.index[i]}"
        truth = f"<div>true: {html.escape(true[i])}</div>" if true is not None else ""
        scored = f" · {html.escape(str(issues.scored[i]))}" if issues.scored is not None else ""
        flagged = bool(issues.flagged[i])
        default = "drop" if flagged else "keep"
        options = "".join(f'<option value="{v}"{" selected" if v == default else ""}>{t}</option>'
                          for v, t in (("keep", "keep the given label"), ("predicted", "use the predicted label"),
                                       ("drop", "drop this image")))
        cards.append(
            f'<div class="card{" flagged" if flagged else ""}">'
            + ("" if images is None else _img_tag(originals[i] if i < len(originals) else None, images[i]))
            + f'<div>#{i + 1}{" · flagged" if flagged else ""}{scored}</div>'
            f'<div class="id">{where}</div><div>given: <span class="given">{html.escape(given[i])}</span></div>'
            f'<div>predicted: <span class="pred">{html.escape(predicted[i])}</span></div>{truth}'
            f"<div>issue score {issues.issue_score[i]:.3f} · clean prob {issues.clean_prob[i]:.3f}</div>"
            f'<select data-index="{int(issues.index[i])}">{options}</select></div>')
    order = np.argsort(issues.index)
    all_data = {"labels": issues.given_label[order].tolist(), "predicted": issues.predicted_label[order].tolist(),
                "classes": class_names, "ids": None if issues.ids is None else [str(v) for v in issues.ids[order]],
                "files": run_data_root(run_dir) is not None}
    n_flagged = int(issues.flagged.sum())
    title = f"cdmix label review: {run_dir.resolve().name}"
    summary = runs.read_summary(run_dir) if (run_dir / runs.SUMMARY).is_file() else {}
    caution = " ".join(line for line in (score_note(summary), collapse_caution(summary)) if line) or None
    knn = score_note(summary) is not None  # a `cdmix pretrain` run: kNN disagreement, no classifier
    body = (f"<h1>{html.escape(title)}</h1><p class=sub>{html.escape(str(run_dir.resolve()))} · the {k} most "
            f"suspicious of {len(issues)} training images, most suspicious first · {n_flagged} flagged "
            f"(clean prob &lt; 0.5, orange)</p>"
            + (f'<p class="note"><b>{html.escape(caution)}</b></p>' if caution else "")
            + ("" if images is not None else f'<p class="note" id="no-thumbnails"><b>No thumbnails: '
               f"{html.escape(why_not)}. Without the images the run was trained on, a thumbnail could show another "
               "image than the one named under it; the ranking below is the run's own.</b></p>") +
            '<div class="bar"><button onclick="download()">Download the cleaned labels (CSV)</button> '
            '<span class="note">every training image with the choices below applied (flagged ones start as '
            '"drop"); paths are relative to the data folder</span></div>'
            f'<div class="grid">{"".join(cards)}</div>'
            + ('<p class="note">issue score = the share of the image\'s nearest training neighbours (in the '
               "self-supervised encoder's feature space) whose given label differs, each weighted by its similarity "
               "(the ranking); clean prob = 1 − that share; predicted = the neighbours' weighted majority class. "
               "See README.txt in the run folder.</p>" if knn
               else '<p class="note">issue score = 1 − the final nets\' probability of the given label (the '
               "ranking); clean prob = the loss GMM's probability that the given label is right. See README.txt in "
               "the run folder.</p>"))
    data_json = json_for_html(all_data)  # no "<": a class named <!--<script> cannot end the block
    page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{body}</main>"
            f'<script type="application/json" id="all">{data_json}</script><script>{SCRIPT}</script>'
            "</body></html>\n")
    atomic_write(path, page)
    return path
