"""Drawing on a flat page: the canvas, shaped Tibetan lines, digits, rules, frames and
illustrations. The layouts (:mod:`.layout`) compose pages from these strokes.

A :class:`Canvas` is the size of the page: ``ink`` (glyph coverage, uint8), ``art``
(painted illustrations, uint8 darkness) and ``labels`` (int16: 0 paper, k the band of
text line k). Capture (:mod:`.capture`) later warps all three together, so the labels stay
exact ground truth for the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from bec.tools.synth.fonts import Font, Run, fonts_of, load_font
from bec.tools.synth.text import TSHEG, Writer

SHIFT = 3                      # sub-pixel bits for cv2 drawing


@dataclass
class Canvas:
    """The flat page: what the layout drew, before capture."""

    ink: np.ndarray                     # uint8 H×W glyph and rule coverage
    labels: np.ndarray                  # int16 H×W, k = band of line k
    art: np.ndarray | None = None       # uint8 H×W darkness of painted illustrations
    n_lines: int = 0
    stroke: int = 0                     # >0 thickens ink (woodblock), <0 thins it
    blots: bool = False
    aged: bool = False                  # creased, worn folio (manuscripts, woodblocks)
    notes: list[str] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)  # label k → line k's text, left to right

    def note_text(self, label: int, text: str) -> None:
        """Add what was written on line ``label`` (the OCR ground truth): a page number and
        a title on one band, or a table entry and its page number, read left to right."""
        before = self.texts.get(label)
        self.texts[label] = text if not before else f"{before} {text}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.ink.shape


def new_canvas(h: int, w: int) -> Canvas:
    return Canvas(np.zeros((h, w), np.uint8), np.zeros((h, w), np.int16))


# --------------------------------------------------------------------------- text runs

_RUNS: dict[tuple[str, int, str], Run] = {}


def shaped(font: Font, ppem: int, text: str) -> Run:
    key = (font.spec.file, ppem, text)
    run = _RUNS.get(key)
    if run is None:
        if len(_RUNS) > 200_000:
            _RUNS.clear()
        run = _RUNS[key] = font.shape(text, ppem)
    return run


def _blit(ink: np.ndarray, font: Font, ppem: int, run: Run, x: float, baseline: float,
          value: float = 1.0) -> None:
    """Draw a shaped run with its pen at (x, baseline): glyph coverage, max-combined."""
    h, w = ink.shape
    for gid, gx, gy in zip(run.gids.tolist(), run.x.tolist(), run.y.tolist()):
        bm, left, top = font.glyph(gid, ppem)
        if not bm.size:
            continue
        x0 = int(round(x + gx)) + left
        y0 = int(round(baseline - gy)) - top
        bh, bw = bm.shape
        ya, yb, xa, xb = max(y0, 0), min(y0 + bh, h), max(x0, 0), min(x0 + bw, w)
        if ya >= yb or xa >= xb:
            continue
        src = bm[ya - y0:yb - y0, xa - x0:xb - x0]
        if value < 1.0:
            src = (src * value).astype(np.uint8)
        dst = ink[ya:yb, xa:xb]
        np.maximum(dst, src, out=dst)


def _units(writer: Writer, text: str) -> list[str]:
    """A chunk split after each tsheg: the places a line may break."""
    out, cur = [], ""
    for ch in text:
        cur += ch
        if ch == TSHEG:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


@dataclass
class TextStyle:
    """How one page writes: font, body size, spacing, manuscript irregularity."""

    font: Font
    body: float                 # body height in px
    space: float                # width of a space after a shad, px
    wave: float = 0.0           # amplitude of a slow baseline wave, px (manuscripts)
    jitter: float = 0.0         # per-syllable baseline jitter, px
    value: float = 1.0          # ink coverage scale (faint ruling uses less)
    wide_gaps: float = 0.03     # share of spaces that are wide (a sentence end, a tab)

    @property
    def ppem(self) -> int:
        return self.font.ppem_for_body(self.body)

    def scaled(self, factor: float) -> "TextStyle":
        return TextStyle(self.font, self.body * factor, self.space * factor,
                         self.wave * factor, self.jitter * factor, self.value, self.wide_gaps)


def pick_style(rng: np.random.Generator, script: str, body: float, *,
                irregular: bool = False) -> TextStyle:
    specs, p = fonts_of(script)
    font = load_font(specs[int(rng.choice(len(specs), p=p))].file)
    space = body * rng.uniform(0.5, 1.6)
    wave = body * rng.uniform(0.0, 0.15) if irregular else 0.0
    jitter = body * rng.uniform(0.0, 0.07) if irregular else 0.0
    return TextStyle(font, body, space, wave, jitter)


def write_line(canvas: Canvas, rng: np.random.Generator, writer: Writer, style: TextStyle,
               segments: list[tuple[float, float]], band_top: float, *, label: int,
               justify: bool, first: str = "", fill: float = 1.0,
               chunks: list[str] | None = None) -> tuple[float, float] | None:
    """Fill ``segments`` (x ranges, left to right) of one line with text.

    ``band_top`` is the head line's y. The line ends early when ``fill`` < 1 (the last
    line of a text) or ``chunks`` run out. ``label`` > 0 draws the band from the first
    glyph to the last; 0 draws ink only (captions, notes, margin titles). Returns the
    x extent written, or None when nothing fitted.
    """
    font, ppem = style.font, style.ppem
    scale = ppem / font.upem
    baseline = band_top + font.body_top * scale
    queue: list[str] = []
    if first:
        queue.append(first)
    own_chunks = chunks is None
    chunks = list(chunks or [])
    total = sum(b - a for a, b in segments)
    limit = total * fill
    placed: list[tuple[str, float]] = []          # (unit, x)
    used = 0.0
    x_first = x_last = None
    wave_phase = rng.uniform(0, 2 * np.pi)
    wave_len = style.body * rng.uniform(8, 30)
    for si, (a, b) in enumerate(segments):
        x = a
        seg_units: list[tuple[str, float, float]] = []        # (unit, x, width)
        gaps: list[int] = []                                  # indices after which a space stands
        while True:
            if not queue:
                if used >= limit:
                    break
                if own_chunks:
                    queue = [writer.chunk()]
                elif chunks:
                    queue = [chunks.pop(0)]
                else:
                    break
                if seg_units and not seg_units[-1][0].endswith(" "):
                    gaps.append(len(seg_units) - 1)
                    # Real lines have wide blanks too (after a sentence, round a verse):
                    # they stay inside the line, which is what a model must learn.
                    wide = rng.random() < style.wide_gaps
                    x += style.body * rng.uniform(2.5, 6.0) if wide else style.space * rng.uniform(0.8, 1.3)
            unit_text = queue[0]
            units = _units(writer, unit_text)
            u = units[0]
            run = shaped(font, ppem, u)
            if x + run.width > b:
                break
            seg_units.append((u, x, run.width))
            x += run.width
            used += run.width
            rest = unit_text[len(u):]
            queue[0:1] = [rest] if rest else []
            if used >= limit and not queue:
                break
        if not seg_units:
            continue
        if justify and gaps and (queue or own_chunks) and used < limit:
            slack = b - (seg_units[-1][1] + seg_units[-1][2])
            if 0 < slack < style.body * 6 * len(gaps):
                shift = np.zeros(len(seg_units))
                for gi in gaps:
                    shift[gi + 1:] += slack / len(gaps)
                seg_units = [(t, ux + s, uw) for (t, ux, uw), s in zip(seg_units, shift)]
        placed += [(t, ux) for t, ux, _ in seg_units]
        x_first = seg_units[0][1] if x_first is None else x_first
        x_last = seg_units[-1][1] + seg_units[-1][2]
        if used >= limit and not queue:
            break
        if not own_chunks and not chunks and not queue:
            break
    if not placed:
        return None

    def dy(xv: np.ndarray | float) -> np.ndarray | float:
        return style.wave * np.sin(2 * np.pi * np.asarray(xv) / wave_len + wave_phase)

    words: list[str] = []
    end = None
    for u, ux in placed:
        run = shaped(font, ppem, u)
        jit = rng.normal(0.0, style.jitter) if style.jitter else 0.0
        _blit(canvas.ink, font, ppem, run, ux, baseline + float(dy(ux)) + jit, style.value)
        if end is not None and ux - end > style.body * 0.25 and not words[-1].endswith(" "):
            words.append(" ")       # a space stood here (after a shad, around a string hole)
        words.append(u)
        end = ux + run.width
    if label:
        canvas.note_text(label, "".join(words).strip())
        # The glyphs' own extent: the first glyph's left edge to the last one's right.
        xs = np.linspace(x_first, x_last, max(2, int((x_last - x_first) / max(style.body, 4)) + 2))
        top = band_top + dy(xs)
        bottom = top + font.body * scale
        poly = np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bottom[::-1]], 1)])
        cv2.fillPoly(canvas.labels, [np.round(poly * (1 << SHIFT)).astype(np.int32)], int(label),
                     cv2.LINE_8, SHIFT)
    return float(x_first), float(x_last)


def write_digits(canvas: Canvas, text: str, x: float, band_top: float, body: float,
                 rng: np.random.Generator, label: int = 0, align: str = "left") -> tuple[float, float]:
    """Arabic digits (page numbers) with a Hershey font, band = the digits' height."""
    face = (cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_SIMPLEX,
            cv2.FONT_HERSHEY_DUPLEX)[int(rng.integers(4))]
    height = body * rng.uniform(1.0, 1.3)
    scale = height / 22.0
    thick = max(1, int(round(height * 0.09)))
    (tw, th), _ = cv2.getTextSize(text, face, scale, thick)
    if align == "center":
        x -= tw / 2
    elif align == "right":
        x -= tw
    base = band_top + th
    cv2.putText(canvas.ink, text, (int(round(x)), int(round(base))), face, scale, 255, thick, cv2.LINE_AA)
    if label:
        canvas.note_text(label, text)
        cv2.rectangle(canvas.labels, (int(x), int(base - th)), (int(x + tw), int(base)), int(label), -1)
    return x, x + tw


