"""Pictures of what the worker found: each page with its detected lines drawn over it.

Reads a volume's Parquet from the artifacts bucket and the page images from the
archive bucket, rebuilds each page's *corrected page* as the archive's readers do (rotation,
then the thin-plate spline: :func:`bec.ldv1.correction.corrected_page`), draws every line
contour (and its box) over it, one colour per text line, and writes PNGs plus an
``index.html`` per volume — what ``bec demo`` leaves in ``demo-out/``. With an ocr job's
Parquet for the same version, each page's text is shown beside it (and its CER when the
true text is known: generated pages).
"""
from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from bec.edges import artifacts
from bec.edges.archive import volume_prefix
from bec.ldv1.correction import corrected_page

MAX_WIDTH = 1400
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40)]


@dataclass
class VolumePictures:
    w_id: str
    i_id: str
    version: str
    pages: list[dict[str, Any]]
    marker: dict[str, Any]
    folder: Path
    cer: float | None = None      # the volume's OCR against the true text, when both are known


def draw_page(image: np.ndarray, contours: list[list[dict[str, int]]],
              boxes: list[dict[str, int]], line_index: list[int] | None = None) -> np.ndarray:
    """RGB image with each contour (filled translucent) and box drawn over it, coloured and
    numbered by its text line (1 = the top line)."""
    canvas = image.copy()
    overlay = image.copy()
    thick = max(2, image.shape[1] // 600)
    lines = list(line_index) if line_index is not None else list(range(len(contours)))
    for n, contour in enumerate(contours):
        pts = np.array([[p["x"], p["y"]] for p in contour], dtype=np.int32).reshape(-1, 1, 2)
        colour = COLOURS[lines[n] % len(COLOURS)]
        cv2.fillPoly(overlay, [pts], colour)
        cv2.polylines(canvas, [pts], True, colour, thick)
    canvas = cv2.addWeighted(overlay, 0.25, canvas, 0.75, 0)
    labelled: set[int] = set()
    for n, box in enumerate(boxes):
        colour = COLOURS[lines[n] % len(COLOURS)]
        cv2.rectangle(canvas, (box["x"], box["y"]), (box["x"] + box["w"], box["y"] + box["h"]),
                      colour, max(1, thick // 2))
        if lines[n] not in labelled:
            labelled.add(lines[n])
            cv2.putText(canvas, str(lines[n] + 1), (box["x"] + 4, box["y"] + 4 + 12 * thick),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.5 * thick, colour, thick)
    return canvas


def _read_text(s3: Any, dest_bucket: str, job: str, w_id: str, i_id: str, version: str,
               pages: list[dict[str, Any]], truth: dict[str, str] | None) -> float | None:
    """Attach each page's OCR row (``page["ocr"]``, with its CER when the truth is known);
    returns the volume's CER (errors over characters), None without truth or text."""
    from bec.ocr.score import errors

    try:
        body = s3.get_object(Bucket=dest_bucket, Key=artifacts.parquet_key(job, w_id, i_id, version))["Body"].read()
    except Exception:  # no ocr output for this version: pictures without text
        return None
    dist = chars = 0
    for page, row in zip(pages, pq.read_table(io.BytesIO(body)).to_pylist()):
        page["ocr"] = row
        if truth and row["ok"] and row["img_file_name"] in truth:
            d, n = errors(row["text"] or "", truth[row["img_file_name"]])
            row["cer"] = d / n if n else None
            dist, chars = dist + d, chars + n
    return dist / chars if chars else None


def render_volume(s3: Any, source_bucket: str, dest_bucket: str, job: str, w_id: str, i_id: str,
                  version: str, out_dir: Path, ocr_job: str | None = None,
                  truth: dict[str, str] | None = None) -> VolumePictures:
    body = s3.get_object(Bucket=dest_bucket, Key=artifacts.parquet_key(job, w_id, i_id, version))["Body"].read()
    pages = pq.read_table(io.BytesIO(body)).to_pylist()
    cer = _read_text(s3, dest_bucket, ocr_job, w_id, i_id, version, pages, truth) if ocr_job else None
    marker = json.loads(s3.get_object(Bucket=dest_bucket,
                                      Key=artifacts.success_key(job, w_id, i_id, version))["Body"].read())
    folder = out_dir / f"{w_id}-{i_id}"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = volume_prefix(w_id, i_id)
    for page in pages:
        if not page["ok"]:
            continue
        data = s3.get_object(Bucket=source_bucket, Key=prefix + page["img_file_name"])["Body"].read()
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        image = corrected_page(image, page["rotation_angle"], page["tps_points"], page["tps_alpha"])
        drawn = draw_page(image, page["contours"], page["contours_bboxes"], page["line_index"])
        if drawn.shape[1] > MAX_WIDTH:
            scale = MAX_WIDTH / drawn.shape[1]
            drawn = cv2.resize(drawn, (MAX_WIDTH, int(drawn.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        Image.fromarray(drawn).save(folder / (Path(page["img_file_name"]).stem + ".png"), optimize=True)
    pictures = VolumePictures(w_id, i_id, version, pages, marker, folder, cer)
    (folder / "index.html").write_text(volume_html(pictures))
    return pictures


def _stage_ms(page: dict[str, Any]) -> str:
    return " · ".join(f"{k} {page[k + '_ms']:.0f} ms" for k in ("fetch", "decode", "infer", "post"))


def _correction(page: dict[str, Any]) -> str:
    """How the drawn (corrected) page was made from the original."""
    rotated = ("not rotated" if page["rotation_angle"] is None
               else f"rotated {page['rotation_angle']:+.1f}°")
    dewarped = ("not dewarped" if page["tps_points"] is None
                else f"dewarped ({len(page['tps_points'])} control points)")
    return f"{rotated}, {dewarped}"


def _text_html(row: dict[str, Any] | None) -> str:
    """The text the ocr job read on the page, with its confidence (and CER when known)."""
    if row is None:
        return ""
    if not row["ok"]:
        return (f"<p class='text err'>OCR failed at {html.escape(row['error_stage'] or '')}: "
                f"{html.escape(row['error_message'] or '')}</p>")
    facts = [f"{row['nb_lines']} lines from {html.escape(row['line_source'] or '')}"]
    if row["mean_confidence"] is not None:
        facts.append(f"confidence {row['mean_confidence']:.0f}")
    if row.get("cer") is not None:
        facts.append(f"CER {row['cer']:.1%}")
    return (f"<div class=text><small>{' · '.join(facts)} · ocr {row['ocr_ms']:.0f} ms</small>"
            f"<p class=text lang=bo>{html.escape(row['text'] or '')}</p></div>")


def volume_html(v: VolumePictures) -> str:
    rows = []
    for page in v.pages:
        name = html.escape(page["img_file_name"])
        if page["ok"]:
            png = html.escape(Path(page["img_file_name"]).stem + ".png")
            rows.append(f'<figure><div class=page><a href="{png}"><img src="{png}" loading="lazy"></a>'
                        f"{_text_html(page.get('ocr'))}</div><figcaption>"
                        f"<b>{name}</b> — {page['nb_lines']} lines ({page['nb_contours']} contours), "
                        f"skew {page['skew_angle']:.1f}°, {_correction(page)} · "
                        f"{page['width']}×{page['height']} px"
                        f"<br><small>{_stage_ms(page)}</small></figcaption></figure>")
        else:
            rows.append(f"<figure class=err><b>{name}</b> failed at {html.escape(page['error_stage'] or '')}: "
                        f"{html.escape(page['error_type'] or '')} — {html.escape(page['error_message'] or '')}</figure>")
    m = v.marker
    return f"""<!doctype html><meta charset=utf-8><title>{v.w_id}/{v.i_id}</title>
<style>body{{font-family:sans-serif;margin:2em;background:#fafafa}} img{{max-width:100%;border:1px solid #ccc}}
figure{{margin:0 0 2em}} .err{{color:#a00}} .page{{display:flex;gap:1em;align-items:flex-start}}
.page>a{{flex:3}} .text{{flex:2;font-size:1.3em;white-space:pre-wrap;margin:0}}</style>
<h1>{v.w_id} / {v.i_id} <small>version {v.version}</small></h1>
<p>{m.get('total_images')} pages, {m.get('nb_errors')} errors, {m.get('total_duration_ms', 0) / 1000:.1f} s
({m.get('avg_duration_per_page_ms', 0):.0f} ms/page) · model {html.escape(str(m.get('model', {}).get('name')))}
· worker {html.escape(str(m.get('worker', {}).get('name')))}</p>
{''.join(rows)}
"""


def index_html(volumes: list[VolumePictures], stats_text: str) -> str:
    items = "".join(
        f'<li><a href="{v.folder.name}/index.html">{v.w_id} / {v.i_id}</a> — {len(v.pages)} pages, '
        f"{sum(p['nb_lines'] for p in v.pages)} lines, {v.marker.get('nb_errors')} errors"
        + (f", OCR CER {v.cer:.1%}" if v.cer is not None else "") + "</li>"
        for v in volumes)
    return f"""<!doctype html><meta charset=utf-8><title>BEC demo</title>
<style>body{{font-family:sans-serif;margin:2em}}</style>
<h1>BEC demo: line detection, then OCR on its lines</h1><ul>{items}</ul><pre>{html.escape(stats_text)}</pre>
"""
