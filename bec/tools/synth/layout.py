"""Page layouts drawn flat: ink, illustrations and the line labels, before any capture.

A layout draws on a :class:`Canvas` the size of the page: ``ink`` (glyph coverage,
uint8), ``art`` (painted illustrations, uint8 darkness) and ``labels`` (int16: 0 paper,
k the band of text line k). Capture (:mod:`.capture`) later warps all three together,
so the labels stay exact ground truth for the image.

What is and is not a line follows the issue's rules:

* a line's band runs from its first glyph to its last, head line to foot of the
  letters; gaps, shads and string holes inside it belong to it;
* a pecha's vertical margin title, its folio number, captions under its illustrations,
  marginal notes, frames, ruling and string-hole circles are ink but never lines;
* a book page's running header (with its page number) and a page number at the foot
  are lines, and so are footnotes; a table of contents has one line per entry and
  column.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from bec.tools.synth.fonts import Font, Run, fonts_of, load_font
from bec.tools.synth.text import SHAD, TSHEG, Writer, tibetan_number

__all__ = ["Canvas", "LAYOUTS", "draw_layout"]

_SHIFT = 3                      # sub-pixel bits for cv2 drawing


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


def _new_canvas(h: int, w: int) -> Canvas:
    return Canvas(np.zeros((h, w), np.uint8), np.zeros((h, w), np.int16))


# --------------------------------------------------------------------------- text runs

_RUNS: dict[tuple[str, int, str], Run] = {}


def _shaped(font: Font, ppem: int, text: str) -> Run:
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


def _pick_style(rng: np.random.Generator, script: str, body: float, *,
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
            run = _shaped(font, ppem, u)
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
        run = _shaped(font, ppem, u)
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
        cv2.fillPoly(canvas.labels, [np.round(poly * (1 << _SHIFT)).astype(np.int32)], int(label),
                     cv2.LINE_8, _SHIFT)
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

def _rule(canvas: Canvas, rng: np.random.Generator, p0: tuple[float, float],
          p1: tuple[float, float], thick: int, value: int = 255) -> None:
    """A hand- or block-ruled straight line with a little wobble."""
    n = 16
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) * np.array(p0) + t * np.array(p1)
    pts = pts + rng.normal(0.0, 0.4, pts.shape)
    cv2.polylines(canvas.ink, [np.round(pts * (1 << _SHIFT)).astype(np.int32)], False, int(value),
                  max(1, int(thick)), cv2.LINE_AA, _SHIFT)


def _box(canvas: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
         thick: int, value: int = 255) -> None:
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        _rule(canvas, rng, a, b, thick, value)


def _frame(canvas: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
           thick: int, double: bool) -> None:
    _box(canvas, rng, x0, y0, x1, y1, thick)
    if double:
        d = thick * rng.uniform(2.0, 5.0) + 3
        _box(canvas, rng, x0 - d, y0 - d, x1 + d, y1 + d, max(1, int(thick * rng.uniform(1.0, 2.5))))


def _block_edge(canvas: Canvas, rng: np.random.Generator, x0: float, x1: float, y: float,
                thick: float) -> None:
    """A woodblock's inked edge: broken, wobbling strokes of uneven weight along a rule."""
    x = x0 + rng.uniform(0, 0.05) * (x1 - x0)
    while x < x1:
        length = (x1 - x0) * rng.uniform(0.03, 0.3)
        n = max(2, int(length / max(thick, 2.0)))
        xs = np.linspace(x, min(x + length, x1), n)
        ys = y + rng.normal(0.0, thick * 0.3, n) + rng.uniform(-thick, thick)
        pts = np.stack([xs, ys], 1)
        cv2.polylines(canvas.ink, [np.round(pts * (1 << _SHIFT)).astype(np.int32)], False,
                      int(rng.uniform(150, 255)), max(1, int(thick * rng.uniform(0.4, 1.2))),
                      cv2.LINE_AA, _SHIFT)
        x += length + (x1 - x0) * rng.uniform(0.0, 0.05)


def _vertical_text(canvas: Canvas, rng: np.random.Generator, writer: Writer, style: TextStyle,
                   cx: float, cy: float, length: float, text: str | None = None) -> None:
    """A margin title or folio number written sideways (rotated 90°), centred on (cx, cy)."""
    text = text or writer.words_only(int(rng.integers(2, 7)))
    ppem = style.ppem
    run = _shaped(style.font, ppem, text)
    if run.width <= 0:
        return
    scale = min(1.0, length / run.width)
    sub = style.scaled(scale)
    ppem = sub.ppem
    run = _shaped(style.font, ppem, text)
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


