"""Generated volumes in the archive's layout (DESIGN §2), for tests, the demo and benchmarks.

Each volume gets archive-like pages from ``bec.tools.synth`` (pechas, woodblocks,
manuscripts, book pages, tables of contents in real Tibetan script) stored the way the
archive stores them — RGB JPEG of a photograph, grayscale JPEG of a scan, Group 4
bilevel TIFF — and a gzip'd ``dimensions.json``. The page's true line count is returned
so callers can check results. Pages can be bent or skewed by a known amount
(``geometries``), so volumes exercise the second pass and the dewarp.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bec.edges.archive import MANIFEST, volume_prefix

KINDS = ("jpeg_rgb", "jpeg_gray", "tiff_g4")
#: How each stored format was captured.
CAPTURE_OF = {"jpeg_rgb": "photo", "jpeg_gray": "scan", "tiff_g4": "bilevel"}


@dataclass(frozen=True)
class MadePage:
    filename: str
    kind: str
    n_lines: int
    width: int
    height: int
    geometry: str = "straight"
    #: int16 H×W: 0 paper, k = the band of text line k (the generator's exact ground truth)
    line_labels: Any = field(default=None, repr=False, compare=False)
    line_texts: tuple[str, ...] = ()   # each line's text, top line first (OCR ground truth)


def render(kind: str, rng: np.random.Generator, width: int | None = None,
           height: int | None = None, geometry: str = "straight",
           page_kind: str | None = None) -> tuple[bytes, Any]:
    from bec.tools.synth import encode_jpeg, encode_tiff_g4, generate_page

    page = generate_page(rng, page_kind, capture=CAPTURE_OF[kind], width=width, height=height,
                         **geometry_args(geometry, rng))
    if kind == "tiff_g4":
        return encode_tiff_g4(page.image, page.dpi), page
    return encode_jpeg(page.image, rgb=(kind == "jpeg_rgb")), page


GEOMETRIES = ("straight", "bent", "skewed")


def geometry_args(geometry: str, rng: np.random.Generator) -> dict[str, float]:
    """The generator's arguments for a page of ``geometry``: as drawn (straight, or the
    generator's own small skew and photo bend), bent by 30–45 pixels up or down, or skewed by
    4–5° either way."""
    if geometry == "straight":
        return {}
    sign = float(rng.choice([-1.0, 1.0]))
    if geometry == "bent":
        return {"bend": sign * float(rng.uniform(30.0, 45.0))}
    if geometry == "skewed":
        return {"skew": sign * float(rng.uniform(4.0, 5.0))}
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")


def manifest_bytes(entries: Sequence[dict[str, Any]]) -> bytes:
    """``dimensions.json`` as the archive stores it: gzip'd JSON. mtime=0: the same entries give
    the same bytes, hence the same ETag (version)."""
    return gzip.compress(json.dumps(list(entries)).encode(), mtime=0)


def put_manifest(s3: Any, bucket: str, w_id: str, i_id: str, entries: Sequence[dict[str, Any]],
                 raw: bytes | None = None) -> str:
    """Write ``dimensions.json`` (``manifest_bytes`` unless ``raw`` is given); returns its version."""
    body = raw if raw is not None else manifest_bytes(entries)
    answer = s3.put_object(Bucket=bucket, Key=volume_prefix(w_id, i_id) + MANIFEST, Body=body)
    return answer["ETag"].strip('"')[:6]


def make_volume(s3: Any, bucket: str, w_id: str, i_id: str, n_pages: int, seed: int,
                kinds: Sequence[str] = KINDS, size: tuple[int, int] | None = None,
                geometries: Sequence[str] = ("straight",),
                page_kinds: Sequence[str | None] = (None,)) -> list[MadePage]:
    """Upload ``n_pages`` generated pages (kinds, geometries and page kinds — ``book``,
    ``pecha``…, None: drawn — in rotation) and the volume's manifest."""
    rng = np.random.default_rng(seed)
    prefix = volume_prefix(w_id, i_id)
    suffix = i_id[1:] if len(i_id) == 5 and i_id[1:].isdigit() else i_id
    made, entries = [], []
    for n in range(n_pages):
        kind = kinds[n % len(kinds)]
        geometry = geometries[n % len(geometries)]
        data, page = render(kind, rng, *(size or (None, None)), geometry=geometry,
                            page_kind=page_kinds[n % len(page_kinds)])
        name = f"{suffix}{n + 1:04d}.{'tif' if kind == 'tiff_g4' else 'jpg'}"
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=data)
        h, w = page.image.shape
        entry = {"filename": name, "width": int(w), "height": int(h)}
        if len(data) > 2_000_000:
            entry["size"] = len(data)
        entries.append(entry)
        made.append(MadePage(name, kind, page.n_lines, int(w), int(h), geometry, page.line_labels,
                             tuple(page.line_texts)))
    put_manifest(s3, bucket, w_id, i_id, entries)
    return made


def ensure_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        s3.create_bucket(Bucket=bucket)
