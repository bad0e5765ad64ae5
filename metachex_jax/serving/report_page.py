"""`predict --report`: one self-contained page, OUT/index.html, to review predictions by eye.

One card per input, in input order: a thumbnail of the image (the whole image as the model's pixel contract
stores it, at most THUMBNAIL px, embedded as a data: URI), heatmap thumbnails when heatmaps were written (each
linking to its full-size overlay in OUT/heatmaps/), every output with its decision and calibrated probability
where the model has them, the out-of-distribution distance and flag, the bit depth the reader used and any error.
Cards sort by any output or the OOD distance and filter by the OOD flag, by failure and by each output's
decision (a few lines of inline JavaScript).

Everything is in the one file (styles, script, thumbnails): it opens from disk with no server and no network,
and its Content-Security-Policy forbids loading anything from elsewhere (links to the overlays are plain
navigations).
"""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
from PIL import Image

from metachex_jax.core import files

PAGE = "index.html"
THUMBNAIL = 128  # px, the longest side of the embedded thumbnails

STYLE = """
body { font: 14px/1.35 system-ui, sans-serif; margin: 1em; color: #222; background: #f6f6f6; }
header p { margin: .3em 0; max-width: 70em; }
.controls { margin: .8em 0; display: flex; gap: 1em; flex-wrap: wrap; align-items: center; }
#cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: .6em; width: 19em; }
.card.flagged { border: 2px solid #c60; }
.card.failed { border: 2px solid #b00; }
.card h3 { font-size: 13px; margin: 0 0 .4em; overflow-wrap: anywhere; }
.images { display: flex; gap: .3em; flex-wrap: wrap; }
.images img { width: 128px; height: 128px; object-fit: contain; background: #000; image-rendering: auto; }
.images figure { margin: 0; font-size: 11px; text-align: center; }
table { border-collapse: collapse; margin-top: .4em; width: 100%; }
td { padding: 1px 4px; border-bottom: 1px solid #eee; font-size: 12px; }
td.v { text-align: right; font-variant-numeric: tabular-nums; }
.pos { color: #b00; font-weight: 600; }
.badge { display: inline-block; padding: 0 .4em; border-radius: 3px; background: #c60; color: #fff; }
.ok { background: #4a4; }
.error { color: #b00; font-size: 12px; overflow-wrap: anywhere; }
.meta { font-size: 12px; color: #555; }
"""

SCRIPT = """
(function () {
  const cards = Array.from(document.querySelectorAll('.card'));
  const box = document.getElementById('cards');
  const sortBy = document.getElementById('sort');
  const order = document.getElementById('order');
  const filter = document.getElementById('filter');
  const shown = document.getElementById('shown');
  function value(card, key) {
    const v = parseFloat(card.dataset[key]);
    return Number.isNaN(v) ? null : v;
  }
  function update() {
    const key = sortBy.value, sign = order.value === 'asc' ? 1 : -1;
    const sorted = cards.slice().sort(function (a, b) {
      if (key === 'index') { return value(a, 'index') - value(b, 'index'); }
      const x = value(a, key), y = value(b, key);
      if (x === null || y === null) { return (x === null) - (y === null) || value(a, 'index') - value(b, 'index'); }
      return sign * (x - y) || value(a, 'index') - value(b, 'index');
    });
    const [what, want] = filter.value.split('=');
    let count = 0;
    sorted.forEach(function (card) {
      const keep = what === 'all' || card.dataset[what] === want;
      card.hidden = !keep;
      count += keep ? 1 : 0;
      box.appendChild(card);
    });
    shown.textContent = count + ' of ' + cards.length + ' shown';
  }
  [sortBy, order, filter].forEach(function (el) { el.addEventListener('change', update); });
  update();
})();
"""


def png_data_uri(pixels: np.ndarray) -> str:
    """An embedded PNG of uint8 gray (H, W) or RGB (H, W, 3) pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_thumbnail(path: str) -> str | None:
    """The data URI of a heatmap overlay PNG shrunk to THUMBNAIL px; None if it cannot be read."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
            return png_data_uri(np.asarray(image))
    except OSError:
        return None


def shown(text) -> str:
    """A CSV value as the page shows it: 4 significant digits (1.234e-05 stays readable as such)."""
    return "" if text in ("", None) else f"{float(text):.4g}"


def _number(text) -> str:
    """A data attribute's number ("" when there is none: sorted last)."""
    return "" if text in ("", None) else str(text)