def _illustration(canvas: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float,
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

def pecha(rng: np.random.Generator, h: int, w: int, variant: str) -> Canvas:
    """A pecha folio: "print" (modern uchen), "woodblock" or "manuscript" (dbu-med or
    uchen by hand)."""
    cv = _new_canvas(h, w)
    script = "umed" if variant == "manuscript" and rng.random() < 0.6 else "uchen"
    n = int(rng.integers(4, 10))
    mx = w * rng.uniform(0.025, 0.08)
    my = h * rng.uniform(0.07, 0.18)
    framed = variant != "manuscript" or rng.random() < 0.7
    thick = max(1, int(round(h * rng.uniform(0.002, 0.006) * (2 if variant == "woodblock" else 1))))
    fx0, fy0, fx1, fy1 = mx, my, w - mx, h - my
    if framed:
        _frame(cv, rng, fx0, fy0, fx1, fy1, thick, rng.random() < 0.5)
    block_h = fy1 - fy0
    if variant == "woodblock" or rng.random() < 0.2:
        # The printing block's edges: rough, smudged bands of ink along the frame.
        for y in (fy0, fy1):
            _block_edge(cv, rng, fx0, fx1, y, block_h / n * rng.uniform(0.08, 0.3))
    pitch = block_h / (n + rng.uniform(0.0, 0.4))
    # Line pitch over body height: about 3 on most folios, down to 1.8 on crowded ones.
    body = pitch / (rng.uniform(1.8, 3.6) if script == "uchen" else rng.uniform(2.0, 3.8))
    style = _pick_style(rng, script, body, irregular=variant == "manuscript")
    cv.aged = variant != "print" or rng.random() < 0.3
    if variant == "woodblock":
        cv.stroke = int(rng.integers(0, 3))
        cv.blots = True
    elif variant == "manuscript" and rng.random() < 0.3:
        cv.stroke = 1
    writer = Writer(rng)
    pad = body * rng.uniform(0.6, 1.5)
    tx0, tx1 = fx0 + pad, fx1 - pad
    # Side panels: margin title on the left, folio number on the right, behind rules.
    side_style = _pick_style(rng, script, body * rng.uniform(0.6, 0.9))
    if framed and rng.random() < 0.65:
        pw = w * rng.uniform(0.035, 0.07)
        _rule(cv, rng, (fx0 + pw, fy0), (fx0 + pw, fy1), thick)
        if rng.random() < 0.5:
            _rule(cv, rng, (fx0 + pw + 3 * thick + 2, fy0), (fx0 + pw + 3 * thick + 2, fy1), thick)
        _vertical_text(cv, rng, writer, side_style, fx0 + pw / 2, (fy0 + fy1) / 2, block_h * 0.8)
        tx0 = fx0 + pw + pad + 4 * thick
    elif rng.random() < 0.5:          # the title outside the frame, in the left margin
        _vertical_text(cv, rng, writer, side_style, mx * 0.5, h / 2, block_h * 0.7)
    if framed and rng.random() < 0.55:
        pw = w * rng.uniform(0.03, 0.06)
        _rule(cv, rng, (fx1 - pw, fy0), (fx1 - pw, fy1), thick)
        number = (tibetan_number(int(rng.integers(1, 600))) if rng.random() < 0.4
                  else writer.words_only(int(rng.integers(1, 4))))
        _vertical_text(cv, rng, writer, side_style, fx1 - pw / 2, (fy0 + fy1) / 2, block_h * 0.6,
                       number)
        tx1 = fx1 - pw - pad - 4 * thick
    elif rng.random() < 0.4:          # a folio number in the right margin
        _vertical_text(cv, rng, writer, side_style, w - mx * 0.5, h / 2, block_h * 0.4,
                       tibetan_number(int(rng.integers(1, 600))))
    # Illustrations at one or both ends of the text block, with captions below.
    if variant != "woodblock" and rng.random() < 0.2:
        iw = (tx1 - tx0) * rng.uniform(0.1, 0.18)
        sides = ["left", "right"] if rng.random() < 0.6 else [["left", "right"][int(rng.integers(2))]]
        cap_style = _pick_style(rng, "umed", body * rng.uniform(0.45, 0.7))
        for side in sides:
            ix0 = tx0 if side == "left" else tx1 - iw
            _illustration(cv, rng, ix0, fy0 + pad * 0.5, ix0 + iw, fy1 - pad * 0.5)
            if fy1 + 2.5 * cap_style.body < h and rng.random() < 0.7:
                write_line(cv, rng, writer, cap_style, [(ix0, ix0 + iw * 1.1)],
                           fy1 + cap_style.body * 0.8, label=0, justify=False, fill=rng.uniform(0.5, 1))
            if side == "left":
                tx0 = ix0 + iw + pad
            else:
                tx1 = ix0 - pad
    # String holes: circles the lines make room for.
    holes: list[tuple[float, float, float, float]] = []     # (cx, cy, r, extra clearance)
    if variant != "woodblock" and rng.random() < 0.5:
        r = pitch * rng.uniform(1.0, 1.8)
        k = 2 if rng.random() < 0.7 else 1
        for f in ((1 / 3, 2 / 3) if k == 2 else (0.5,)):
            cx = tx0 + (tx1 - tx0) * (f + rng.uniform(-0.05, 0.05))
            cy = (fy0 + fy1) / 2 + rng.uniform(-0.2, 0.2) * pitch
            holes.append((cx, cy, r, rng.uniform(0.0, 2.5)))
            if rng.random() < 0.7:
                cv2.circle(cv.ink, (int(cx), int(cy)), int(r), int(rng.uniform(90, 200)), max(1, thick // 2),
                           cv2.LINE_AA)
    ruled = variant == "manuscript" and rng.random() < 0.5
    short_last = rng.random() < 0.2
    top0 = fy0 + (block_h - n * pitch) / 2
    for i in range(n):
        band_top = top0 + i * pitch + (pitch - body) * rng.uniform(0.35, 0.5)
        segs = _around_holes(tx0, tx1, band_top, body, holes, pad)
        first = writer.opening() + " " if i == 0 and rng.random() < 0.2 else ""
        fill = rng.uniform(0.25, 0.9) if (short_last and i == n - 1) else 1.0
        got = write_line(cv, rng, writer, style, segs, band_top, label=cv.n_lines + 1,
                         justify=True, first=first, fill=fill)
        if got:
            cv.n_lines += 1
        if ruled and i < n - 1:
            y = top0 + (i + 1) * pitch + rng.uniform(-0.1, 0.1) * pitch
            _rule(cv, rng, (tx0 - pad * 0.5, y), (tx1 + pad * 0.5, y), 1, int(rng.uniform(60, 150)))
    if ruled:
        _box(cv, rng, tx0 - pad * 0.5, top0, tx1 + pad * 0.5, top0 + n * pitch, 1, int(rng.uniform(60, 150)))
    # Marginal notes: a few small syllables above the frame or in the left margin.
    for _ in range(int(rng.integers(0, 3))):
        note = _pick_style(rng, "umed", body * rng.uniform(0.4, 0.6))
        if my > 3 * note.body:
            x = rng.uniform(mx, w - mx - 10 * note.body)
            write_line(cv, rng, writer, note, [(x, x + note.body * rng.uniform(3, 10))],
                       my * rng.uniform(0.2, 0.5), label=0, justify=False, fill=1.0,
                       chunks=[writer.words_only(int(rng.integers(1, 4)))])
    return cv


def _around_holes(x0: float, x1: float, top: float, body: float,
                  holes: list[tuple[float, float, float, float]], pad: float) -> list[tuple[float, float]]:
    """The x ranges of a line that stay clear of the string-hole circles."""
    segs = [(x0, x1)]
    for cx, cy, r, extra in holes:
        dy = max(abs(top - cy), abs(top + body - cy))
        near = min(abs(top - cy), abs(top + body - cy)) if not (top <= cy <= top + body) else 0.0
        if near >= r + body * 0.5:
            continue
        half = np.sqrt(max(r * r - min(dy, near) ** 2, 0.0)) + pad * 0.5 + body * extra
        out = []
        for a, b in segs:
            if cx - half > a + body:
                out.append((a, min(b, cx - half)))
            if cx + half < b - body:
                out.append((max(a, cx + half), b))
        segs = out
    return segs or [(x0, x1)]


# --------------------------------------------------------------------------- book

def book(rng: np.random.Generator, h: int, w: int) -> Canvas:
    """A modern book page: running header and page number, 13–23 body lines, paragraphs,
    indented verse, sometimes footnotes under a short rule."""
    cv = _new_canvas(h, w)
    mx0, mx1 = w * rng.uniform(0.07, 0.14), w * rng.uniform(0.07, 0.14)
    my0, my1 = h * rng.uniform(0.05, 0.1), h * rng.uniform(0.05, 0.1)
    n = int(rng.integers(13, 24))
    text_h = h - my0 - my1
    pitch = text_h / (n + 3.5)
    body = pitch / rng.uniform(2.0, 4.2)
    style = _pick_style(rng, "uchen", body)
    style.space = body * rng.uniform(0.3, 0.9)
    writer = Writer(rng)
    y = my0
    number = str(int(rng.integers(1, 900)))
    where = rng.choice(["header", "footer", "both", "none"], p=[0.45, 0.35, 0.1, 0.1])
    # Running header: the page number at the outer edge and a title, as one line.
    title_style = style.scaled(rng.uniform(0.8, 1.0))
    if rng.random() < 0.85:
        x_title = mx0 + (w - mx0 - mx1) * rng.uniform(0.1, 0.45)
        lo = hi = None
        if where in ("header", "both"):
            lo, hi = write_digits(cv, number, mx0, y, title_style.body, rng, label=cv.n_lines + 1)
        got = write_line(cv, rng, writer, title_style, [(max(x_title, (hi or 0) + body * 2), w - mx1)], y,
                         label=cv.n_lines + 1, justify=False,
                         chunks=[writer.words_only(int(rng.integers(3, 9)))])
        if got and lo is not None:
            _join_band(cv, cv.n_lines + 1, y, title_style)
        cv.n_lines += 1
        if rng.random() < 0.5:
            ry = y + title_style.body * rng.uniform(1.6, 2.2)
            _rule(cv, rng, (mx0, ry), (w - mx1, ry), max(1, int(body * 0.08)))
        y += pitch * rng.uniform(1.5, 2.5)
    # Body: paragraphs and verse.
    footnotes = int(rng.integers(1, 4)) if rng.random() < 0.25 else 0
    foot_style = style.scaled(rng.uniform(0.7, 0.85))
    bottom = h - my1 - (pitch * 1.5 if where in ("footer", "both") else 0)
    bottom -= footnotes * foot_style.body * 2.2 + (pitch if footnotes else 0)
    para_start = True
    verse_left = 0
    while y + body < bottom:
        x0, x1 = mx0, w - mx1
        if verse_left == 0 and rng.random() < 0.05:
            verse_left = int(rng.integers(2, 6))
        if verse_left:
            ind = (x1 - x0) * rng.uniform(0.06, 0.15)
            writer.verse = True
            writer._foot = 0
            chunks = [writer.chunk() for _ in range(int(rng.integers(2, 5)))]
            writer.verse = False
            got = write_line(cv, rng, writer, style, [(x0 + ind, x1 - ind)], y, label=cv.n_lines + 1,
                             justify=False, chunks=chunks)
            verse_left -= 1
        else:
            ind = body * rng.uniform(1.0, 3.0) if para_start and rng.random() < 0.5 else 0.0
            end_para = rng.random() < 0.07
            got = write_line(cv, rng, writer, style, [(x0 + ind, x1)], y, label=cv.n_lines + 1,
                             justify=rng.random() < 0.7, fill=rng.uniform(0.2, 0.9) if end_para else 1.0)
            para_start = end_para
        if got:
            cv.n_lines += 1
        y += pitch
    if footnotes:
        y = max(y, bottom) + pitch * 0.3
        _rule(cv, rng, (mx0, y), (mx0 + (w - mx0 - mx1) * rng.uniform(0.2, 0.4), y), max(1, int(body * 0.06)))
        y += pitch * 0.5
        for _ in range(footnotes):
            got = write_line(cv, rng, writer, foot_style, [(mx0, w - mx1)], y, label=cv.n_lines + 1,
                             justify=False, fill=rng.uniform(0.3, 1.0))
            if got:
                cv.n_lines += 1
            y += foot_style.body * 2.2
    if where in ("footer", "both"):
        y = h - my1 - body
        write_digits(cv, number, w / 2, y, body, rng, label=cv.n_lines + 1, align="center")
        cv.n_lines += 1
    return cv


def _join_band(cv: Canvas, label: int, top: float, style: TextStyle) -> None:
    """Make the header's page number and title one band (one line, gap included)."""
    ys, xs = np.nonzero(cv.labels == label)
    if len(xs):
        y0 = int(top)
        y1 = int(top + style.body)
        cv.labels[y0:y1 + 1, xs.min():xs.max() + 1] = label


# --------------------------------------------------------------------------- contents

def contents(rng: np.random.Generator, h: int, w: int) -> Canvas:
    """A two-column table of contents: title, then entries with dot leaders and page
    numbers; one line per entry per column."""
    cv = _new_canvas(h, w)
    mx, my = w * rng.uniform(0.06, 0.12), h * rng.uniform(0.06, 0.1)
    rows = int(rng.integers(8, 20))
    pitch = (h - 2 * my) / (rows + 2.5)
    body = pitch / rng.uniform(2.0, 3.8)
    style = _pick_style(rng, "uchen", body)
    writer = Writer(rng)
    y = my
    head = style.scaled(rng.uniform(1.1, 1.5))
    chunks = [writer.words_only(int(rng.integers(2, 4)))]
    run = _shaped(head.font, head.ppem, chunks[0])
    x = (w - run.width) / 2
    if write_line(cv, rng, writer, head, [(x, x + run.width + 2)], y, label=cv.n_lines + 1,
                  justify=False, chunks=chunks):
        cv.n_lines += 1
    y += pitch * 2.2
    gutter = max(body * rng.uniform(3.0, 5.0), (w - 2 * mx) * 0.06)
    col_w = (w - 2 * mx - gutter) / 2
    digits = rng.random() < 0.6
    for r in range(rows):
        for c in range(2):
            x0 = mx + c * (col_w + gutter)
            indent = body * 2 if rng.random() < 0.2 else 0.0
            page = int(rng.integers(1, 500))
            num = tibetan_number(page) if digits else str(page)
            entry = [writer.words_only(int(rng.integers(2, 7))) + SHAD]
            got = write_line(cv, rng, writer, style, [(x0 + indent, x0 + col_w * 0.75)], y, label=cv.n_lines + 1,
                             justify=False, chunks=entry)
            if not got:
                continue
            label = cv.n_lines + 1
            if digits:
                nrun = _shaped(style.font, style.ppem, num)
                nx = x0 + col_w - nrun.width
                write_line(cv, rng, writer, style, [(nx, x0 + col_w + 1)], y, label=label, justify=False,
                           chunks=[num])
                end = nx
            else:
                end, _ = write_digits(cv, num, x0 + col_w, y, body, rng, label=label, align="right")
            # Dot leaders between the entry and its page number, inside the band.
            step = body * rng.uniform(0.35, 0.6)
            dy = y + body * rng.uniform(0.6, 0.9)
            for dx in np.arange(got[1] + step, end - step * 0.5, step):
                cv2.circle(cv.ink, (int(dx), int(dy)), max(1, int(body * 0.07)), 255, -1, cv2.LINE_AA)
            cv.labels[int(y):int(y + body) + 1, int(got[0]):int(min(w, end + body))] = label
            cv.n_lines += 1
        y += pitch
    return _renumber(cv)


def _renumber(cv: Canvas) -> Canvas:
    """Labels 1..n in the order lines were drawn, without holes (an entry that did not fit)."""
    present = np.flatnonzero(np.bincount(cv.labels.ravel()))
    present = present[present > 0]
    lut = np.zeros(int(cv.labels.max()) + 1, np.int16)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int16)
    cv.labels = lut[cv.labels]
    cv.texts = {int(lut[k]): t for k, t in cv.texts.items() if k < len(lut) and lut[k]}
    cv.n_lines = len(present)
    return cv


LAYOUTS = ("pecha", "woodblock", "manuscript", "book", "toc")


def draw_layout(rng: np.random.Generator, kind: str, h: int, w: int) -> Canvas:
    """Draw a page of ``kind`` (one of ``LAYOUTS``) on a flat h×w canvas."""
    if kind == "pecha":
        cv = pecha(rng, h, w, "print")
    elif kind in ("woodblock", "manuscript"):
        cv = pecha(rng, h, w, kind)
    elif kind == "book":
        cv = book(rng, h, w)
    elif kind == "toc":
        cv = contents(rng, h, w)
    else:
        raise ValueError(f"kind must be one of {LAYOUTS}, got {kind!r}")
    return _renumber(cv)
