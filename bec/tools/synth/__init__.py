"""Seeded generator of archive-like Tibetan pages with exact line labels.

BEC ships a small line model of its own (``bec.ldv1.smallnet``, trained by
``bec.tools.train_ldv1``) so that the demo and the tests show real line detection without the
production weights. Real scans and their labels cannot be shipped, so pages are made
here, to look like the archive's: real Tibetan script shaped with HarfBuzz in the fonts
Debian packages (``fonts-tibetan-machine``, ``fonts-ddc-uchen``, ``fonts-monlam``,
``fonts-sambhota-tsugring``, ``fonts-sambhota-yigchung`` for dbu-med), text from the
``hunspell-bo`` word list, laid out as the archive's kinds of page and captured the
ways the archive was made.

A tool, not runtime: no module a worker imports may import this package (a test holds
that), and it needs the ``synth`` extra (``uharfbuzz``, ``freetype-py``) and the fonts.
:func:`missing_fonts` says what to install when they are not there.

API
---
``generate_page(rng, kind=None, capture=None, *, skew=None, bend=None, perspective=None,
width=None, height=None, dpi=None) -> SynthPage`` draws one page; everything random
comes from ``rng`` (a ``numpy.random.Generator`` or an int seed), so the same seed and
arguments give the same page. ``page_for_seed(seed, kind=None, capture=None, **kw)`` is
the same from a seed. Arguments left ``None`` are drawn at random:

* ``kind`` (:data:`KINDS`): ``"pecha"`` (modern print folio: frame, margin-title and
  folio-number panels, 4–9 long lines), ``"woodblock"`` (bold, blotted, uneven inking),
  ``"manuscript"`` (dbu-med or hand uchen, wavy baselines, ruled boxes, string holes,
  painted miniatures with captions), ``"book"`` (running header with page number,
  13–23 body lines, verse, footnotes under a short rule, page number at the foot) and
  ``"toc"`` (two-column table of contents with dot leaders);
* ``capture`` (:data:`CAPTURES`): ``"photo"`` (paper colour and texture, uneven light,
  dark border, bend, slight perspective), ``"scan"`` (show-through, specks) or
  ``"bilevel"`` (thresholded like a Group 4 fax scan; ``dpi`` 300 or 600);
* ``skew``: degrees, positive = counter-clockwise (lines rise to the right), exactly
  the rotation applied (±5° at most when drawn at random);
* ``bend``: pixels, the amplitude of a smooth vertical displacement of the content
  (``bend · f(x)``, ``max |f| = 1``);
* ``perspective``: the largest corner displacement as a share of the page size;
* ``width``/``height``: the output image size (otherwise drawn for the kind).

:class:`SynthPage` holds ``image`` (uint8 H×W gray; only 0 and 255 when bilevel),
``n_lines``, ``line_labels`` (int16 H×W in the image's pixels: 0 = background, k =
the band of text line k, 1 = the top line; in a table of contents row by row, left
column first), ``line_mask`` (bool, ``line_labels > 0``), ``angle`` (= skew), ``bend``,
``kind``, ``capture``, ``dpi``, ``style`` (``"bilevel"`` or ``"gray"``) and ``line_texts``
(line k's text at index k − 1, left to right: the OCR ground truth). Labels are
drawn flat and warped with the image, so they are exact after skew, bend and
perspective.

What a line is (the label): one band per text line from its first glyph to its last,
head line to foot of the letters; gaps, shads and string holes inside a line belong to
it. A pecha's vertical margin title and folio number, captions, marginal notes, frames,
ruling and illustrations are not lines; a book page's running header (page number and
title together) and its page number at the foot are.

Seeds: training uses seeds below ``EVAL_SEED_START``; evaluation and tests use seeds
from it upwards, so the model is always scored on pages it has never seen.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bec.tools.synth.fonts import MissingFonts, missing_fonts

__all__ = ["SynthPage", "generate_page", "page_for_seed", "encode_jpeg", "encode_tiff_g4",
           "KINDS", "CAPTURES", "STYLES", "EVAL_SEED_START", "KIND_WEIGHTS", "missing_fonts",
           "MissingFonts", "WIDE_KINDS"]

KINDS = ("pecha", "woodblock", "manuscript", "book", "toc")
WIDE_KINDS = ("pecha", "woodblock", "manuscript")
CAPTURES = ("photo", "scan", "bilevel")
STYLES = ("gray", "bilevel")
#: How often each kind is drawn when none is asked for (the archive is mostly pechas).
KIND_WEIGHTS = {"pecha": 0.2, "woodblock": 0.15, "manuscript": 0.3, "book": 0.25, "toc": 0.1}
CAPTURE_WEIGHTS = {"photo": 0.35, "scan": 0.35, "bilevel": 0.3}
EVAL_SEED_START = 1_000_000      # training seeds are < this, evaluation seeds ≥ this
_MAX_FLAT_PIXELS = 4_000_000     # a 600-dpi page is drawn at most this big (speed)


@dataclass
class SynthPage:
    """One generated page and its ground truth (see the module docstring)."""

    image: np.ndarray          # uint8 H×W gray (0/255 only for "bilevel")
    n_lines: int
    line_labels: np.ndarray    # int16 H×W: 0 background, k = band of line k (1 = top)
    angle: float               # skew applied, degrees, positive counter-clockwise
    bend: float                # bend amplitude applied, pixels
    kind: str
    capture: str
    dpi: int = 300
    line_texts: list[str] = field(default_factory=list)  # line k's text at [k - 1] (OCR ground truth)

    @property
    def line_mask(self) -> np.ndarray:
        """bool H×W: any line's band."""
        return self.line_labels > 0

    @property
    def style(self) -> str:
        """``"bilevel"`` for bilevel captures, ``"gray"`` otherwise."""
        return "bilevel" if self.capture == "bilevel" else "gray"