def _card(i: int, row: dict, result, thumbnail, overlays: dict[str, str], out_dir: str) -> str:
    outputs = result.outputs
    flag = row.get("ood_flag", "")
    failed = bool(row["error"])
    data = {"index": i, "flag": "failed" if failed else ("none" if flag == "" else str(flag)),
            "failed": int(failed), "dist": _number(row.get("ood_distance"))}
    for j, output in enumerate(outputs):
        data[f"o{j}"] = _number(row[output.name])
        if output.threshold is not None:
            data[f"d{j}"] = row[f"{output.name}_decision"]
    classes = "card" + (" failed" if failed else "") + (" flagged" if flag == 1 else "")
    attributes = " ".join(f'data-{k}="{html.escape(str(v))}"' for k, v in data.items())
    name = os.path.basename(row["path"]) or row["path"]
    parts = [f'<div class="{classes}" {attributes}>',
             f'<h3 title="{html.escape(row["path"])}">{i + 1}. {html.escape(name)}</h3><div class="images">']
    if thumbnail is not None:
        parts.append(f'<figure><img alt="{html.escape(name)}" src="{png_data_uri(thumbnail)}">'
                     "<figcaption>image</figcaption></figure>")
    for output_name, png in overlays.items():
        uri = overlay_thumbnail(os.path.join(out_dir, png))
        if uri is not None:
            link = html.escape(png.replace(os.sep, "/"))
            parts.append(f'<figure><a href="{link}"><img alt="{html.escape(output_name)} heatmap" src="{uri}">'
                         f"</a><figcaption>{html.escape(output_name)}</figcaption></figure>")
    parts.append("</div><table>")
    for output in outputs:
        value = row[output.name]
        cells = [html.escape(output.name), f'<td class="v">{shown(value)}</td>']
        if output.threshold is not None:
            decision = row[f"{output.name}_decision"]
            cells.append(f'<td class="{"pos" if decision == 1 else ""}">'
                         f'{"positive" if decision == 1 else "negative" if decision == 0 else ""}</td>')
        if f"{output.name}_calibrated" in row:
            cells.append(f'<td class="v" title="calibrated">{shown(row[f"{output.name}_calibrated"])}'
                         "</td>")
        parts.append(f"<tr><td>{cells[0]}</td>{''.join(cells[1:])}</tr>")
    parts.append("</table>")
    if "ood_distance" in row and not failed:
        badge = ('<span class="badge">out of distribution</span>' if flag == 1
                 else '<span class="badge ok">in distribution</span>')
        parts.append(f'<p class="meta">OOD distance {shown(row["ood_distance"])} {badge}</p>')
    if row.get("bit_depth") != "":
        parts.append(f'<p class="meta">{html.escape(str(row.get("format", "")))} {row.get("width")} x '
                     f'{row.get("height")}, {row["bit_depth"]}-bit ({html.escape(str(row["bit_depth_source"]))})</p>')
    if failed:
        parts.append(f'<p class="error">{html.escape(row["error"])}</p>')
    parts.append("</div>")
    return "".join(parts)


def _controls(result, has_ood: bool) -> str:
    sort = ['<option value="index">input order</option>']
    sort += [f'<option value="o{j}">{html.escape(o.name)}</option>' for j, o in enumerate(result.outputs)]
    filters = ['<option value="all">all images</option>']
    if has_ood:
        sort.append('<option value="dist">OOD distance</option>')
        filters += ['<option value="flag=1">OOD flagged</option>', '<option value="flag=0">not OOD flagged</option>']
    filters.append('<option value="failed=1">failed</option>')
    for j, output in enumerate(result.outputs):
        if output.threshold is not None:
            name = html.escape(output.name)
            filters += [f'<option value="d{j}=1">{name}: positive</option>',
                        f'<option value="d{j}=0">{name}: negative</option>']
    return ('<div class="controls"><label>sort by <select id="sort">' + "".join(sort) + "</select></label>"
            '<label>order <select id="order"><option value="desc">highest first</option>'
            '<option value="asc">lowest first</option></select></label>'
            '<label>show <select id="filter">' + "".join(filters) + "</select></label>"
            '<span id="shown"></span></div>')


def _header(summary: dict) -> str:
    ood = summary.get("ood") or {}
    if ood.get("columns"):
        ood_text = (f"Out-of-distribution flag: Mahalanobis distance of the image's pooled features from the model's "
                    f"training images above {ood['threshold']:.4g}; images like the training images are flagged "
                    f"about {ood['expected_flag_rate']:.1%} of the time. {ood['flagged']} of {ood['scored']} "
                    "flagged here. A flag says the image is unlike the training images in this model's features; no "
                    "flag does not say the model is right about it.")
    else:
        ood_text = f"No out-of-distribution flags: {ood.get('why', 'no description')}"
    model = summary.get("model", {})
    return (f"<header><h1>Predictions: {summary['predicted']} of {summary['images']} images</h1>"
            f"<p>Model: {html.escape(str(model.get('model', '')))} ({html.escape(str(model.get('kind', '')))}); "
            f"input: {html.escape(summary['input_contract'].get('description', ''))}</p>"
            f"<p>{html.escape(ood_text)}</p>"
            + (f"<p>{summary['failed']} failed (red cards).</p>" if summary["failed"] else "") + "</header>")


def write_page(out_dir: str, result, rows: list[dict], summary: dict,
               overlays: dict[int, dict[str, str]] | None = None) -> str:
    """Write OUT/index.html (atomically) from predict's CSV rows, its summary, `result.thumbnails` and the
    heatmap overlays ({input index: {output name: PNG path relative to out_dir}}); returns its path."""
    overlays = overlays or {}
    thumbnails = result.thumbnails or [None] * len(rows)
    cards = [_card(i, row, result, thumbnails[i], overlays.get(i, {}), out_dir) for i, row in enumerate(rows)]
    has_ood = any("ood_distance" in row for row in rows)
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f"<title>predictions ({len(rows)} images)</title><style>{STYLE}</style></head><body>"
            + _header(summary) + _controls(result, has_ood) + '<div id="cards">' + "\n".join(cards) + "</div>"
            + f"<script>{SCRIPT}</script></body></html>\n")
    path = os.path.join(out_dir, PAGE)
    files.write_atomic(path, page)
    return path