# --------------------------------------------------------------------------- strokes

def rule(canvas: Canvas, rng: np.random.Generator, p0: tuple[float, float],
          p1: tuple[float, float], thick: int, value: int = 255) -> None:
    """A hand- or block-ruled straight line with a little wobble."""
    n = 16
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) * np.array(p0) + t * np.array(p1)
    pts = pts + rng.normal(0.0, 0.4, pts.shape)
    cv2.polylines(canvas.ink, [np.round(pts * (1 << SHIFT)).astype(np.int32)], False, int(value),
                  max(1, int(thick)), cv2.LINE_AA, SHIFT)


def box(canvas: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
         thick: int, value: int = 255) -> None:
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        rule(canvas, rng, a, b, thick, value)


def frame(canvas: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
           thick: int, double: bool) -> None:
    box(canvas, rng, x0, y0, x1, y1, thick)
    if double:
        d = thick * rng.uniform(2.0, 5.0) + 3
        box(canvas, rng, x0 - d, y0 - d, x1 + d, y1 + d, max(1, int(thick * rng.uniform(1.0, 2.5))))


def block_edge(canvas: Canvas, rng: np.random.Generator, x0: float, x1: float, y: float,
                thick: float) -> None:
    """A woodblock's inked edge: broken, wobbling strokes of uneven weight along a rule."""
    x = x0 + rng.uniform(0, 0.05) * (x1 - x0)
    while x < x1:
        length = (x1 - x0) * rng.uniform(0.03, 0.3)
        n = max(2, int(length / max(thick, 2.0)))
        xs = np.linspace(x, min(x + length, x1), n)
        ys = y + rng.normal(0.0, thick * 0.3, n) + rng.uniform(-thick, thick)
        pts = np.stack([xs, ys], 1)
        cv2.polylines(canvas.ink, [np.round(pts * (1 << SHIFT)).astype(np.int32)], False,
                      int(rng.uniform(150, 255)), max(1, int(thick * rng.uniform(0.4, 1.2))),
                      cv2.LINE_AA, SHIFT)
        x += length + (x1 - x0) * rng.uniform(0.0, 0.05)