def page_for_seed(seed: int, kind: str | None = None, capture: str | None = None,
                  **kwargs: float | int | None) -> SynthPage:
    """The page of a seed (kind and capture drawn from the seed when not given)."""
    return generate_page(np.random.default_rng(seed), kind, capture, **kwargs)


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _sample_skew(rng: np.random.Generator) -> float:
    r = rng.random()
    if r < 0.5:
        return float(rng.uniform(-1.0, 1.0))
    if r < 0.8:
        return float(rng.uniform(-2.5, 2.5))
    return float(rng.uniform(-5.0, 5.0))


def _flat_size(rng: np.random.Generator, kind: str) -> tuple[int, int]:
    """(h, w) of a page of ``kind`` at 300 dpi-like pixel sizes."""
    if kind in WIDE_KINDS:
        h = int(rng.uniform(380, 820))
        ratio = rng.uniform(2.8, 5.6) if kind != "woodblock" else rng.uniform(3.5, 5.8)
        return h, int(min(h * ratio, 4000))
    w = int(rng.uniform(1000, 1500))
    return int(w * rng.uniform(1.35, 1.6)), w


def generate_page(rng: np.random.Generator | int, kind: str | None = None,
                  capture: str | None = None, *, skew: float | None = None,
                  bend: float | None = None, perspective: float | None = None,
                  width: int | None = None, height: int | None = None,
                  dpi: int | None = None) -> SynthPage:
    """Draw one page; see the module docstring for every argument."""
    from bec.tools.synth.capture import capture as take
    from bec.tools.synth.layout import draw_layout

    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(int(rng))
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if capture is not None and capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    problem = missing_fonts()
    if problem:
        raise MissingFonts(problem)
    sized = width is not None and height is not None
    if kind is None:
        if sized:
            kind = (_pick(rng, {k: KIND_WEIGHTS[k] for k in WIDE_KINDS}) if width > 2.5 * height
                    else _pick(rng, {"book": 0.7, "toc": 0.3}))
        else:
            kind = _pick(rng, KIND_WEIGHTS)
    capture = capture or _pick(rng, CAPTURE_WEIGHTS)
    if dpi is None:
        dpi = 600 if capture == "bilevel" and rng.random() < 0.4 else 300
    if skew is None:
        skew = _sample_skew(rng)
    skew = float(skew)
    if sized:
        out_h, out_w = int(height), int(width)
        fh, fw = _fit_flat(out_h, out_w, skew, abs(bend or 0.0), capture == "photo")
    else:
        fh, fw = _flat_size(rng, kind)
        if dpi >= 600:
            f = min(2.0, np.sqrt(_MAX_FLAT_PIXELS / (fh * fw)))
            fh, fw = int(fh * f), int(fw * f)
        out_h = out_w = None
    if bend is None:
        bend = float(rng.uniform(0.0, 0.015 if capture == "photo" else 0.004) * fw)
        if kind not in WIDE_KINDS:
            bend *= 0.5
    cv = draw_layout(rng, kind, fh, fw)
    image, labels = take(rng, cv, capture, skew, float(bend), perspective,
                         None if out_h is None else (out_h, out_w))
    return SynthPage(image=image, n_lines=cv.n_lines, line_labels=labels, angle=skew,
                     bend=float(bend), kind=kind, capture=capture, dpi=int(dpi),
                     line_texts=[cv.texts.get(k, "") for k in range(1, cv.n_lines + 1)])


def _fit_flat(out_h: int, out_w: int, skew: float, bend: float, photo: bool) -> tuple[int, int]:
    """The flat page size whose capture fills an out_h×out_w image: the rotated page
    (with its bend, and a photograph's border) must fit inside."""
    c, s = np.cos(np.radians(skew)), abs(np.sin(np.radians(skew)))
    room_w = out_w * (0.94 if photo else 1.0)
    room_h = out_h * (0.9 if photo else 1.0) - 2 * bend
    det = c * c - s * s
    fw = (c * room_w - s * room_h) / det
    fh = (c * room_h - s * room_w) / det
    fw = max(fw, room_w * 0.5)
    fh = max(fh, room_h * 0.3)
    return max(16, int(fh)), max(16, int(fw))


# --------------------------------------------------------------------------- encoders

_PAPER_TINTS = ((1.0, 0.96, 0.86), (1.0, 0.93, 0.80), (0.97, 0.95, 0.90), (1.0, 0.98, 0.93),
                (0.95, 0.92, 0.85))


def encode_jpeg(image: np.ndarray, rgb: bool, quality: int = 85) -> bytes:
    """JPEG bytes of a gray page; with ``rgb`` the page is tinted like old paper."""
    if rgb:
        tint = np.float32(_PAPER_TINTS[int(image[:: 97, :: 89].sum()) % len(_PAPER_TINTS)])
        data = np.clip(image[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)
        pil = Image.fromarray(data, "RGB")
    else:
        pil = Image.fromarray(image, "L")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def encode_tiff_g4(image: np.ndarray, dpi: int = 300) -> bytes:
    """CCITT Group 4 TIFF bytes (1 bit/pixel) of a page; pixels ≥ 128 become white."""
    pil = Image.fromarray(np.where(image >= 128, 255, 0).astype(np.uint8), "L").convert("1")
    buf = io.BytesIO()
    pil.save(buf, format="TIFF", compression="group4", dpi=(dpi, dpi))
    return buf.getvalue()
