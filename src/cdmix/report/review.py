"""The review page of a run's suspected label errors (``cdmix issues RUN --html``).

One self-contained HTML file: the top suspects as image thumbnails, each with its rank, where it
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
from pathlib import Path

import numpy as np

from cdmix import runs
from cdmix.atomic import atomic_write
from cdmix.errors import UserError

THUMB = 96  # thumbnail side in pixels (small images are enlarged without smoothing)

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1280px;margin:0 auto;padding:16px 24px 40px;background:#fff}
h1{font-size:1.45em;margin:.3em 0 .2em}.sub{color:#667;font-size:.9em;margin:0 0 10px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{width:200px;border:1px solid #dde;border-radius:6px;padding:8px;font-size:.82em;background:#fafbfc}
.card.flagged{border-color:#e0a100;background:#fffaf0}
.card img{width:96px;height:96px;image-rendering:pixelated;display:block;margin:0 auto 6px;border:1px solid #ccd}
.given{color:#b3261e;font-weight:600}.pred{color:#1b6e20;font-weight:600}.id{color:#555;word-break:break-all}
.card select{width:100%;margin-top:4px}.bar{position:sticky;top:0;background:#fff;padding:8px 0;z-index:1}
button{font-size:1em;padding:5px 12px}.note{color:#666;font-size:.85em}
"""

SCRIPT = """
const ALL = JSON.parse(document.getElementById('all').textContent);
function download() {
  const choice = {};
  document.querySelectorAll('select[data-index]').forEach(s => { choice[s.dataset.index] = s.value; });
  const header = ALL.files ? 'path,label' : (ALL.ids ? 'id,label' : 'index,label');
  const lines = [header];
  for (let i = 0; i < ALL.labels.length; i++) {
    let label = ALL.classes[ALL.labels[i]];
    const c = choice[i];
    if (c === 'drop') continue;
    if (c === 'predicted') label = ALL.classes[ALL.predicted[i]];
    const name = ALL.ids ? ALL.ids[i] : String(i);
    const q = v => /[",\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
    lines.push(q(name) + ',' + q(label));
  }
  const blob = new Blob([lines.join('\\n') + '\\n'], {type: 'text/csv'});
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


def _train_images(run_dir: Path, index: np.ndarray) -> np.ndarray:
    """The run's training images at ``index`` (its data is read again, as training read it)."""
    from cdmix.data.sources import load_source

    c = _config(run_dir)
    raw = load_source(c["dataset"], c["data_path"], labels=c.get("labels"), label_file=c.get("label_file"),
                      image_size=c.get("image_size"), seed=c.get("seed", 0), progress=False)
    if len(raw.train_labels) <= int(index.max(initial=0)):
        raise UserError(f"the data of {run_dir} has changed ({len(raw.train_labels)} training images now)")
    order = np.argsort(index)
    images = np.asarray(raw.train_images[index[order]])
    out = np.empty_like(images)
    out[order] = images
    return out


def write_review_page(run_dir: str | Path, out: str | Path | None = None, top: int = 100) -> Path:
    """Write the review page of the ``top`` most suspicious samples; returns its path
    (default ``RUN_DIR/issues.html``)."""
    from cdmix.issues import collapse_caution, display_names, rank_label_issues

    run_dir = Path(run_dir)
    issues = rank_label_issues(run_dir)
    class_names = run_class_names(run_dir)
    k = min(top, len(issues))
    images = _train_images(run_dir, issues.index[:k])
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
            f'<div class="card{" flagged" if flagged else ""}"><img alt="" src="data:image/png;base64,'
            f'{_thumbnail(images[i])}"><div>#{i + 1}{" · flagged" if flagged else ""}{scored}</div>'
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
    caution = collapse_caution(runs.read_summary(run_dir)) if (run_dir / runs.SUMMARY).is_file() else None
    body = (f"<h1>{html.escape(title)}</h1><p class=sub>{html.escape(str(run_dir.resolve()))} · the {k} most "
            f"suspicious of {len(issues)} training images, most suspicious first · {n_flagged} flagged "
            f"(clean prob &lt; 0.5, orange)</p>"
            + (f'<p class="note"><b>{html.escape(caution)}</b></p>' if caution else "") +
            '<div class="bar"><button onclick="download()">Download the cleaned labels (CSV)</button> '
            '<span class="note">every training image with the choices below applied (flagged ones start as '
            '"drop"); paths are relative to the data folder</span></div>'
            f'<div class="grid">{"".join(cards)}</div>'
            '<p class="note">issue score = 1 − the final nets\' probability of the given label (the ranking); clean '
            "prob = the loss GMM's probability that the given label is right. See README.txt in the run folder.</p>")
    data_json = json.dumps(all_data).replace("</", "<\\/")
    page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{body}</main>"
            f'<script type="application/json" id="all">{data_json}</script><script>{SCRIPT}</script>'
            "</body></html>\n")
    path = Path(out) if out else run_dir / runs.ISSUES_PAGE
    if path.is_dir():
        path = path / runs.ISSUES_PAGE
    atomic_write(path, page)
    return path