def vertical_text(canvas: Canvas, rng: np.random.Generator, writer: Writer, style: TextStyle,
                   cx: float, cy: float, length: float, text: str | None = None) -> None:
    """A margin title or folio number written sideways (rotated 90°), centred on (cx, cy)."""
    text = text or writer.words_only(int(rng.integers(2, 7)))
    ppem = style.ppem
    run = shaped(style.font, ppem, text)
    if run.width <= 0:
        return
    scale = min(1.0, length / run.width)
    sub = style.scaled(scale)
    ppem = sub.ppem
    run = shaped(style.font, ppem, text)
    size = style.font.upem and ppem
    h = int(size * 2.2) + 4
    w = int(run.width) + 4
    strip = np.zeros((h, w), np.uint8)
    _blit(strip, style.font, ppem, run, 2, size * 1.3)
    strip = np.rot90(strip, 1 if rng.random() < 0.8 else -1)
    sh, sw = strip.shape
    y0, x0 = int(cy - sh / 2), int(cx - sw / 2)
    H, W = canvas.shape
    ya, yb, xa, xb = max(y0, 0), min(y0 + sh, H), max(x0, 0), min(x0 + sw, W)
    if ya < yb and xa < xb:
        dst = canvas.ink[ya:yb, xa:xb]
        np.maximum(dst, strip[ya - y0:yb - y0, xa - x0:xb - x0], out=dst)


def illustration(canvas: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float,
                  y1: float) -> None:
    """A painted miniature: a dark field of figures, discs and patterns in a frame."""
    if canvas.art is None:
        canvas.art = np.zeros(canvas.shape, np.uint8)
    art = canvas.art
    xa, ya, xb, yb = int(x0), int(y0), int(x1), int(y1)
    w, h = xb - xa, yb - ya
    if w < 8 or h < 8:
        return
    patch = np.full((h, w), rng.uniform(60, 200), np.float32)
    for _ in range(int(rng.integers(6, 20))):
        c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        ax = (int(rng.uniform(w * 0.03, w * 0.3)), int(rng.uniform(h * 0.03, h * 0.3)))
        cv2.ellipse(patch, c, ax, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0, 255)),
                    -1 if rng.random() < 0.7 else max(1, int(w * 0.01)))
    for _ in range(int(rng.integers(0, 6))):
        pts = np.stack([rng.uniform(0, w, 5), rng.uniform(0, h, 5)], 1).astype(np.int32)
        cv2.polylines(patch, [pts], True, float(rng.uniform(0, 255)), max(1, int(w * 0.01)))
    patch += rng.normal(0, 18, patch.shape).astype(np.float32)
    patch = cv2.GaussianBlur(patch, (0, 0), 1.0)
    cv2.rectangle(patch, (0, 0), (w - 1, h - 1), 230.0, max(2, int(min(w, h) * 0.03)))
    art[ya:yb, xa:xb] = np.clip(patch, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- pecha
